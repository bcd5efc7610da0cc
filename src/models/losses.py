"""Every loss class of torch.nn, registered under its class name (CrossEntropyLoss, MSELoss, ...).

A loss is called as `loss_fn(outputs, targets)` and returns either a scalar tensor or a dict of
named scalar tensors; the trainer backpropagates the sum of the dict and logs each entry. The nn
losses already fit, so they are registered as they are; the config section's other keys are their
constructor arguments (`loss: {name: CrossEntropyLoss, label_smoothing: 0.1}`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from src.config.sections import component_args
from src.errors import ConfigError, RunError
from src.registry import LOSS_REGISTRY

TORCH_LOSSES: list[str] = sorted(
    name
    for name, obj in vars(nn).items()
    if isinstance(obj, type) and issubclass(obj, _Loss) and not name.startswith("_")
)

for _name in TORCH_LOSSES:
    LOSS_REGISTRY.add(_name, getattr(nn, _name))


class WeightedSum(nn.Module):
    """Multi-task loss: one loss per named output, each weighted; returns the weighted parts as a dict.

    `outputs` and `targets` are dicts keyed by the part names (`losses: {a: ..., b: ...}`). The trainer
    trains on the sum of the parts and logs each as train_loss_<name> / val_loss_<name>.
    """

    def __init__(self, losses: dict[str, Any], weights: dict[str, float] | None = None) -> None:
        super().__init__()
        if not isinstance(losses, dict) or not losses:
            raise ConfigError(
                "loss.losses must map each task name to a loss, e.g. {a: {name: CrossEntropyLoss}}"
            )
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ConfigError(
                f"loss.weights names {', '.join(unknown)}, which loss.losses does not have ({', '.join(losses)})"
            )
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool):
                raise ConfigError(f"loss.weights.{name} must be a number, got {w!r}")
        self.parts = nn.ModuleDict(
            {
                name: LOSS_REGISTRY.build({"name": spec} if isinstance(spec, str) else dict(spec))
                for name, spec in losses.items()
            }
        )
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}

    def forward(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        if not isinstance(outputs, dict) or not isinstance(targets, dict):
            raise RunError(
                "loss WeightedSum needs dict outputs and dict targets keyed by task name; "
                f"got {type(outputs).__name__} outputs and {type(targets).__name__} targets"
            )
        missing = [n for n in self.parts if n not in outputs or n not in targets]
        if missing:
            raise RunError(
                f"loss WeightedSum: task(s) {', '.join(missing)} missing from the model's outputs "
                f"({', '.join(outputs)}) or the targets ({', '.join(targets)})"
            )
        return {n: self.weights[n] * fn(outputs[n], targets[n]) for n, fn in self.parts.items()}


LOSS_REGISTRY.add("WeightedSum", WeightedSum)


def build_loss(section: Any) -> Any:
    """The `loss` section built: a torch.nn loss, WeightedSum, or a registered custom one."""
    return LOSS_REGISTRY.build(component_args(section, "loss"))
