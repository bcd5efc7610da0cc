"""Knowledge distillation: a distilled student follows its teacher, resumes exactly, and never saves the teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src import DATASET_REGISTRY  # registers the built-in datasets on first access
from src.models.build import build_model
from src.techniques.distillation import Distiller
from tests.helpers import (
    assert_same_states,
    explain,
    only_run_dir,
    run_script,
    sigkill_after,
    start_script,
    wait_for_line,
)

BASE = [
    "logging.mlflow=false",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "model=MLP",
    "model.in_features=16",
    "model.hidden=[32]",
    "dataset.input_shape=[16]",
    "dataset.train_size=256",
    "dataset.val_size=64",
    "dataset.test_size=64",
    "batch=32",
    "evaluation.metrics=[accuracy]",
]


def test_distillation_loss_weights_task_and_softened_teacher():
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    d = Distiller(torch.nn.Identity(), torch.nn.CrossEntropyLoss(), temperature=2.0, alpha=0.25)
    parts = d.loss(student, teacher, targets)
    p_t = torch.softmax(teacher / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 2, 1))).sum(1).mean()
    assert torch.allclose(parts["distill"], 0.25 * 4 * kl, atol=1e-6)
    assert torch.allclose(parts["task"], 0.75 * torch.nn.functional.cross_entropy(student, targets))
    assert d.loss(teacher, teacher, targets)["distill"].abs() < 1e-6  # agreeing logits cost nothing


def predictions(run: Path, inputs: torch.Tensor) -> torch.Tensor:
    cfg = OmegaConf.load(run / "config.yaml")
    model = build_model(cfg.model, 10)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pth", weights_only=True)["model"])
    return model.eval()(inputs).argmax(1)


@pytest.mark.slow
def test_a_distilled_student_follows_its_teacher_and_resumes_exactly(tmp_path):
    # The teacher barely trains (lr 1e-9): its predictions are its random init's, not the labels.
    proc = run_script("train.py", "config/dummy.yaml", f"output={tmp_path / 't'}", *BASE, "epoch=1", "seed=7",
                      "optimizer.lr=1e-9")  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    teacher = only_run_dir(tmp_path / "t")
    student_args = [*BASE, "epoch=3", "optimizer.lr=0.01", "logging.log_frequency=1"]
    distill = [
        f"distillation.teacher={teacher / 'config.yaml'}",
        "distillation.alpha=1.0",
        "distillation.temperature=2.0",
    ]

    proc = run_script("train.py", "config/dummy.yaml", f"output={tmp_path / 'plain'}", *student_args)
    assert proc.returncode == 0, explain(proc)
    proc = run_script("train.py", "config/dummy.yaml", f"output={tmp_path / 'kd'}", *student_args, *distill)
    assert proc.returncode == 0, explain(proc)
    plain, kd = only_run_dir(tmp_path / "plain"), only_run_dir(tmp_path / "kd")

    cfg = OmegaConf.load(teacher / "config.yaml")
    val = DATASET_REGISTRY.build(cfg.dataset, split="val", transform=None)
    inputs = torch.stack([val[i][0] for i in range(len(val))])
    taught = predictions(teacher, inputs)
    agree_kd = (predictions(kd, inputs) == taught).float().mean().item()
    agree_plain = (predictions(plain, inputs) == taught).float().mean().item()
    assert agree_kd > 0.5 and agree_kd > agree_plain + 0.3, (agree_kd, agree_plain)

    saved = torch.load(kd / "checkpoints" / "last.pth", weights_only=True)
    assert set(saved["model"]) == set(
        torch.load(plain / "checkpoints" / "last.pth", weights_only=True)["model"]
    )
    assert "train_loss_distill=" in (kd / "train.log").read_text()

    # SIGKILL mid-epoch 2 and resume: the same weights as the uninterrupted distilled run.
    out = tmp_path / "killed"
    out.mkdir()
    console = out / "console.log"
    run = start_script("train.py", "config/dummy.yaml", f"output={out}", *student_args, *distill,
                       "checkpoint.save_every_n_steps=1", "dataloader.num_workers=0", log_file=console)  # fmt: skip
    sigkill_after(run, lambda: wait_for_line(run, console, "checkpoint saved (step 11)"))
    killed = only_run_dir(out)
    assert not (killed / "summary.txt").exists()
    proc = run_script("train.py", str(killed / "config.yaml"))
    assert proc.returncode == 0, explain(proc)
    got = torch.load(killed / "checkpoints" / "last.pth", weights_only=True)
    assert_same_states(got, saved, ("model", "optimizer"))
