"""Exact resume, preemption and fault tolerance, shown with real runs of train.py.

Runs are killed (SIGKILL, SIGTERM), have their newest checkpoint damaged, are extended, warm-started
and restarted by torchrun after a worker dies; each is then compared bit for bit with a run that
was never interrupted. The model has dropout, so every comparison also checks the RNG restore.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from src.checkpoint.checkpointer import load_checkpoint
from src.errors import RunError
from tests.helpers import (
    ROOT,
    explain,
    logged_steps,
    only_run_dir,
    read_metrics,
    result_dirs,
    run_script,
    start_script,
    state_differences,
    wait_for_step,
)

# Registered through `imports:` from a temporary folder. Environment variables steer the forward pass
# so that the interrupted and the reference run share one config (the resume guard compares them).
PARTS = '''
import os
import time

import torch
from torch import nn

from src.data.datasets import SyntheticClassification
from src.registry import DATASET_REGISTRY, MODEL_REGISTRY


@MODEL_REGISTRY.register()
class ResumeNet(nn.Module):
    """A small MLP with dropout; RESUME_TEST_SLEEP slows its forward, RESUME_TEST_CRASH kills it."""

    def __init__(self, num_classes: int = 10, in_features: int = 16, hidden: int = 32, dropout: float = 0.3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            time.sleep(float(os.environ.get("RESUME_TEST_SLEEP", "0")))
            crash = os.environ.get("RESUME_TEST_CRASH")  # "rank:call": die on the first attempt only
            if crash and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                rank, call = (int(v) for v in crash.split(":"))
                if int(os.environ.get("RANK", "0")) == rank and self.calls == call:
                    os._exit(1)
        return self.net(x)


@DATASET_REGISTRY.register()
class TracedSynthetic(SyntheticClassification):
    """Appends every train index it serves to the file RESUME_TEST_TRACE names."""

    def __getitem__(self, index: int):
        trace = os.environ.get("RESUME_TEST_TRACE")
        if trace and self.split == "train":
            with open(trace, "a") as f:
                f.write(f"{index}\\n")
        return super().__getitem__(index)
'''

COMMON = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [resume_parts]
model: {{name: ResumeNet, dropout: 0.3}}
logging: {{log_frequency: 1, mlflow: false, tensorboard: false, progress_bar: false}}
"""

# Mid-epoch exactness: accumulation, a per-step schedule whose shape depends on the run length,
# a checkpoint every 2 optimizer steps. 96 samples / batch 8 = 12 batches = 6 steps per epoch.
STEPWISE = """
tag: stepwise
epoch: 2
batch: 8
dataset: {name: TracedSynthetic, input_shape: [16], train_size: 96, val_size: 16, test_size: 16}
optimizer: {name: AdamW, lr: 0.01}
lr_scheduler: {name: OneCycleLR}
training: {accumulate_grad_batches: 2}
checkpoint: {save_every_n_steps: 2}
"""
STEPS_PER_EPOCH = 6

# Epoch-level: a schedule that does not depend on the run length, so 2 + 1 epochs equal 3 epochs.
EPOCHWISE = """
tag: epochwise
epoch: 3
batch: 16
dataset: {name: SyntheticClassification, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}
optimizer: {name: SGD, lr: 0.1, momentum: 0.9}
lr_scheduler: {name: StepLR, step_size: 1, gamma: 0.5}
checkpoint: {save_frequency: 1}
"""

# Two DDP processes (gloo), 64 samples / (2 x 8) = 4 steps per epoch, a checkpoint after every step.
DDP = """
tag: ddp
epoch: 2
batch: 8
dataset: {name: SyntheticClassification, input_shape: [16], train_size: 64, val_size: 16, test_size: 16}
optimizer: {name: AdamW, lr: 0.01}
checkpoint: {save_every_n_steps: 1}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The test package on PYTHONPATH and the experiment files."""
    root = tmp_path_factory.mktemp("resume")
    (root / "pkg").mkdir()
    (root / "pkg" / "resume_parts.py").write_text(PARTS)
    for name, body in (("stepwise", STEPWISE), ("epochwise", EPOCHWISE), ("ddp", DDP)):
        (root / f"{name}.yaml").write_text(textwrap.dedent(COMMON) + textwrap.dedent(body))
    path = os.pathsep.join(p for p in (str(root / "pkg"), os.environ.get("PYTHONPATH", "")) if p)
    return {"root": root, "env": {"PYTHONPATH": path}}


def train(
    setup: dict, config: str | Path, output: Path, *overrides: str, **env: str
) -> subprocess.CompletedProcess:
    config = setup["root"] / f"{config}.yaml" if isinstance(config, str) else config
    return run_script("train.py", str(config), f"output={output}", *overrides, env={**setup["env"], **env})


def trained(setup: dict, config: str, output: Path, *overrides: str) -> Path:
    proc = train(setup, config, output, *overrides)
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(output)


def last(run_dir: Path, name: str = "last.pth") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_same_training_state(run_dir: Path, reference: Path) -> None:
    """Final weights, optimizer and schedule identical to the bit (torch.equal), and at the same step."""
    got, want = last(run_dir), last(reference)
    for key in ("model", "optimizer", "scheduler"):
        assert not state_differences(got[key], want[key]), (
            f"{key} differs: {state_differences(got[key], want[key])[:5]}"
        )
    assert got["progress"]["global_step"] == want["progress"]["global_step"]


def learning_curve(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock measurements, which no two runs share."""
    keep = ("epoch", "step", "train_loss", "lr", "train_epoch_loss", "val_loss", "val_accuracy")
    return [{k: e[k] for k in keep if k in e} for e in read_metrics(run_dir)]


# ---------------------------------------------------------------------- mid-epoch kills
@pytest.fixture(scope="module")
def stepwise_reference(setup, tmp_path_factory) -> Path:
    return trained(setup, "stepwise", tmp_path_factory.mktemp("stepwise_ref"))


def interrupt(
    setup: dict, output: Path, sig: signal.Signals, after_step: int, *overrides: str
) -> tuple[int, str]:
    """Start the slowed-down stepwise run, send `sig` right after `after_step` is logged; (exit code, log)."""
    log_file = output / "console.log"
    proc = start_script(
        "train.py",
        str(setup["root"] / "stepwise.yaml"),
        f"output={output}",
        *overrides,
        log_file=log_file,
        env={**setup["env"], "RESUME_TEST_SLEEP": "0.1"},
    )
    try:
        wait_for_step(proc, output, after_step)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, log_file.read_text()


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_exact_with_each_step_logged_once(setup, stepwise_reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # Any step of epoch 2 after its first mid-epoch checkpoint (step 8): the kill lands mid-epoch.
    kill_after = random.choice([STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH + 4, STEPS_PER_EPOCH + 5])
    code, console = interrupt(
        setup, out, signal.SIGKILL, kill_after, "logging.mlflow=true", "logging.tensorboard=true"
    )
    assert code == -signal.SIGKILL, f"killed after step {kill_after}\n{console[-3000:]}"
    run_dir = only_run_dir(out)
    saved = last(run_dir)["progress"]
    assert saved["epoch"] == 1 and saved["batches_done"] > 0, f"not a mid-epoch checkpoint: {saved}"
    assert saved["global_step"] < 2 * STEPS_PER_EPOCH

    trace = tmp_path / "train_reads.txt"
    proc = train(setup, run_dir / "config.yaml", out, RESUME_TEST_TRACE=str(trace))
    assert proc.returncode == 0, explain(proc)
    assert f"resumed at epoch 2, step {saved['global_step']}" in proc.stdout + proc.stderr
    assert result_dirs(out) == [run_dir]
    assert_same_training_state(run_dir, stepwise_reference)

    # O(1) mid-epoch resume: only the epoch's remaining samples are read (plus the model's shape probe
    # and the items tried for randomness at start), none of the batches already trained are loaded.
    from src.data.seeded import PROBED_ITEMS

    remaining = 96 - saved["batches_done"] * 8
    reads = trace.read_text().split()
    assert remaining <= len(reads) <= remaining + 2 + PROBED_ITEMS, (
        f"{len(reads)} train reads for {remaining} remaining samples"
    )

    # metrics.jsonl: each step once, and the same values as the uninterrupted run.
    assert logged_steps(out) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert learning_curve(run_dir) == learning_curve(stepwise_reference)

    # MLflow: one run, finished, every step of every metric exactly once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("TracedSynthetic")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert last(run_dir)["tracking"]["MlflowTracker"]["run_id"] == run_id
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [6, 12]

    # TensorBoard: the events after the checkpoint that the killed run wrote are purged on reading.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes_bit_exact(setup, stepwise_reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, console = interrupt(setup, out, signal.SIGTERM, STEPS_PER_EPOCH + 2)
    assert code == 128 + signal.SIGTERM, console[-3000:]
    run_dir = only_run_dir(out)
    assert f"resume with: python train.py {run_dir}/config.yaml" in console
    saved = last(run_dir)["progress"]
    assert saved["epoch"] == 1 and 0 < saved["batches_done"] < 2 * STEPS_PER_EPOCH, saved
    assert saved["global_step"] == max(logged_steps(out)), "the checkpoint is not at the last finished step"
    assert "test" not in {p.name for p in run_dir.iterdir()}, "a preempted run must not be tested"

    proc = train(setup, run_dir / "config.yaml", out)
    assert proc.returncode == 0, explain(proc)
    assert_same_training_state(run_dir, stepwise_reference)
    assert learning_curve(run_dir) == learning_curve(stepwise_reference)


# ---------------------------------------------------------------------- epochs, warm starts, damage
@pytest.fixture(scope="module")
def epochwise_reference(setup, tmp_path_factory) -> Path:
    return trained(setup, "epochwise", tmp_path_factory.mktemp("epochwise_ref"))


@pytest.fixture(scope="module")
def two_epochs(setup, tmp_path_factory) -> Path:
    """The epochwise run stopped after 2 of its 3 epochs (finished: its config said epoch=2)."""
    return trained(setup, "epochwise", tmp_path_factory.mktemp("two_epochs"), "epoch=2")


def test_resume_guard_refuses_changes_that_alter_the_run(setup, two_epochs):
    config = two_epochs / "config.yaml"
    before = (config.read_text(), (two_epochs / "metrics.jsonl").read_text())
    refused = ["batch=8", "optimizer.lr=0.5", "dataloader.drop_last=true"]
    proc = train(setup, config, two_epochs.parent.parent, *refused)
    assert proc.returncode == 2, explain(proc)
    message = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint.allow_config_change=true" in message, message
    assert all(override.split("=")[0] in message for override in refused), message
    assert (config.read_text(), (two_epochs / "metrics.jsonl").read_text()) == before
    assert result_dirs(two_epochs.parent.parent) == [two_epochs]


@pytest.mark.slow
def test_epoch_override_extends_a_finished_run_like_training_longer_from_the_start(
    setup, two_epochs, epochwise_reference
):
    # Harmless changes are accepted (and reported); the StepLR schedule continues where it was.
    proc = train(
        setup,
        two_epochs / "config.yaml",
        two_epochs.parent.parent,
        "epoch=3",
        "logging.log_frequency=2",
        "dataloader.num_workers=1",
    )
    assert proc.returncode == 0, explain(proc)
    log = proc.stdout + proc.stderr
    assert "resume: epoch changed 2 -> 3" in log
    assert "resume: dataloader.num_workers changed 'auto' -> 1" in log
    assert_same_training_state(two_epochs, epochwise_reference)

    def epoch_ends(run_dir: Path) -> list[tuple]:
        return [
            (e["epoch"], e["train_epoch_loss"], e["val_loss"])
            for e in read_metrics(run_dir)
            if "val_loss" in e
        ]

    assert [e[0] for e in epoch_ends(two_epochs)] == [1, 2, 3]
    assert epoch_ends(two_epochs) == epoch_ends(epochwise_reference)


def test_warm_start_continues_another_runs_state_in_a_new_directory(
    setup, two_epochs, epochwise_reference, tmp_path
):
    source = two_epochs / "checkpoints" / "epoch_0002.pth"
    run_dir = trained(setup, "epochwise", tmp_path, f"checkpoint.resume_from={source}")
    assert run_dir != two_epochs
    assert_same_training_state(run_dir, epochwise_reference)
    # The new directory's history starts at the checkpoint: epoch 3 only.
    assert {e["epoch"] for e in read_metrics(run_dir)} == {3}


def test_pretrained_weight_loads_only_weights_and_reports_key_differences(setup, two_epochs, tmp_path):
    weights = dict(last(two_epochs, "epoch_0001.pth")["model"])
    del weights["net.4.bias"]
    weights["extra.weight"] = torch.zeros(3)
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    # lr=1e-30: steps far below float32 resolution leave the loaded weights bit-identical.
    proc = train(
        setup,
        "epochwise",
        tmp_path / "out",
        f"model.pretrained_weight={path}",
        "optimizer.lr=1e-30",
        "epoch=1",
    )
    assert proc.returncode == 0, explain(proc)
    report = next(line for line in (proc.stdout + proc.stderr).splitlines() if str(path) in line)
    assert "missing" in report and "net.4.bias" in report, report
    assert "unexpected" in report and "extra.weight" in report, report
    final = last(only_run_dir(tmp_path / "out"))
    for key in ("net.1.weight", "net.1.bias", "net.4.weight"):
        assert torch.equal(final["model"][key], weights[key]), key
    assert final["progress"]["global_step"] == 3  # a fresh run: progress was not taken


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(setup, epochwise_reference, tmp_path):
    run_dir = trained(setup, "epochwise", tmp_path, "epoch=2", "checkpoint.save_frequency=0")
    folder = run_dir / "checkpoints"
    # A crash during a write: last.pth cut short (a new file: its hard-linked twins stay whole) and
    # the writer's temporary file and staged link left behind.
    data = (folder / "last.pth").read_bytes()
    (folder / "last.pth").unlink()
    (folder / "last.pth").write_bytes(data[: len(data) // 2])
    (folder / ".tmp-99999.pth").write_bytes(data[:100])
    (folder / ".last.pth.99999.link").write_bytes(data[:100])
    with pytest.raises(RunError, match="corrupt or truncated"):
        load_checkpoint(folder / "last.pth")

    proc = train(setup, run_dir / "config.yaml", tmp_path, "epoch=3")
    assert proc.returncode == 0, explain(proc)
    log = proc.stdout + proc.stderr
    assert "last.pth is corrupt or truncated" in log
    assert re.search(r"resuming from (previous|best)\.pth \(last\.pth is missing or damaged\)", log), log[
        -3000:
    ]
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob(".*.link"))
    assert_same_training_state(run_dir, epochwise_reference)


# ---------------------------------------------------------------------- torchrun --max-restarts
def torchrun(setup: dict, output: Path, **env: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts=1",
        "--rdzv_endpoint=localhost:0", "--rdzv_backend=c10d",
        "train.py", str(setup["root"] / "ddp.yaml"), f"output={output}",
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **setup["env"], **env}
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_torchrun_restarts_a_crashed_worker_and_resumes_bit_exact(setup, tmp_path):
    reference = torchrun(setup, tmp_path / "reference")
    assert reference.returncode == 0, explain(reference)
    # Rank 1 dies at its 6th training forward (epoch 2, batch 2) on the first attempt; 4 steps per epoch
    # with a checkpoint after every step, so the restart resumes mid-epoch from step 5.
    crashed = torchrun(setup, tmp_path / "crashed", RESUME_TEST_CRASH="1:6")
    assert crashed.returncode == 0, explain(crashed)
    log = crashed.stdout + crashed.stderr
    run_dir = only_run_dir(tmp_path / "crashed")
    assert f"torchrun restart 1: resuming {run_dir}" in log
    assert "resumed at epoch 2, step 5" in log
    assert_same_training_state(run_dir, only_run_dir(tmp_path / "reference"))
    assert logged_steps(tmp_path / "crashed") == list(range(1, 9))
    assert not list((tmp_path / "crashed" / ".elastic").iterdir()), "the restart marker outlived the job"
