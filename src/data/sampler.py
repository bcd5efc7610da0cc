"""A distributed sampler that can restart in the middle of an epoch at an exact sample.

The epoch's global order depends only on (seed, epoch), so a resumed run rebuilds it and skips
the samples already consumed by slicing; nothing about the order needs to be checkpointed beyond
the epoch and the consumed count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """DistributedSampler's order and padding, plus `set_start` to skip what an epoch already used.

    The global order is padded by wrapping around to a multiple of `world_size`, and rank r takes
    every world_size-th index from position r; so padding duplicates sit at the end of every rank's
    share, and `num_valid` says where they begin.
    """

    def __init__(
        self, dataset_len: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.total = -(-dataset_len // world_size) * world_size  # padded global length
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, samples_consumed: int) -> None:
        """Skip the first `samples_consumed` samples of this epoch, counted over all ranks."""
        if samples_consumed % self.world_size or not 0 <= samples_consumed <= self.total:
            raise ValueError(
                f"samples_consumed={samples_consumed} must be a multiple of world_size={self.world_size} "
                f"between 0 and {self.total}"
            )
        self.start = samples_consumed

    def global_order(self) -> torch.Tensor:
        """This epoch's full padded order, identical on every rank."""
        n = self.dataset_len
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        pad = self.total - n
        if pad and n:
            order = torch.cat([order, order.repeat(-(-pad // n))[:pad]])
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_order()[self.start :][self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return (self.total - self.start) // self.world_size

    @property
    def num_valid(self) -> int:
        """How many of the next iteration's indices on this rank are real samples, not padding."""
        remaining_real = self.dataset_len - self.start - self.rank
        return max(0, min(len(self), -(-remaining_real // self.world_size)))
