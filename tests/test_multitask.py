"""Multi-task training with the WeightedSum loss: parts logged per task, exact across a SIGKILL mid-window."""

from __future__ import annotations

import pytest
import torch

from src.errors import ConfigError, RunError
from src.models import LOSS_REGISTRY
from tests.helpers import (
    ROOT,
    assert_same_states,
    explain,
    only_run_dir,
    read_metrics,
    run_script,
    sigkill_after,
    start_script,
    user_module_config,
    wait_for_line,
)


def test_weighted_sum_weights_each_named_part():
    loss = LOSS_REGISTRY.build(
        {
            "name": "WeightedSum",
            "losses": {"a": {"name": "CrossEntropyLoss"}, "b": "MSELoss"},
            "weights": {"a": 0.7},
        }
    )
    out = {"a": torch.randn(4, 3), "b": torch.randn(4)}
    tgt = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.zeros(4)}
    parts = loss(out, tgt)
    assert set(parts) == {"a", "b"}
    assert torch.allclose(parts["a"], 0.7 * torch.nn.functional.cross_entropy(out["a"], tgt["a"]))
    assert torch.allclose(parts["b"], (out["b"] ** 2).mean())  # weight 1.0 when not given
    with pytest.raises(RunError, match="dict outputs"):
        loss(out["a"], tgt["a"])
    with pytest.raises(ConfigError, match=r"loss\.weights names c"):
        LOSS_REGISTRY.build({"name": "WeightedSum", "losses": {"a": "MSELoss"}, "weights": {"c": 1.0}})


def test_a_bad_part_loss_stops_before_a_result_directory_exists(tmp_path):
    proc = run_script(
        "train.py",
        "config/dummy.yaml",
        f"output={tmp_path}",
        "loss={name: WeightedSum, losses: {a: CrossEntropyLos}}",
    )
    assert proc.returncode == 2 and "unknown loss 'CrossEntropyLos'" in proc.stderr, explain(proc)
    assert not list(tmp_path.iterdir())


PARTS = """
import os
import time

import torch
from torch import nn

from src.data.datasets import SyntheticClassification
from src.evaluators.base import BaseEvaluator
from src.registry import DATASET_REGISTRY, EVALUATOR_REGISTRY, MODEL_REGISTRY


@DATASET_REGISTRY.register()
class TwoTasks(SyntheticClassification):
    \"\"\"Task a: the synthetic class; task b: whether it is even.\"\"\"

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x, {"a": y, "b": torch.tensor(float(int(y) % 2))}


@MODEL_REGISTRY.register()
class TwoHeads(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2))
        self.a, self.b = nn.Linear(32, num_classes), nn.Linear(32, 1)

    def forward(self, x):
        if self.training:
            time.sleep(float(os.environ.get("MULTITASK_TEST_SLEEP", "0")))
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h).squeeze(1)}


@EVALUATOR_REGISTRY.register()
class TaskAccuracy(BaseEvaluator):
    def __init__(self, **kwargs):
        self.reset()

    def reset(self):
        self.right, self.seen = 0, 0

    def update(self, outputs, targets):
        self.right += int((outputs["a"].argmax(1) == targets["a"]).sum())
        self.seen += len(targets["a"])

    def compute(self):
        return {"accuracy_a": self.right / max(self.seen, 1)}
"""

# 48 samples / batch 8 = 6 steps per epoch; the loss is read every 4 steps, a checkpoint after each step.
CONFIG = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [multitask_parts]
epoch: 2
batch: 8
model: TwoHeads
dataset: {{name: TwoTasks, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}}
loss:
  name: WeightedSum
  losses: {{a: {{name: CrossEntropyLoss}}, b: {{name: BCEWithLogitsLoss}}}}
  weights: {{a: 0.7, b: 0.3}}
evaluator: TaskAccuracy
checkpoint: {{save_every_n_steps: 1, monitor: val_loss}}
logging: {{log_frequency: 4, mlflow: false, tensorboard: false, progress_bar: false}}
"""


@pytest.mark.slow
def test_each_task_loss_is_logged_and_a_kill_mid_window_resumes_exactly(tmp_path):
    config, env = user_module_config(tmp_path, "multitask_parts", PARTS, CONFIG)

    proc = run_script("train.py", str(config), f"output={tmp_path / 'ref'}", env=env)
    assert proc.returncode == 0, explain(proc)
    ref = only_run_dir(tmp_path / "ref")
    events = read_metrics(ref)
    train = [e for e in events if "train_loss" in e]
    assert [e["step"] for e in train] == [4, 6, 8, 12]
    for e in train:
        assert e["train_loss"] == pytest.approx(e["train_loss_a"] + e["train_loss_b"], rel=1e-6)
    val = [e for e in events if "val_loss" in e]
    assert len(val) == 2
    for e in val:
        assert e["val_loss"] == pytest.approx(e["val_loss_a"] + e["val_loss_b"], rel=1e-6)
        assert e["val_loss_a"] > 0 and e["val_loss_b"] > 0

    # SIGKILL after step 10's checkpoint: inside the window of steps 9-12, so step 12's logged parts
    # combine sums saved in the checkpoint with sums made after the resume.
    out = tmp_path / "killed"
    out.mkdir()
    console = out / "console.log"
    run = start_script("train.py", str(config), f"output={out}", log_file=console,
                       env={**env, "MULTITASK_TEST_SLEEP": "0.1"})  # fmt: skip
    sigkill_after(run, lambda: wait_for_line(run, console, "checkpoint saved (step 10)"))
    killed = only_run_dir(out)
    proc = run_script("train.py", str(killed / "config.yaml"), env=env)
    assert proc.returncode == 0, explain(proc)
    got = torch.load(killed / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    want = torch.load(ref / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert_same_states(got, want, ("model", "optimizer"))
    keep = (
        "epoch",
        "step",
        "train_loss",
        "train_loss_a",
        "train_loss_b",
        "val_loss",
        "val_loss_a",
        "val_loss_b",
    )
    curve = [{k: e[k] for k in keep if k in e} for e in read_metrics(killed)]
    assert curve == [{k: e[k] for k in keep if k in e} for e in events]
