"""Where a run is: saved in every checkpoint as "progress", so a resume continues from exactly there."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues from exactly here."""

    epoch: int = 0  # the epoch in progress, counted from 0
    batches_done: int = 0  # batches of that epoch already trained (always a whole accumulation window)
    global_step: int = 0  # optimizer steps so far
    epoch_loss_sum: float = 0.0  # this epoch's summed train loss over the batches done
    epoch_samples: int = 0
    window_loss_sum: float = 0.0  # the unlogged part of the current logging window, summed over ranks
    window_samples: int = 0
    window_parts: dict[str, float] = field(default_factory=dict)  # a dict loss's parts in that window
    best_value: float | None = None
    best_epoch: int = 0
    top_k: list[list[Any]] = field(default_factory=list)  # [value, file name], best first
    stale_epochs: int = 0  # early stopping: validations without improvement
    stale_best: float | None = None
    finished: bool = False
    planned_epochs: int = 0  # the `epoch` the schedule was planned for (a change re-plans it on resume)
    early_stopped: bool = False  # early stopping ended the run: a re-run trains on only if `epoch` grows

    def end_epoch(self, epoch: int) -> None:
        """Epoch `epoch` is trained: the position moves to the next one's start, the sums start over."""
        self.epoch, self.batches_done = epoch + 1, 0
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0
        self.window_loss_sum, self.window_samples, self.window_parts = 0.0, 0, {}

    def epoch_train_loss(self) -> dict[str, float]:
        """`train_epoch_loss`, the mean over the epoch's samples (none before a window was logged)."""
        return {"train_epoch_loss": self.epoch_loss_sum / self.epoch_samples} if self.epoch_samples else {}

    def restore(self, progress: dict[str, Any]) -> None:
        """Take a checkpoint's "progress" in place (the loop, the window and the Checkpointer share this object)."""
        loaded = TrainState(**progress)
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Is `value` better than `best` (None: nothing yet) by more than `min_delta` in direction `mode`?

    A NaN or infinite value never is: a run whose validation broke down has no "best" there.
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """training.early_stopping: stop after `patience` validations without improvement of `monitor`."""

    def __init__(self, es_cfg: Any, progress: TrainState) -> None:
        self.monitor, self.mode = str(es_cfg.monitor), str(es_cfg.mode)
        self.patience, self.min_delta = int(es_cfg.patience or 0), float(es_cfg.min_delta)
        self.progress = progress  # its count lives in the checkpoint: stale_best, stale_epochs

    def should_stop(self, metrics: dict[str, float]) -> bool:
        st, value = self.progress, metrics.get(self.monitor)
        if not self.patience or value is None:
            return False
        if improved(value, st.stale_best, self.mode, self.min_delta):
            st.stale_best, st.stale_epochs = value, 0
            return False
        st.stale_epochs += 1
        return st.stale_epochs >= self.patience
