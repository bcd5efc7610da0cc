"""DataLoader construction from the `dataloader:` config section, seeded for reproducible workers."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from src.data.workers import resolve_workers


def seed_worker(worker_id: int) -> None:
    """Put each worker's Python and NumPy RNGs on the seed torch derived for it from the loader's generator.

    Recent torch versions do much the same on their own; doing it here keeps augmentations written
    with `random` or `numpy` reproducible and distinct per worker whatever the version.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler[int] | None,
    loader_cfg: Mapping[str, Any] | None,
    seed: int,
    device_type: str,
) -> DataLoader:
    """A DataLoader over `sampler`; worker-only options are passed only when there are workers.

    The loader's generator draws one base seed for the workers at every new iteration, so a caller
    that wants workers' random streams to match after a resume re-seeds or restores `loader.generator`.
    """
    cfg = dict(loader_cfg or {})
    num_workers, persistent = resolve_workers(cfg, device_type)  # `auto`: see src/data/workers.py
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent
        if cfg.get("prefetch_factor") is not None:
            kwargs["prefetch_factor"] = int(cfg["prefetch_factor"])
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=bool(cfg.get("pin_memory", False)) and device_type == "cuda",
        drop_last=bool(cfg.get("drop_last", False)),
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
