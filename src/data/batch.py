"""What a batch is: (inputs, targets) in any nesting of tensors, dicts and sequences, and its loss.

The train step, evaluation, BatchNorm recomputation, FLOP counting and the lr finder all read
batches; these helpers are the one place that knows their shapes.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: to_device(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, channels_last) for v in obj)
    return obj


def take(obj: Any, n: int) -> Any:
    """The first n samples of a batch (tensor, dict or sequence of tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj[:n]
    if isinstance(obj, dict):
        return {k: take(v, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(take(v, n) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) from a tuple/list batch or a dict with input/target keys."""
    if isinstance(batch, dict):
        inputs = batch.get("input", batch.get("image", batch.get("x")))
        targets = batch.get("target", batch.get("label", batch.get("y")))
        return inputs, targets
    return batch[0], batch[1]


def batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0])
    if isinstance(targets, dict):
        return batch_size(next(iter(targets.values())))
    return len(targets)


def total_loss(value: Any) -> torch.Tensor:
    """A loss function may return a scalar or a dict of named scalars; the sum is what trains."""
    if isinstance(value, dict):
        return sum(value.values())  # type: ignore[return-value]
    return value


def float_outputs(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor) and outputs.is_floating_point():
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: float_outputs(v) for k, v in outputs.items()}
    return outputs


def rank_batch_sizes(samples: int, batch: int, drop_last: bool) -> list[int]:
    """Sizes of the batches one rank sees in a whole epoch."""
    full, rest = divmod(samples, batch)
    return [batch] * full + ([rest] if rest and not drop_last else [])
