"""Per-sample random streams: augmentation becomes a function of (seed, epoch, sample index).

With loader workers, a transform that draws from a worker's global RNG depends on which worker got
which batch and how far that worker's stream had run, so a run resumed in the middle of an epoch
would augment its remaining samples differently. Seeding the RNGs from (seed, epoch, index) right
before each item is made removes every such dependency: the same sample in the same epoch is
augmented identically by any worker, in any process, after any resume.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

MASK = 2**64 - 1
PROBED_ITEMS = 3  # items made at start to see whether the training set draws random numbers


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 over the three numbers)."""
    state = 0
    for value in (seed, epoch, index):
        state = (state ^ (int(value) & MASK)) + 0x9E3779B97F4A7C15 & MASK
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
        state = z ^ (z >> 31)
    return state >> 1


class EpochIndexSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) for every index of `sampler`, so a worker knows the epoch of each item."""

    def __init__(self, sampler: Any) -> None:
        super().__init__()
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededItems(Dataset):
    """Makes item (epoch, index) of `dataset` with torch, `random` and NumPy seeded for that sample.

    In the main process (no workers) the surrounding RNG states are restored afterwards, so the
    training loop's own random stream (dropout, ...) is not touched by data loading. A dataset whose
    items draw no random numbers at all (no augmentation) is passed through as it is: seeding costs
    a few microseconds per sample, which a small model's step feels.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.seeds = draws_random_numbers(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[Any]) -> list[Any]:
        """A batch at once (DataLoader's batched fetch): the RNG states are saved and restored once."""
        if not self.seeds:
            return [self.dataset[key[1] if isinstance(key, tuple) else key] for key in keys]
        if get_worker_info() is not None:  # a worker's streams serve nothing else
            return [self._make(key) for key in keys]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._make(key) for key in keys]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def _make(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        _seed_all(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def draws_random_numbers(dataset: Dataset, probes: int = PROBED_ITEMS) -> bool:
    """Whether making an item moves Python's, NumPy's or torch's global random stream.

    Tried on the first `probes` items (a random transform draws on every call, even when it then
    does nothing); the streams are left as they were.
    """
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        for index in range(min(probes, len(dataset))):  # type: ignore[arg-type]
            py, (_, keys, pos, *_), cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
            dataset[index]
            _, keys_after, pos_after, *_ = np.random.get_state()
            moved = random.getstate() != py or pos_after != pos or not np.array_equal(keys_after, keys)
            if moved or not torch.equal(torch.get_rng_state(), cpu):
                return True
        return False
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _seed_all(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)  # the CPU stream only: a CUDA one stays as it was
