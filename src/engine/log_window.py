"""The logging window: what was trained since the last log line, and how fast.

Losses and sample counts are summed on the device and read only when a window is logged (every
`logging.log_frequency` steps) or saved in a checkpoint: the only host-device syncs of training.
`totals()` is the one place they are summed across ranks. A resumed run continues the window its
checkpoint was saved in; those carried samples were trained by the process that saved them, so
they count in the loss but not in this process's throughput.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch

from src.checkpoint.train_state import TrainState
from src.data.workers import DataWaitWatch
from src.distributed import process_group as dist_utils
from src.engine.loss_parts import add_parts
from src.engine.throughput import RateWindow

log = logging.getLogger("template")


class LogWindow:
    """Sums of the current logging window (and of the accumulation window not yet stepped), and rates."""

    def __init__(
        self,
        ctx: Any,
        log_every: int,
        flops_per_sample: float | None,
        peak_flops: float | None,
        show_bars: bool,
    ) -> None:
        self.ctx = ctx
        self.log_every = log_every
        self.rates = RateWindow(log_every)  # an epoch's short last window is timed together with the next
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        zero = torch.zeros((), device=ctx.device, dtype=torch.float64)
        self.loss, self.samples, self.parts = zero, 0, {}  # logging window: stepped losses only
        self.step_loss, self.step_samples = zero.clone(), 0  # the accumulation window in progress
        self.step_parts: dict[str, torch.Tensor] = {}
        self.parts: dict[str, torch.Tensor] = {}
        self.steps, self.start, self.data_wait, self.carried = 0, time.perf_counter(), 0.0, 0
        self.trackers: Any = None  # rank 0's, once started
        # Warns when the loop keeps waiting for batches; the trainer gives it the loader's settings.
        self.data_wait_watch = DataWaitWatch()
        self.last_window_s = 0.0  # the last flushed window's length
        # A bar on a terminal only: piped output and train.log get the plain log lines instead.
        self.bars = ctx.is_main and show_bars and sys.stderr.isatty()

    def begin_epoch(self, progress: TrainState) -> None:
        """Start counting; mid-epoch, continue the window the checkpoint saved (rank 0 holds its sums)."""
        carried = self.ctx.is_main and progress.batches_done > 0
        device = self.ctx.device
        self.loss = torch.full(
            (), progress.window_loss_sum if carried else 0.0, device=device, dtype=torch.float64
        )
        self.samples = progress.window_samples if carried else 0
        self.parts = {k: torch.tensor(v, device=device, dtype=torch.float64)
                      for k, v in progress.window_parts.items()} if carried else {}  # fmt: skip
        self.step_loss, self.step_samples, self.step_parts = torch.zeros_like(self.loss), 0, {}
        self.carried = self.samples  # trained by the process that saved: not timed here
        self._restart()

    def _restart(self) -> None:
        self.steps, self.start, self.data_wait = 0, time.perf_counter(), 0.0

    def add_batch(self, loss: torch.Tensor, value: Any, n: int) -> None:
        """A micro-batch's mean loss (and a dict loss's parts), weighted by its `n` samples."""
        self.step_loss.add_(loss.detach(), alpha=n)
        if isinstance(value, dict):
            add_parts(self.step_parts, value, n)
        self.step_samples += n

    def step_finite(self) -> bool:
        """Whether the accumulation window's loss is finite on every rank (a sync; nan_policy=skip only)."""
        return not dist_utils.any_rank(not bool(torch.isfinite(self.step_loss)), self.ctx.device)

    def end_step(self, taken: bool) -> None:
        """Add the accumulation window to the logging window once its step is taken; a skipped one is dropped."""
        if taken:
            self.loss.add_(self.step_loss)
            self.samples += self.step_samples
            for name, part in self.step_parts.items():
                self.parts[name] = self.parts[name] + part if name in self.parts else part
            self.steps += 1
        self.step_loss.zero_()
        self.step_samples, self.step_parts = 0, {}

    def totals(self) -> tuple[float, int, dict[str, float]]:
        """The window's loss sum, samples and parts, summed over every rank: one host sync, one all-reduce."""
        names = sorted(self.parts)
        count = torch.tensor(float(self.samples), device=self.loss.device, dtype=torch.float64)
        values = torch.stack([self.loss, count, *(self.parts[n] for n in names)])
        if self.ctx.distributed:
            values = values.to(self.ctx.device if self.ctx.device.type == "cuda" else "cpu")
            dist_utils.all_reduce_sum(values)
        loss, samples, *parts = values.tolist()
        return loss, int(samples), dict(zip(names, parts, strict=True))

    def store(self, progress: TrainState) -> None:
        """Mid-epoch checkpoint: keep the unlogged sums so the resumed window is whole."""
        progress.window_loss_sum, progress.window_samples, progress.window_parts = self.totals()

    def flush(
        self, progress: TrainState, lrs: dict[str, Any], grad_norm: Any, short_ok: bool
    ) -> dict[str, float]:
        """The window's metrics (loss, parts, lr, rates); its sums go into the epoch's, and it starts afresh.

        `lrs`: each optimizer group's lr by name; `lr` is the first group's, and with several groups
        each also has its own `lr/<name>`."""
        loss_total, sample_total, parts = self.totals()
        progress.epoch_loss_sum += loss_total
        progress.epoch_samples += sample_total
        elapsed = self.last_window_s = max(time.perf_counter() - self.start, 1e-9)
        carried, self.carried = self.carried, 0
        timed = sample_total - carried  # throughput counts only what this process trained in `elapsed`
        metrics = {
            "train_loss": loss_total / max(sample_total, 1),
            **{f"train_loss_{n}": v / max(sample_total, 1) for n, v in parts.items()},
            "lr": next(iter(lrs.values())),
            **({f"lr/{name}": lr for name, lr in lrs.items()} if len(lrs) > 1 else {}),
            "samples_per_sec": timed / elapsed,
            "step_time": elapsed / max(self.steps, 1),
            "data_wait_share": min(1.0, self.data_wait / elapsed),
        }
        if grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            metrics["grad_norm"] = float(norm)
        if self.ctx.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        if self.flops_per_sample and self.peak_flops:  # this rank's samples on this rank's GPU
            metrics["mfu"] = (
                self.flops_per_sample * max(self.samples - carried, 0) / elapsed / self.peak_flops
            )
        metrics = self.rates.settle(metrics, self.steps, short_ok=short_ok)
        self.loss, self.samples, self.parts = torch.zeros_like(self.loss), 0, {}
        self._restart()
        return metrics

    def log(self, metrics: dict[str, float], bar: Any, progress: TrainState) -> None:
        """To the bar (a log step's window), the trackers and the log; warns when data keeps the loop waiting."""
        if not metrics:
            return
        if bar is not None and "train_loss" in metrics:
            bar.update(
                0, loss=metrics["train_loss"], lr=metrics["lr"], **{"samples/s": metrics["samples_per_sec"]}
            )
        if self.trackers is not None:
            self.trackers.log_metrics(metrics, step=progress.global_step, epoch=progress.epoch + 1)
        if self.ctx.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("epoch %d step %d: %s", progress.epoch + 1, progress.global_step, shown)
            if advice := self.data_wait_watch.observe(metrics, self.last_window_s):
                log.warning(advice)

    def progress(self, total: int, desc: str) -> Any:
        from src.tracking import Progress

        return Progress(total=total, desc=desc, enabled=self.bars, every=max(1, self.log_every))
