"""The evaluator interface: `update` per batch, `compute` once per validation, `reset` before the next.

A subclass either overrides those three (streaming, e.g. with torchmetrics, which syncs ranks by
itself), or only `evaluate(predictions, targets)`: then the base class keeps every batch, gathers
them from all ranks and hands the full tensors over, which is simple and fine for small val sets.
The trainer builds an evaluator as `EVALUATOR_REGISTRY.build(cfg.evaluator, metrics=[...])`, so a
constructor must accept `metrics` (the names in `evaluation.metrics`); this base class does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class BaseEvaluator:
    """Collects outputs and targets, and computes metrics over all of them on every rank."""

    def __init__(self, metrics: Sequence[str] = ()) -> None:
        self.metrics = list(metrics)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs_seen, targets_seen = self._seen()
        outputs_seen.append(outputs.detach().cpu())
        targets_seen.append(targets.detach().cpu())

    def compute(self) -> dict[str, float]:
        """Call on every rank: it gathers from all of them when a process group is running."""
        outputs_seen, targets_seen = self._seen()
        results = self.evaluate(_gather_cat(outputs_seen), _gather_cat(targets_seen))
        return {key: float(value) for key, value in results.items()}

    def reset(self) -> None:
        self._outputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def evaluate(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The metrics of all outputs (`predictions`) against all targets; override this or the three above."""
        raise NotImplementedError(
            f"{type(self).__name__} must override evaluate(predictions, targets) or update/compute/reset"
        )

    def _seen(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Lazily, so a subclass whose __init__ skips super().__init__() still works.
        if not hasattr(self, "_outputs"):
            self.reset()
        return self._outputs, self._targets


def _gather_cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """This rank's chunks concatenated, then those of every rank in rank order."""
    local = torch.cat(chunks) if chunks else torch.empty(0)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    everyone: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    parts = [t for t in everyone if t is not None and t.numel() > 0]
    return torch.cat(parts) if parts else local
