"""One split of the config's dataset with its sampler and loader, as this process sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from src.config.sections import to_plain
from src.data.datasets import build_dataset
from src.data.loader import build_loader
from src.data.sampler import ResumableSampler


@dataclass
class Split:
    dataset: Any
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    generator: torch.Generator | None


def build_split(
    section: Any,
    split: str,
    shuffle: bool,
    transforms: dict,
    loader_section: Any,
    batch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device_type: str = "cpu",
) -> Split:
    """`split` of the `dataset` section, loaded as the `dataloader` section (`loader_section`) says, in
    batches of `batch`; `rank` of `world_size` processes reads its share, on `device_type`."""
    dataset = build_dataset(section, split=split, transform=transforms.get(split))
    if len(dataset) == 0:
        from src.errors import RunError

        raise RunError(
            f"dataset '{section.name}' has no samples in its {split} split; check where it reads from "
            "(dataset.root) and its size settings"
        )
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=int(seed), rank=rank, world_size=world_size
    )
    loader_cfg = dict(to_plain(loader_section) or {})
    if split != "train":  # drop_last is for training only: evaluation sees every sample once
        loader_cfg["drop_last"] = False
    if shuffle:  # training: random augmentation is a function of (seed, epoch, index), see src/data/seeded.py
        from src.data.seeded import EpochIndexSampler, SeededItems

        items, order = SeededItems(dataset, int(seed)), EpochIndexSampler(sampler)
    else:
        items, order = dataset, sampler
    loader = build_loader(items, int(batch), order, loader_cfg, seed=int(seed), device_type=device_type)
    return Split(dataset, sampler, loader, getattr(loader, "generator", None))
