"""Schedule-free optimizers keep two sets of weights: they train one and evaluate (and save) the other.

Switching back to the training weights recomputes them in floating point, which is not exact; so the
training weights are copied before the switch and put back bit for bit, and evaluating or saving
never changes training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from src.optim import is_schedule_free, set_optimizer_mode


def eval_weights(optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """Switch to the evaluation weights, returning the training ones (None: not schedule-free)."""
    if not is_schedule_free(optimizer):
        return None
    kept = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    set_optimizer_mode(optimizer, False)
    return kept


def train_weights(optimizer: torch.optim.Optimizer, kept: list[torch.Tensor] | None) -> None:
    """Back to training mode, with the training weights `kept` copied back exactly."""
    set_optimizer_mode(optimizer, True)
    if kept is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            torch._foreach_copy_(params, [k.to(p.device) for p, k in zip(params, kept, strict=True)])


@contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[list[torch.Tensor] | None]:
    """The evaluation weights inside the block; yields the training weights it restores afterwards."""
    kept = eval_weights(optimizer)
    try:
        yield kept
    finally:
        train_weights(optimizer, kept)
