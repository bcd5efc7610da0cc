"""The named parts of a dict loss (a multi-task WeightedSum, a distillation loss), summed for logging.

Parts are summed on the device, weighted by samples, like the total loss, and read only when the
total is: logging a part costs no extra host-device sync.
"""

from __future__ import annotations

from typing import Any

import torch

from src.distributed.process_group import all_reduce_sum


def add_parts(sums: dict[str, torch.Tensor], value: Any, n: int) -> None:
    """Add a dict loss's named parts, weighted by the batch's `n` samples, to device-side float64 sums."""
    if isinstance(value, dict):
        for name, part in value.items():
            part = part.detach().double() * n
            if name in sums:
                sums[name] += part
            else:
                sums[name] = part


def part_metrics(sums: dict[str, torch.Tensor], samples: float, phase: str) -> dict[str, float]:
    """`<phase>_loss_<name>` per-sample means of the summed parts (summed over ranks first)."""
    return {f"{phase}_loss_{n}": v / max(samples, 1) for n, v in summed_parts(sums).items()}


def summed_parts(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The parts' sums over every rank, as floats (a host sync)."""
    if not sums:
        return {}
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[n] for n in names]))
    return dict(zip(names, totals.tolist(), strict=True))
