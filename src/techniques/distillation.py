"""Knowledge distillation: a finished run teaches the one being trained.

`distillation: {teacher: result/<ds>/<run>/config.yaml, temperature: 4.0, alpha: 0.7}` builds the
teacher from that run's config and its checkpoints/best.pth, in eval mode with no gradients. Each
training step runs it on the same inputs, under the same autocast, and the loss becomes

    (1 - alpha) * task loss  +  alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

logged as train_loss_task and train_loss_distill. The teacher is not part of the student's model,
so it is never in the student's checkpoints; validation reports the task loss alone, comparable
with a run trained without a teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.errors import ConfigError

log = logging.getLogger("template")


def teacher_files(section: Any) -> tuple[Path, Path]:
    """(config.yaml, best.pth) of the teacher run; a clear error when either is missing."""
    path = Path(str(section.teacher))
    config = path / "config.yaml" if path.is_dir() else path
    if not config.is_file():
        raise ConfigError(
            f"distillation.teacher: {path} not found; give a finished run's config.yaml (result/<dataset>/<run>/config.yaml)"
        )
    weights = config.parent / "checkpoints" / "best.pth"
    if not weights.is_file():
        raise ConfigError(
            f"distillation.teacher: {weights} not found; the teacher run has no best.pth (did it finish?)"
        )
    temperature, alpha = section.temperature, section.alpha
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ConfigError(f"distillation.temperature must be a number > 0, got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ConfigError(f"distillation.alpha must be in [0, 1], got {alpha!r}")
    return config, weights


def build_teacher(section: Any, num_classes: int | None, device: torch.device) -> nn.Module:
    """The teacher model with its best weights, on `device`, in eval mode, frozen."""
    from src.checkpoint.checkpointer import safe_load
    from src.config import load_config
    from src.models.build import build_model
    from src.user_modules import import_user_modules

    config, weights = teacher_files(section)
    teacher_cfg = load_config(config)
    import_user_modules(list(teacher_cfg.imports))
    # built as the teacher run built it: a private run's model had its BatchNorm swapped
    teacher = build_model(
        teacher_cfg.model, num_classes, privacy=(teacher_cfg.get("training") or {}).get("privacy")
    )
    state = safe_load(weights)
    try:
        teacher.load_state_dict(state.get("model", state))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(
            f"distillation.teacher: {weights} does not fit model '{teacher_cfg.model.name}' built for "
            f"{num_classes} classes ({first[1].strip() if len(first) > 1 else first[0]}); "
            "the teacher must be trained on the same classes"
        ) from None
    teacher.to(device).eval().requires_grad_(False)
    log.info("distillation: teacher %s from %s (T=%g, alpha=%g)", teacher_cfg.model.name, weights,
             section.temperature, section.alpha)  # fmt: skip
    return teacher


class Distiller:
    """Call as `distiller(inputs, outputs, targets)` in place of `loss_fn(outputs, targets)`."""

    def __init__(self, teacher: nn.Module, loss_fn: Any, temperature: float, alpha: float) -> None:
        self.teacher, self.loss_fn = teacher, loss_fn
        self.temperature, self.alpha = float(temperature), float(alpha)

    def __call__(self, inputs: Any, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return self.loss(outputs, teacher_logits, targets)

    def loss(self, student: Any, teacher: Any, targets: Any) -> dict[str, torch.Tensor]:
        """Both logits and the targets -> the weighted task and distillation parts."""
        if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
            raise ConfigError("distillation needs student and teacher models that return a tensor of logits")
        task = self.loss_fn(student, targets)
        task = sum(task.values()) if isinstance(task, dict) else task
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student.float() / t, dim=1),
            F.log_softmax(teacher.float() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return {"task": (1 - self.alpha) * task, "distill": self.alpha * t * t * soft}


def build_distiller(
    section: Any, loss_fn: Any, num_classes: int | None, device: torch.device
) -> Distiller | None:
    """None unless the `distillation` section (None where the config has none) names a teacher."""
    if section is None or not section.get("teacher"):
        return None
    teacher = build_teacher(section, num_classes, device)
    return Distiller(teacher, loss_fn, section.temperature, section.alpha)
