"""The one interface the trainer logs through, and the fan-out that lets it hold several backends.

Every method is a no-op here so a backend overrides only what it can store. The checkpoint
protocol is: `state()` goes into each checkpoint, `commit()` runs once that checkpoint is on disk,
and `resume(state)` runs once when a run restarts from it. Between them a backend can make sure that
events logged after the checkpoint and lost in a crash are not stored twice when the resumed run
logs them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_stop_signals = 0  # stop signals received so far; a tracker's wait in progress ends at the next one


def stop_signal_received() -> None:
    """Called by the stop-signal handler: a tracker waiting on its store gives up, so the run can end."""
    global _stop_signals
    _stop_signals += 1


def stop_signals_received() -> int:
    return _stop_signals


class Tracker:
    """A place metrics go. Only rank 0 holds trackers."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's flattened configuration ("optimizer.lr": 0.001)."""

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """Record one event: the metrics measured at this global step."""

    def log_artifact(self, path: str | Path) -> None:
        """Keep a copy of a file (or folder) with the run."""

    def log_image(self, name: str, png: bytes, step: int) -> None:
        """Keep a picture, given as the bytes of a PNG file (rendered once, by the caller)."""

    def commit(self) -> None:
        """Called right after a checkpoint holding `state()` is durably written."""

    def state(self) -> dict[str, Any]:
        """Small JSON-able dict saved inside each checkpoint; taken at a step boundary, so it never waits."""
        return {}

    def settle(self) -> None:
        """Wait until `state()` knows everything it will hold (MLflow's run id); before a run's last checkpoint."""

    def resume(self, state: dict[str, Any]) -> None:
        """Called once at start when resuming from a checkpoint that saved `state()`."""

    def finish(self, status: str | None) -> None:
        """End the run: "FINISHED", "FAILED" or "KILLED"; None keeps a reopened run's earlier status."""


class MultiTracker(Tracker):
    """Sends every call to each tracker in order; its state is keyed by tracker class name."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step, epoch)

    def log_artifact(self, path: str | Path) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path)

    def log_image(self, name: str, png: bytes, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, png, step)

    def commit(self) -> None:
        for tracker in self.trackers:
            tracker.commit()

    def state(self) -> dict[str, Any]:
        return {type(tracker).__name__: tracker.state() for tracker in self.trackers}

    def settle(self) -> None:
        for tracker in self.trackers:
            tracker.settle()

    def resume(self, state: dict[str, Any]) -> None:
        for tracker in self.trackers:
            own = state.get(type(tracker).__name__)
            if own is not None:
                tracker.resume(own)

    def finish(self, status: str | None) -> None:
        """Finish every tracker even if one fails, so no backend is left open; then re-raise."""
        error: BaseException | None = None
        for tracker in self.trackers:
            try:
                tracker.finish(status)
            except Exception as err:
                error = error or err
        if error is not None:
            raise error
