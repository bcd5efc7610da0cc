"""One pass over an evaluation split: loss and evaluator metrics, exact across ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from src.data.batch import batch_size, float_outputs, split_batch, take, to_device, total_loss
from src.distributed.process_group import all_reduce_sum
from src.engine.loss_parts import add_parts, part_metrics
from src.engine.precision import Precision
from src.engine.signals import Stopped


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
    stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """`<phase>_loss` and `<phase>_<metric>` over this rank's `num_valid` real samples, summed over ranks.

    Every rank runs the same number of batches (the sampler pads), so FSDP's collectives line up;
    the padded duplicates at the end are dropped before they are counted. `bar` (a `Progress`) advances
    once per batch. `stop`, asked before each batch, ends the pass with `Stopped` when it says so.
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
        if stop is not None and stop():
            raise Stopped
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
