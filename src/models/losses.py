"""Every loss class of torch.nn, registered under its class name (CrossEntropyLoss, MSELoss, ...).

A loss is called as `loss_fn(outputs, targets)` and returns either a scalar tensor or a dict of
named scalar tensors; the trainer backpropagates the sum of the dict and logs each entry. The nn
losses already fit, so they are registered as they are; the config section's other keys are their
constructor arguments (`loss: {name: CrossEntropyLoss, label_smoothing: 0.1}`).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.loss import _Loss

from src.registry import LOSS_REGISTRY

TORCH_LOSSES: list[str] = sorted(
    name
    for name, obj in vars(nn).items()
    if isinstance(obj, type) and issubclass(obj, _Loss) and not name.startswith("_")
)

for _name in TORCH_LOSSES:
    LOSS_REGISTRY.add(_name, getattr(nn, _name))
