"""Ray Train and Ray Tune as launchers of the template (the `ray` extra), on a real local Ray cluster.

A Ray Train worker is SIGKILLed twice, before Ray's first report and after it; the group Ray restarts
resumes the same result directory, and the final weights and metrics equal `./torchrun.sh 2`'s.
Adopting a process group made by someone else is checked in this process with a real gloo group.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tests.helpers import (
    ROOT,
    assert_same_states,
    explain,
    only_run_dir,
    read_metrics,
    run_shell,
    shell_env,
    slow_mlp_source,
    start_script,
    user_module_config,
)

NEEDS_RAY = 'the ray extra is not installed: pip install -e ".[ray]"'

# 2 workers x batch 4 over 48 samples: 6 steps per epoch, each SLEEP s long, so kills land mid-epoch.
CONFIG = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [ray_parts]
epoch: 3
batch: 4
model: {{name: SlowMLP, in_features: 16, hidden: [16]}}
dataset: {{name: SyntheticClassification, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}}
optimizer: {{name: AdamW, lr: 0.01}}
logging: {{log_frequency: 1, mlflow: false, tensorboard: false, progress_bar: false}}
"""


def ray_workers(tag: str, skip: set[int]) -> list[int]:
    """Pids of the RayTrainWorker processes started under this test (found by an env tag they inherit)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            if (
                b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                and tag.encode() in (proc / "environ").read_bytes()
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_until(check, proc, log_file: Path, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, log_file.read_text()[-6000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log_file.read_text()[-6000:]}"
        time.sleep(0.02)


def val_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n") and '"val_loss"' in line]  # fmt: skip


@pytest.mark.slow
def test_ray_train_killed_worker_resumes_same_dir_and_equals_torchrun(tmp_path):
    pytest.importorskip("ray.train.torch", reason=NEEDS_RAY)
    config, env = user_module_config(tmp_path, "ray_parts", slow_mlp_source("RAY_TEST_SLEEP"), CONFIG)
    tag = f"ray-test-{os.getpid()}-{tmp_path.name}"
    env.update(RAY_TEST_SLEEP="0.3", RAY_TEST_TAG=tag, RAY_AUTH_MODE="disabled")

    ref_out = tmp_path / "ref"
    ref = run_shell(f"./torchrun.sh 2 train.py {config} output={ref_out}", env=shell_env(tmp_path, **env))
    assert ref.returncode == 0, explain(ref)

    out, log_file = tmp_path / "ray", tmp_path / "ray.log"
    proc = start_script("script/ray_train.py", str(config), f"output={out}", "--workers", "2",
                        "--max-failures", "2", log_file=log_file, env=env)  # fmt: skip
    try:
        # Kill 1: a worker, once training has started and before the first epoch ends (Ray's first report).
        wait_until(lambda: any(out.glob("*/*/metrics.jsonl")), proc, log_file, "the first step")
        run = only_run_dir(out)
        assert val_epochs(run) == [], "too late: the first epoch already ended"
        first = ray_workers(tag, set())
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        # Kill 2: after the restarted group's first report (a Ray checkpoint exists), mid-epoch 2.
        storage = out / ".ray"
        wait_until(lambda: any(storage.glob("*/checkpoint_*")), proc, log_file, "Ray's first checkpoint")
        second = ray_workers(tag, set(first))
        assert second, "the worker group was not restarted"
        os.kill(second[0], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log_file.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    console = log_file.read_text()
    assert only_run_dir(out) == run, "a restart made a second result directory"
    assert console.count("Ray Train restart: resuming") >= 1 or "resum" in (run / "train.log").read_text()
    assert f"Ray Train finished: {run.resolve()}" in console
    assert "python script/ray_train.py" in (run / "summary.txt").read_text()

    # Same weights and optimizer state as torchrun's 2 processes; same validation and test numbers.
    want = torch.load(only_run_dir(ref_out) / "checkpoints" / "last.pth", weights_only=True)
    got = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert_same_states(got, want, ("model", "optimizer"))
    ref_run = only_run_dir(ref_out)
    assert json.loads((run / "test" / "metrics.json").read_text()) == json.loads(
        (ref_run / "test" / "metrics.json").read_text()
    )
    last_val = lambda r: [e for e in read_metrics(r) if "val_loss" in e][-1]  # noqa: E731
    assert last_val(run)["val_loss"] == last_val(ref_run)["val_loss"]
    assert OmegaConf.load(run / "config.yaml").run_dir == str(run)


def test_adopted_process_group_is_not_destroyed(monkeypatch, caplog):
    """A gloo group made before setup() (as Ray Train makes it) is used as it is and outlives cleanup()."""
    from src.config import load_config
    from src.distributed import process_group as dist_utils

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(dist_utils.free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=77))
    try:
        cfg = load_config(ROOT / "config" / "dummy.yaml", ["gpu.device=cpu"])
        with caplog.at_level("INFO", logger="template"):
            ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
        assert ctx.strategy == "ddp" and ctx.world_size == 1
        assert "process group of the launcher adopted: backend gloo, timeout 0:01:17" in caplog.text
        dist_utils.cleanup()
        assert dist.is_initialized(), "cleanup() destroyed a group it did not create"
        t = torch.ones(1)
        dist.all_reduce(t)  # still usable by its owner
        assert t.item() == 1.0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def tune_trials(out: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(next(out.glob("*/*_tune_*_SlowMLP/tune_summary.csv")), newline="") as f:
        return {r["optimizer.lr"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_ray_tune_asha_grid_interrupted_and_restored(tmp_path):
    pytest.importorskip("ray.tune", reason=NEEDS_RAY)
    config, env = user_module_config(tmp_path, "ray_parts", slow_mlp_source("RAY_TEST_SLEEP"), CONFIG)
    env.update(RAY_TEST_SLEEP="0.05", RAY_AUTH_MODE="disabled")
    out = tmp_path / "out"
    args = [
        str(config),
        "optimizer.lr=0.05,0.01,1e-7",
        "batch=8",
        f"output={out}",
        "--asha",
        "--max-concurrent",
        "1",
    ]
    log_file = tmp_path / "tune.log"
    proc = start_script("script/ray_tune.py", *args, log_file=log_file, env=env)

    def runs() -> list[Path]:  # in trial order (their tags end in Tune's trial index)
        found = {p.parent.name.rsplit("_", 1)[-1]: p.parent for p in out.glob("*/*_SlowMLP_*/config.yaml")}
        return [found[k] for k in sorted(found)]

    def second_training() -> bool:
        dirs = runs()
        return len(dirs) == 2 and (dirs[0] / "summary.txt").exists() and (dirs[1] / "metrics.jsonl").exists()

    try:  # Ctrl-C once the first trial finished and the second is training
        wait_until(second_training, proc, log_file, "the second trial")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    first, second = runs()
    stamp = (first / "summary.txt").stat().st_mtime_ns
    assert not (second / "summary.txt").exists()

    again = start_script("script/ray_tune.py", *args, "--restore", log_file=tmp_path / "again.log", env=env)
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-6000:]
    console = (tmp_path / "again.log").read_text()
    assert "restoring the Tune experiment" in console
    assert (first / "summary.txt").stat().st_mtime_ns == stamp, "a finished trial trained again"
    assert len(runs()) == 3 and runs()[1] == second, "the cut trial did not resume in place"
    assert "resum" in (second / "train.log").read_text()
    table = tune_trials(out)
    winner = table["0.05"]
    assert winner["state"] == "FINISHED" and (Path(winner["run"]) / "test" / "metrics.json").is_file()
    pruned = table["1e-7"]  # ASHA: worse than the others at the first epoch
    assert pruned["state"] == "STOPPED", table
    run = Path(pruned["run"])
    assert (run / "checkpoints" / "last.pth").is_file() and "stopped by SIGTERM" in (
        run / "train.log"
    ).read_text()


def test_ray_commands_refuse_bad_input_before_ray_starts(tmp_path, monkeypatch, capsys):
    """One `error:` line, exit 2, nothing written, and no Ray cluster started."""
    from src.run.ray_launch import main as ray_train
    from tests.test_workflows import load_script

    monkeypatch.chdir(tmp_path)
    ray_tune = load_script("ray_tune").main
    dummy = str(ROOT / "config" / "dummy.yaml")
    cases = [
        (ray_train, [dummy, "--workers", "0"], "--workers must be at least 1"),
        (ray_train, [dummy, "optimzer.lr=1"], "optimzer"),
        (ray_train, [dummy, "distributed.strategy=dp"], "under Ray use ddp or fsdp"),
        (ray_tune, [dummy, "batch=8"], "nothing to search"),
        (
            ray_tune,
            [dummy, "batch=8,16", "--samples", "0"],
            "--samples and --max-concurrent must be at least 1",
        ),
        (ray_tune, [dummy, "optimizer.lr=loguniform:0:1"], "loguniform needs a low bound above 0"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_auto_workers_follow_the_cpus_a_launcher_gave(monkeypatch):
    """Ray pins no cores: `num_workers: auto` on CUDA takes the worker's CPU allocation, not the machine's."""
    from src.data.workers import auto_num_workers, cpu_cores

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("TEMPLATE_CPUS_PER_PROCESS", "1")
    auto_num_workers.cache_clear()
    try:
        assert auto_num_workers("cuda") == 1
        monkeypatch.setenv("TEMPLATE_CPUS_PER_PROCESS", "64")
        auto_num_workers.cache_clear()
        assert auto_num_workers("cuda") == max(1, min(8, cpu_cores()))  # never more than the cores here
    finally:
        auto_num_workers.cache_clear()
