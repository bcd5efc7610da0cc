"""metrics.jsonl: the machine-readable history of a run, one JSON object per logged event."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from src.tracking.base import Tracker

log = logging.getLogger("template.tracking")


class MetricsFile(Tracker):
    """Appends {"epoch", "step", **metrics} lines; resume cuts the file back to the checkpoint.

    Each line is flushed as it is written, so a crash loses at most the line being written. Lines
    written after the last checkpoint survive a crash but are cut on resume, because the resumed
    run logs those events again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines = _count_lines(self.path)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (open for the run)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        record = {"epoch": int(epoch), "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._lines += 1

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def state(self) -> dict[str, Any]:
        return {"lines": self._lines}

    def resume(self, state: dict[str, Any]) -> None:
        keep = int(state["lines"])
        self._file.close()
        lines = self.path.read_bytes().splitlines(keepends=True) if self.path.exists() else []
        complete = [line for line in lines if line.endswith(b"\n")]
        if len(complete) < keep:
            log.warning(
                "%s has %d complete lines but the checkpoint expected %d; keeping what is there",
                self.path,
                len(complete),
                keep,
            )
        kept = _records_only(self.path, complete[:keep])
        _atomic_write(self.path, b"".join(kept))
        self._lines = len(kept)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def finish(self, status: str | None) -> None:
        if not self._file.closed:
            self.commit()
            self._file.close()


def _records_only(path: Path, lines: list[bytes]) -> list[bytes]:
    """`lines` without those that are not a JSON object (a damaged disk block, a stray edit), each named
    in a warning, so every reader of the file can parse every line it keeps."""
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            kept.append(line)
        else:
            text = line.decode("utf-8", "replace").strip()
            log.warning("%s line %d is not a JSON record and is dropped: %.60r", path, number, text)
    return kept


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` so that a crash leaves either the old file or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
