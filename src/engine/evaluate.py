"""One pass over an evaluation split: loss and evaluator metrics, exact across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from src.engine.distributed import all_reduce_sum
from src.engine.loss_parts import add_parts, part_metrics
from src.engine.precision import Precision


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    num_valid: int,
    loss_fn: Any,
    evaluator: Any,
    precision: Precision,
    device: torch.device,
    phase: str,
    channels_last: bool = False,
    max_batches: int | None = None,
    collect: list | None = None,
    bar: Any = None,
) -> dict[str, float]:
    """`<phase>_loss` and `<phase>_<metric>` over this rank's `num_valid` real samples, summed over ranks.

    Every rank runs the same number of batches (the sampler pads), so FSDP's collectives line up;
    the padded duplicates at the end are dropped before they are counted. `bar` (a `Progress`) advances
    once per batch.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    remaining = num_valid
    parts: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if bar is not None:
            bar.update(1)
        inputs, targets = split_batch(batch)
        inputs = to_device(inputs, device, channels_last)
        targets = to_device(targets, device)
        with precision.autocast():
            outputs = model(inputs)
        n = batch_size(targets)
        keep = max(0, min(n, remaining))
        remaining -= keep
        if keep == 0:
            continue
        if keep < n:
            outputs, targets = take(outputs, keep), take(targets, keep)
        outputs = float_outputs(outputs)
        value = loss_fn(outputs, targets)
        loss_sum += total_loss(value).double() * keep
        add_parts(parts, value, keep)
        count += keep
        evaluator.update(outputs, targets)
        if collect is not None:
            collect.append(
                (outputs.detach().cpu() if isinstance(outputs, torch.Tensor) else outputs, targets.cpu())
            )
    all_reduce_sum(loss_sum)
    all_reduce_sum(count)
    metrics = {f"{phase}_{k}": float(v) for k, v in evaluator.compute().items()}
    metrics[f"{phase}_loss"] = float(loss_sum / count.clamp(min=1))
    metrics.update(part_metrics(parts, float(count), phase))
    model.train(was_training)
    return metrics
