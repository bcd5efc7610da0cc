"""Optimizer parameter groups: layer-wise settings from `optimizer.param_groups`, and groups added mid-run.

Every group records the lr it was configured with under the key `base_lr` (torch keeps extra group
keys and saves them in the optimizer's state dict). A group added later by progressive unfreezing
joins the schedule where it stands: its lr, and every lr a scheduler keeps per group, is group 0's
value scaled by the ratio of the two configured lrs, so each scheduler goes on scaling every group.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from src.errors import ConfigError
from src.models.freezing import UnfreezeStage, match

log = logging.getLogger("template")

# Per-group values a scheduler or optimizer keeps that scale with the group's lr.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")
SCHEDULER_LISTS = ("base_lrs", "_last_lr", "min_lrs")


def split_groups(
    named: Sequence[tuple[str, nn.Parameter]],
    specs: Sequence[Any],
    check: Callable[[dict[str, Any], str], None],
) -> tuple[list[dict[str, Any]], list[tuple[str, nn.Parameter]]]:
    """(explicit groups, the trainable parameters no group took). A parameter goes to the first group matching it.

    `check(settings, where)` validates a group's own settings against the optimizer's arguments.
    """
    if not isinstance(specs, Sequence) or isinstance(specs, str):
        raise ConfigError(
            f"optimizer.param_groups must be a list of {{params: [globs], lr: ...}}, got {specs!r}"
        )
    names = [n for n, _ in named]
    by_name = dict(named)
    taken: set[str] = set()
    groups = []
    for i, spec in enumerate(specs):
        where = f"optimizer.param_groups[{i}]"
        if not isinstance(spec, dict) or "params" not in spec:
            raise ConfigError(f"{where} must be a mapping with 'params' (a list of globs), got {spec!r}")
        settings = {k: v for k, v in spec.items() if k != "params"}
        check(settings, where)
        mine = [n for n in match(names, spec["params"], f"{where}.params") if n not in taken]
        if not mine:
            raise ConfigError(f"{where}.params: every parameter it matches is already in an earlier group")
        taken.update(mine)
        groups.append(
            {"params": [by_name[n] for n in mine], **settings, "name": _pattern_name(spec["params"], i)}
        )
    rest = [(n, p) for n, p in named if n not in taken]
    return groups, rest


def _pattern_name(patterns: Sequence[str], index: int) -> str:
    """A group's name in logs and metric keys (`lr/<name>`): its first pattern without glob characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(patterns[0])).strip("._")
    return name or f"group{index}"


def group_name(group: dict[str, Any], index: int) -> str:
    """The name a group was given at build time (`default`, a pattern, `unfrozen_epoch3`), else its index."""
    return str(group.get("name") or f"group{index}")


def describe(
    model: nn.Module, optimizer: torch.optim.Optimizer, freeze: Sequence[str], stages: Sequence[UnfreezeStage]
) -> list[str]:
    """The start-of-run lines of a fine-tuning set-up: what is frozen (by which of the `freeze` patterns,
    model.freeze), what unfreezes when, and each optimizer group's lr. Nothing when every parameter
    trains in one group."""
    named = dict(model.named_parameters())
    names = list(named)
    lines = []
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        counts = [f"'{p}' {len(fnmatch.filter(frozen, p))}" for p in freeze or []]
        lines.append(
            f"frozen at start: {len(frozen)} of {len(names)} parameter tensors "
            f"({sum(named[n].numel() for n in frozen):,} values)"
            + (f"; by {', '.join(counts)}" if counts else "")
        )
    for stage in stages:
        lines.append(f"unfreezes at the start of epoch {stage.epoch + 1}: {len(stage.names)} parameter tensors "
                     f"({stage.names[0]} ...) at lr x {stage.lr_scale:g}")  # fmt: skip
    groups = optimizer.param_groups
    if len(groups) > 1:
        lines.append("optimizer groups: " + ", ".join(
            f"{group_name(g, i)} lr {float(g['lr']):.4g} ({len(g['params'])} tensors)" for i, g in enumerate(groups)
        ))  # fmt: skip
    return lines


def mark_base_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Remember each group's configured lr, also after a scheduler has changed `lr` (a warm-up starts low).

    torch schedulers keep the configured lr as `initial_lr`; OneCycleLR keeps it as `max_lr` instead.
    """
    for group in optimizer.param_groups:
        configured = group.get("max_lr", group.get("initial_lr", group["lr"]))
        group.setdefault("base_lr", float(configured))


def add_group(
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    params: list[nn.Parameter],
    lr_scale: float,
    name: str = "",
) -> None:
    """Add `params` as a new group (`name`) at the top-level lr x `lr_scale`, at the schedule's current point."""
    first = optimizer.param_groups[0]
    base = float(optimizer.defaults["lr"]) * lr_scale
    ratio = base / float(first.get("base_lr", first["lr"]))
    group: dict[str, Any] = {"params": params}
    for key, value in first.items():
        if key in LR_KEYS:
            group[key] = float(value) * ratio
        elif key != "params" and key not in optimizer.defaults:  # a scheduler's own keys (OneCycle's momenta)
            group[key] = value
    group["base_lr"] = base
    group["name"] = name or f"group{len(optimizer.param_groups)}"
    optimizer.add_param_group(group)
    for scheduler in _schedulers(schedule):
        for attr in SCHEDULER_LISTS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and len(values) == len(optimizer.param_groups) - 1:
                values.append(values[0] * ratio if attr != "min_lrs" else values[0])


def _schedulers(schedule: Any) -> list[Any]:
    """The scheduler objects inside an LRSchedule (a SequentialLR's parts included)."""
    if schedule is None:
        return []
    top = schedule.scheduler
    found = [top, *getattr(top, "_schedulers", [])]
    return list({id(s): s for s in found}.values())


def unfreeze_due(
    stages: list[UnfreezeStage], model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, epoch: int
) -> list[nn.Parameter]:
    """Let the stages due by `epoch` train, each as a new optimizer group; returns the trainable parameters."""
    named = dict(model.named_parameters())
    for stage in stages:
        if stage.epoch <= epoch and not named[stage.names[0]].requires_grad:
            new = [named[n].requires_grad_(True) for n in stage.names]
            add_group(optimizer, schedule, new, stage.lr_scale, f"unfrozen_epoch{stage.epoch + 1}")
            log.info("epoch %d: unfroze %d parameter tensors (%s ...) at lr x %g",
                     epoch + 1, len(new), stage.names[0], stage.lr_scale)  # fmt: skip
    return [p for p in model.parameters() if p.requires_grad]
