"""How many DataLoader workers `num_workers: auto` means, and the warning when the data cannot keep up.

On CUDA the GPU should never wait for a batch the main process is still decoding, so `auto` gives
each process about min(8, its share of the CPU cores) workers, kept alive between epochs
(persistent) and feeding pinned memory. On a CPU-only run the workers would take cores from the
training itself, so `auto` means 0 there.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

log = logging.getLogger("template")

MAX_AUTO_WORKERS = 8
DATA_WAIT_LIMIT = 0.2  # share of step time spent waiting for data above which the warning fires
DATA_WAIT_WINDOWS = 3  # consecutive logging windows above the limit before it does
DATA_WAIT_SECONDS = 5.0  # ... and only when those windows waited this long in all: a wait that costs time


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which a batch scheduler narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def auto_num_workers(device_type: str) -> int:
    """Workers per process for `num_workers: auto`: min(8, cores per local process) on CUDA, else 0."""
    if device_type != "cuda":
        workers = 0
    else:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        share = cpu_cores() // local
        if os.environ.get("TEMPLATE_CPUS_PER_PROCESS"):  # a launcher's allocation (Ray pins no cores)
            share = min(share, int(os.environ["TEMPLATE_CPUS_PER_PROCESS"]))
        workers = max(1, min(MAX_AUTO_WORKERS, share))
    log.info(
        "dataloader.num_workers=auto: %d worker(s) per process on %s%s",
        workers,
        device_type,
        ", persistent, pinned memory" if workers else " (training uses the cores itself)",
    )
    return workers


def resolve_workers(cfg: dict[str, Any], device_type: str) -> tuple[int, bool]:
    """(num_workers, persistent_workers) from a `dataloader:` section; `auto` makes workers persistent."""
    value = cfg.get("num_workers", 0)
    if isinstance(value, str) and value.strip().lower() == "auto":
        workers = auto_num_workers(device_type)
        return workers, workers > 0
    return int(value), bool(cfg.get("persistent_workers", False))


class DataWaitWatch:
    """Warns once when the training loop keeps waiting for data: `data_wait_share` above 0.2 in three
    logging windows in a row that waited 5 s or more in all (a tiny data set's epochs of milliseconds
    never cost that). Fed the metrics of every logging window and its length (`observe`).

    `configured` is the `dataloader.num_workers` setting (a number or "auto"), `workers` what it gave,
    so the advice never asks for what the run already has."""

    def __init__(
        self,
        configured: Any = None,
        workers: int | None = None,
        limit: float = DATA_WAIT_LIMIT,
        windows: int = DATA_WAIT_WINDOWS,
        seconds: float = DATA_WAIT_SECONDS,
    ) -> None:
        self.configured, self.workers = configured, workers
        self.limit, self.windows, self.seconds = limit, windows, seconds
        self.streak: list[float] = []  # seconds waited in each window of the current streak
        self.warned = False

    def observe(self, metrics: dict[str, float], elapsed: float) -> str | None:
        """The warning to log (once per run), or None; `elapsed`: the window's length in seconds."""
        share = metrics.get("data_wait_share")
        if share is None or self.warned:
            return None
        self.streak = [*self.streak, share * elapsed][-self.windows :] if share > self.limit else []
        if len(self.streak) < self.windows or sum(self.streak) < self.seconds:
            return None
        self.warned = True
        waited = f"waited for data {share:.0%} of the time ({sum(self.streak):.0f} s over the last {self.windows} logging windows)"
        cheaper = "make the dataset's __getitem__ cheaper (decode once, cache, move augmentation to the GPU)"
        if str(self.configured).strip().lower() == "auto":
            why = (
                "workers would take the cores training uses on a CPU-only run"
                if self.workers == 0
                else "min(8, this process's share of the CPU cores)"
            )
            return (
                f"the training loop {waited}: dataloader.num_workers=auto chose {self.workers} ({why}); "
                f"set a number instead (dataloader.num_workers=4), or {cheaper}"
            )
        now = f" (now {self.workers})" if self.workers is not None else ""
        return (
            f"the training loop {waited}: raise dataloader.num_workers{now}, or set it to auto, or {cheaper}"
        )
