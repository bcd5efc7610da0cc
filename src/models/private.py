"""What a private (DP-SGD) run does to its model, in the one place every builder of it goes through.

A private run's model is built the same way by the trainer, by test.py and by a distillation teacher,
so the layer types and parameter names of its checkpoints always match.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from src.errors import ConfigError

INSTALL = 'training.privacy needs Opacus, which is not installed: pip install -e ".[privacy]"'


def opacus() -> Any:
    """The opacus module, or one line saying how to install it."""
    try:
        import opacus as module
    except ImportError as err:
        raise ConfigError(INSTALL) from err
    return module


def private_model(model: nn.Module, fix: bool) -> nn.Module:
    """BatchNorm swapped for GroupNorm when asked (same parameter names); in-place activations off."""
    if fix:
        opacus()
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    for module in model.modules():  # in-place activations clash with Opacus's backward hooks
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model
