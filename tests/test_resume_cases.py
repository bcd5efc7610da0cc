"""Resume cases a new user hits: extending a finished or early-stopped run, warm starts, a stop signal
during an epoch's short last batch, a changed monitor, schedule-free optimizers, augmentation in
loader workers, throughput after a resume, and resume hints that name the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ROOT,
    TINY,
    explain,
    only_run_dir,
    read_metrics,
    result_dirs,
    run_script,
    start_script,
    wait_for_step,
)
from tests.test_resume import PARTS, assert_same_training_state, last

# A dataset that sends its own process SIGTERM while serving the CASE_SIGNAL_AT-th train item.
SIGNAL_PARTS = """
import os
import signal

from src.data.datasets import SyntheticClassification
from src.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class SignalSynthetic(SyntheticClassification):
    calls = 0

    def __getitem__(self, index: int):
        if self.split == "train" and os.environ.get("CASE_SIGNAL_AT"):
            SignalSynthetic.calls += 1
            if SignalSynthetic.calls == int(os.environ["CASE_SIGNAL_AT"]):
                os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(index)
"""

BASE = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [resume_parts, case_parts]
logging: {{mlflow: false, tensorboard: false, progress_bar: false}}
"""

# Schedule-free optimizer, random crops and flips made in 2 loader workers, accumulation, a
# checkpoint every 3 steps inside 4-step logging windows. 96 samples / batch 8 = 6 steps per epoch.
WORKERS = """
tag: workers
epoch: 2
batch: 8
model: {name: ResumeNet, in_features: 192, dropout: 0.3}
dataset: {name: SyntheticClassification, input_shape: [3, 8, 8], train_size: 96, val_size: 16, test_size: 16}
transform:
  train: [{name: RandomResizedCrop, size: 8, antialias: true}, RandomHorizontalFlip]
optimizer: {name: AdamWScheduleFree, lr: 0.01}
training: {accumulate_grad_batches: 2}
dataloader: {num_workers: 2}
checkpoint: {save_every_n_steps: 3}
logging: {log_frequency: 4}
"""

# 240 samples in batches of 32: the eighth batch of an epoch is short (16).
SHORT_BATCH = """
tag: short
epoch: 2
batch: 32
gpu: {deterministic: true}
model: {name: ResumeNet, in_features: 16, dropout: 0.0}
dataset: {name: SignalSynthetic, input_shape: [16], train_size: 240, val_size: 16, test_size: 16}
optimizer: {name: SGD, lr: 0.1}
"""


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cases")
    (root / "pkg").mkdir()
    (root / "pkg" / "resume_parts.py").write_text(PARTS)
    (root / "pkg" / "case_parts.py").write_text(SIGNAL_PARTS)
    for name, body in (("workers", WORKERS), ("short", SHORT_BATCH)):
        (root / f"{name}.yaml").write_text(textwrap.dedent(BASE) + textwrap.dedent(body))
    path = os.pathsep.join(p for p in (str(root / "pkg"), os.environ.get("PYTHONPATH", "")) if p)
    return {"root": root, "env": {"PYTHONPATH": path}}


def train(cases: dict, config: str | Path, *args: str, **env: str):
    config = cases["root"] / f"{config}.yaml" if isinstance(config, str) else config
    return run_script("train.py", str(config), *args, env={**cases["env"], **env})


def train_events(run_dir: Path) -> list[dict]:
    return [e for e in read_metrics(run_dir) if "train_loss" in e]


# ---------------------------------------------------------------------- the README's commands
@pytest.mark.slow
def test_extend_early_stop_rerun_and_warm_start_follow_the_replanned_schedule(tmp_path):
    out = tmp_path / "out"
    first = run_script("train.py", "config/dummy.yaml", *TINY, f"output={out}")
    assert first.returncode == 0, explain(first)
    run_dir = only_run_dir(out)
    finished = last(run_dir)
    assert finished["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0, abs=1e-12)  # the cosine's end

    # README: train a finished run longer. Early stopping (never improving by 10) ends it after 2 more.
    more = run_script("train.py", f"{run_dir}/config.yaml", "epoch=6", "training.early_stopping.patience=1",
                      "training.early_stopping.min_delta=10")  # fmt: skip
    assert more.returncode == 0, explain(more)
    assert (
        "schedule re-planned: 2 -> 6 epochs (CosineAnnealingLR): training goes on at lr 0.0022" in more.stderr
    )
    extended = [e for e in train_events(run_dir) if e["epoch"] > 2]
    assert extended and min(e["lr"] for e in extended) > 1e-4
    weights = last(run_dir)
    assert weights["progress"]["epoch"] == 4 and weights["progress"]["early_stopped"]
    assert not torch.equal(weights["model"]["classifier.1.weight"], finished["model"]["classifier.1.weight"])

    # Running the early-stopped run again says once that it is finished and changes no file.
    assert (
        f"resume:     python train.py {run_dir}/config.yaml epoch=<more than 4>"
        in (run_dir / "summary.txt").read_text()
    )
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    }
    again = run_script("train.py", f"{run_dir}/config.yaml")
    assert again.returncode == 0, explain(again)
    assert again.stderr.count("this run is finished (early stopping ended it at epoch 4 of 6, tested") == 1
    assert f"to train it longer: python train.py {run_dir}/config.yaml epoch=<more than 6>" in again.stderr
    assert f"to test it again: python test.py {run_dir}/config.yaml" in again.stderr
    assert not any(s in again.stderr for s in ("resumed at", "nothing left", "training SimpleCNN", "test:"))
    assert {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    } == before

    # A changed monitor would be compared with the old metric's best: refused.
    monitor = run_script("train.py", f"{run_dir}/config.yaml", "checkpoint.monitor=val_accuracy")
    assert monitor.returncode == 2 and "'checkpoint.monitor' changed" in monitor.stderr, explain(monitor)

    # README: a new run from that state, longer: trains on the curve planned for 8 epochs.
    warm_out = tmp_path / "warm"
    warm = run_script("train.py", "config/dummy.yaml", *TINY, f"output={warm_out}", "epoch=8",
                      f"checkpoint.resume_from={run_dir}/checkpoints/last.pth")  # fmt: skip
    assert warm.returncode == 0, explain(warm)
    assert "schedule re-planned: 6 -> 8 epochs" in warm.stderr
    warm_events = train_events(only_run_dir(warm_out))
    assert {e["epoch"] for e in warm_events} == {5, 6, 7, 8}
    assert min(e["lr"] for e in warm_events) > 1e-5


# ---------------------------------------------------------------------- signals and kills
@pytest.mark.slow
def test_stop_signal_during_the_short_last_batch_saves_a_resumable_state(cases, tmp_path):
    out = tmp_path / "out"
    stopped = train(cases, "short", f"output={out}", CASE_SIGNAL_AT="230")  # inside batch 8 of epoch 1
    assert stopped.returncode == 128 + signal.SIGTERM, explain(stopped)
    run_dir = only_run_dir(out)
    progress = last(run_dir)["progress"]
    assert (progress["epoch"], progress["batches_done"]) == (1, 0), progress  # saved at the epoch's end
    resumed = train(cases, run_dir / "config.yaml")
    assert resumed.returncode == 0, explain(resumed)
    assert last(run_dir)["progress"]["global_step"] == 16


@pytest.mark.slow
def test_sigkill_with_workers_augmentation_and_schedule_free_resumes_bit_exact(cases, tmp_path):
    """Augmentation made in 2 workers is a function of (seed, epoch, index); saving a schedule-free
    optimizer changes nothing; the first throughput after the resume counts only its own samples.
    The reference runs without workers, without mid-epoch saves, and with gpu.deterministic (harmless here)."""
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    ref = train(cases, "workers", f"output={ref_out}", "dataloader.num_workers=0",
                "checkpoint.save_every_n_steps=0", "gpu.deterministic=true")  # fmt: skip
    assert ref.returncode == 0, explain(ref)

    out.mkdir()
    log_file = out / "console.log"
    proc = start_script("train.py", str(cases["root"] / "workers.yaml"), f"output={out}", log_file=log_file,
                        env={**cases["env"], "RESUME_TEST_SLEEP": "0.1"})  # fmt: skip
    try:
        wait_for_step(proc, out, 4)  # steps 1-3 are saved, the window 1-4 logged: kill in step 5
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL, log_file.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_dir = only_run_dir(out)
    saved = last(run_dir)["progress"]
    assert (saved["global_step"], saved["window_samples"]) == (3, 48), saved

    resumed = train(cases, run_dir / "config.yaml")
    assert resumed.returncode == 0, explain(resumed)
    assert result_dirs(out) == [run_dir]
    assert_same_training_state(run_dir, only_run_dir(ref_out))
    for event in train_events(run_dir):  # samples/s x s/step = samples per step (batch 8 x 2 accumulated)
        assert event["samples_per_sec"] * event["step_time"] == pytest.approx(16, rel=1e-6), event


# ---------------------------------------------------------------------- in-process
def test_resume_hints_name_the_launcher(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from src.results.run_dir import resume_command, save_config

    assert resume_command(tmp_path) == f"python train.py {tmp_path}/config.yaml"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(tmp_path) == f"./torchrun.sh 2 train.py {tmp_path}/config.yaml"
    header = save_config(OmegaConf.create({"epoch": 1}), tmp_path).read_text().splitlines()[1]
    assert f"./torchrun.sh 2 train.py {tmp_path}/config.yaml" in header
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command(tmp_path).startswith("./multinode.sh 2 8 ")


def test_an_allowed_monitor_change_ranks_afresh():
    from src.run.main import _forget_other_metric

    state = {"progress": {"best_value": 1.55, "best_epoch": 1, "top_k": [[1.55, "x"]], "stale_best": 1.0,
                          "stale_epochs": 2}}  # fmt: skip
    _forget_other_metric(state, ["checkpoint.monitor", "epoch"])
    assert state["progress"]["best_value"] is None and state["progress"]["top_k"] == []
    assert state["progress"]["stale_best"] == 1.0
    _forget_other_metric(state, ["training.early_stopping.mode"])
    assert state["progress"]["stale_best"] is None


def test_gpu_check_says_it_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: script/gpu_check.sh would run its checks")
    proc = subprocess.run(["bash", str(ROOT / "script" / "gpu_check.sh")], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("gpu_check: SKIPPED, no CUDA device"), proc.stdout


def test_augmentation_depends_on_seed_epoch_and_index_only():
    from torchvision.transforms import v2

    from src.data.datasets import SyntheticClassification
    from src.data.seeded import SeededItems

    flip = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.RandomHorizontalFlip()])
    items = SeededItems(SyntheticClassification("train", flip, input_shape=(3, 8, 8), train_size=8), seed=3)
    assert items.seeds, "a random transform must be seeded per sample"
    plain = SeededItems(SyntheticClassification("train", None, input_shape=(3, 8, 8), train_size=8), seed=3)
    assert not plain.seeds  # items that draw nothing random pay nothing
    assert torch.equal(plain[(1, 5)][0], plain.dataset[5][0])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    forward = items.__getitems__([(1, i) for i in range(8)])
    assert torch.equal(torch.get_rng_state(), before), "data loading moved the training loop's random stream"
    backward = items.__getitems__([(1, i) for i in reversed(range(8))])[::-1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(forward, backward, strict=True))
    other_epoch = items.__getitems__([(2, i) for i in range(8)])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(forward, other_epoch, strict=True))
