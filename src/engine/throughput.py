"""Throughput over windows long enough to mean something.

An epoch whose step count is not a multiple of `logging.log_frequency` ends in a short logging
window; one step timed alone swings with every hiccup (100 samples/s in one epoch, 3,900 in the
next). Such a window's rates are held back and folded into the next window's instead.
"""

from __future__ import annotations

RATE_KEYS = ("samples_per_sec", "step_time", "data_wait_share", "mfu")


class RateWindow:
    """Carries the time, samples and steps of windows shorter than `min_steps` into the next one."""

    def __init__(self, log_every: int) -> None:
        self.min_steps = max(1, log_every // 2)
        self._reset()

    def _reset(self) -> None:
        self.elapsed = self.samples = self.data_wait = self.flop_share = 0.0
        self.steps = 0

    def settle(self, metrics: dict[str, float], steps: int, short_ok: bool) -> dict[str, float]:
        """`metrics` with its rates over this window plus any held back; none if still too short.

        `short_ok` is False for an epoch's trailing partial window, the only one that can be short.
        """
        if "step_time" not in metrics:
            return metrics
        elapsed = metrics["step_time"] * max(steps, 1)
        self.elapsed += elapsed
        self.samples += metrics["samples_per_sec"] * elapsed
        self.data_wait += metrics["data_wait_share"] * elapsed
        self.flop_share += metrics.get("mfu", 0.0) * elapsed
        self.steps += steps
        if not short_ok and self.steps < self.min_steps:  # too short to time: added to the next window
            return {k: v for k, v in metrics.items() if k not in RATE_KEYS}
        total = max(self.elapsed, 1e-9)
        rates = {
            "samples_per_sec": self.samples / total,
            "step_time": total / max(self.steps, 1),
            "data_wait_share": min(1.0, self.data_wait / total),
            "mfu": self.flop_share / total,
        }
        self._reset()
        return {k: rates.get(k, v) for k, v in metrics.items()}  # same keys, same order
