"""BatchNorm statistics recomputed for the weights a schedule-free optimizer evaluates.

A schedule-free optimizer trains at one point (y) and evaluates at another (x, the average). The
BatchNorm running statistics gathered during training belong to y, so validating or saving x with
them misreports x. The schedule-free authors advise recomputing them for x on a few training
batches; `recompute_batchnorm` does that, deterministically and without touching any global RNG
(an interrupted and an uninterrupted run draw the same numbers afterwards).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from src.checkpoint.rng import capture_rng, restore_rng
from src.data.batch import split_batch, to_device
from src.distributed import process_group as dist_utils

log = logging.getLogger("template")

# Training batches (per process) the statistics are recomputed on; the whole train split when smaller.
RECOMPUTE_BATCHES = 50


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module,
    loader: Any,
    max_batches: int,
    device: torch.device,
    precision: Any,
    channels_last: bool = False,
    world_size: int = 1,
) -> int:
    """Reset every BatchNorm's running statistics and refill them, as an equal-weight average over
    `max_batches` batches of `loader`, with the model's current weights; averaged over processes.

    Returns the number of batches used. The RNG states of the process are restored afterwards, so
    augmentations drawn here leave no trace in the run's random streams.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    rng = capture_rng()
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    model.train()
    used = 0
    try:
        for batch in loader:
            if used >= max_batches:
                break
            inputs, _ = split_batch(batch)
            with precision.autocast():
                model(to_device(inputs, device, channels_last))
            used += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
        restore_rng(rng)
    if world_size > 1:  # every process used its own batches: the statistics are their mean
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist_utils.all_reduce_sum(buf)
                    buf.div_(world_size)
    return used


def recompute_loader(dataset: Any, loader_section: Any, batch: int, seed: int, ctx: Any) -> Any:
    """A fixed random sample of the train split (the same every epoch, own generator), as this process's share.

    `loader_section`: the config's dataloader section; `batch` and `seed`: the run's.
    """
    from src.config.sections import to_plain
    from src.data import ResumableSampler, build_loader

    sampler = ResumableSampler(
        len(dataset), shuffle=True, seed=int(seed), rank=ctx.rank, world_size=ctx.world_size
    )
    loader_cfg = {**dict(to_plain(loader_section) or {}), "persistent_workers": False, "drop_last": False}
    return build_loader(dataset, int(batch), sampler, loader_cfg, seed=int(seed), device_type=ctx.device.type)
