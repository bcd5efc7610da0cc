"""TensorBoard event files, with the events after a checkpoint purged when the run resumes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from src.tracking.base import Tracker


class TensorBoardTracker(Tracker):
    """Scalars and images by global step.

    On resume the writer is opened with `purge_step`, which tells TensorBoard to hide events at or
    after that step written before the crash, so the resumed run's events replace them.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self._purge_step = purge_step
        self._last_step = -1 if purge_step is None else purge_step - 1
        self._writer = self._open(purge_step)

    def _open(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), global_step=step)
        self._last_step = max(self._last_step, step)

    def log_image(self, name: str, png: bytes, step: int) -> None:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self._writer.add_image(name, pixels, global_step=step, dataformats="HWC")

    def commit(self) -> None:
        self._writer.flush()

    def state(self) -> dict[str, Any]:
        return {"step": self._last_step}

    def resume(self, state: dict[str, Any]) -> None:
        """Reopen with a purge step unless the constructor already had one."""
        if self._purge_step is not None:
            return
        self._purge_step = int(state["step"]) + 1
        self._writer.close()
        self._writer = self._open(self._purge_step)

    def finish(self, status: str | None) -> None:
        self._writer.flush()
        self._writer.close()
