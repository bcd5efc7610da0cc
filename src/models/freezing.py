"""Freezing parameters by glob pattern, and the plan of when frozen ones start to train.

Patterns are `fnmatch` globs on the names of `model.named_parameters()` ("features.*", "fc.weight",
"*bn*"). A pattern that matches nothing is almost always a typo, so it is an error that lists the
parameter names closest to it. Frozen means `requires_grad=False`: no gradient is computed for the
parameter, and the optimizer (built over trainable parameters only) never sees it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from src.errors import ConfigError, closest


def match(names: Sequence[str], patterns: Iterable[Any], where: str) -> list[str]:
    """The names matched by any pattern, in model order; each pattern must match at least one name."""
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ConfigError(f"{where} must be a list of glob patterns, e.g. ['features.*'], got {patterns!r}")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}: {pattern!r} is not a glob pattern; write e.g. 'layer4.*'")
        hits = fnmatch.filter(names, pattern)
        if not hits:
            # Compare against the names and their prefixes (module paths), which is what people type.
            prefixes = {n.rsplit(".", k)[0] + ".*" for n in names for k in range(1, n.count(".") + 1)}
            near = closest(pattern, [*prefixes, *names], n=4)
            hint = (
                f"; close names: {', '.join(near)}"
                if near
                else f"; the model has e.g. {', '.join(names[:4])}"
            )
            raise ConfigError(
                f"{where}: pattern '{pattern}' matches no parameter{hint} "
                "(python script/show_model.py CONFIG lists the layers)"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def freeze(model: nn.Module, patterns: Iterable[Any], where: str = "model.freeze") -> list[str]:
    """Set requires_grad=False on the parameters the patterns match; returns their names."""
    named = dict(model.named_parameters())
    names = match(list(named), patterns, where)
    for name in names:
        named[name].requires_grad_(False)
    return names


def backbone_names(model: nn.Module) -> list[str]:
    """Every parameter name except those of the classifier head (the last Linear/Conv2d layer)."""
    from src.models.torchvision_models import find_head

    try:
        head, _ = find_head(model)
    except ValueError as err:
        raise ConfigError(
            f"training.freeze_backbone_epochs: {err}; use model.freeze and training.unfreeze"
        ) from None
    return [n for n, _ in model.named_parameters() if not (n == head or n.startswith(head + "."))]


@dataclass
class UnfreezeStage:
    """From the start of 0-based epoch `epoch` on, `names` train as a new group at lr x `lr_scale`."""

    epoch: int
    names: list[str]
    lr_scale: float


def plan_unfreezing(model: nn.Module, training: Any) -> list[UnfreezeStage]:
    """Freeze what the stages of `training.unfreeze` / `freeze_backbone_epochs` release later; return the stages.

    A stage takes the parameters its patterns match that are still frozen when it starts (frozen by
    model.freeze, by freeze_backbone_epochs, or by nothing earlier). Stages are in epoch order.
    """
    named = dict(model.named_parameters())
    names = list(named)
    stages: list[UnfreezeStage] = []
    backbone_epochs = training.get("freeze_backbone_epochs", 0) or 0
    if backbone_epochs:
        backbone = [n for n in backbone_names(model) if named[n].requires_grad]
        for n in backbone:
            named[n].requires_grad_(False)
        stages.append(UnfreezeStage(int(backbone_epochs), backbone, 1.0))
    specs = training.get("unfreeze") or []
    frozen = {n for n in names if not named[n].requires_grad}
    raw: list[tuple[int, list[str], float, str]] = []
    for i, spec in enumerate(specs):
        where = f"training.unfreeze[{i}]"
        if (
            not hasattr(spec, "keys")
            or set(spec.keys()) - {"epoch", "params", "lr_scale"}
            or "params" not in spec
        ):
            raise ConfigError(
                f"{where} must be a mapping {{epoch: N, params: [globs], lr_scale: 1.0}}, got {spec!r}"
            )
        epoch, scale = spec.get("epoch"), spec.get("lr_scale", 1.0)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ConfigError(f"{where}.epoch must be a whole number of finished epochs >= 1, got {epoch!r}")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ConfigError(f"{where}.lr_scale must be a number > 0, got {scale!r}")
        raw.append((epoch, match(names, spec["params"], f"{where}.params"), float(scale), where))
    for epoch, matched, scale, where in sorted(raw, key=lambda r: r[0]):
        taken = {n for s in stages for n in s.names}
        mine = [n for n in matched if n in frozen and n not in taken]
        if not mine:
            raise ConfigError(
                f"{where}.params matches no frozen parameter (an earlier stage took them, or none was frozen); "
                "freeze them first with model.freeze: [...]"
            )
        stages.append(UnfreezeStage(epoch, mine, scale))
    stages.sort(key=lambda s: s.epoch)
    return stages
