"""Progress for a loop: a tqdm bar on a terminal, plain log lines everywhere else.

Job schedulers and `| tee` capture stderr to files, where a bar's carriage returns and escape codes
turn into one unreadable line; there the same information comes as an ordinary log line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("template.progress")


class Progress:
    """`update(n, loss=..., lr=...)` per step, `close()` at the end; does nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool, every: int = 50) -> None:
        self.total = total
        self.desc = desc
        self.every = max(1, every)
        self._enabled = enabled
        self._count = 0
        self._updates = 0
        self._logged_at = 0
        self._postfix: dict[str, float] = {}
        self._start = time.perf_counter()
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            # Some CI pseudo-terminals report a size of 0x0; tqdm then draws nothing: assume 80x24.
            cols, rows = _terminal_size()
            sized = cols > 0 and rows > 0
            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=sized, ncols=None if sized else cols or 80,
                             nrows=None if sized else rows or 24, file=sys.stderr, leave=False)  # fmt: skip

    def update(self, n: int = 1, **postfix: float) -> None:
        if not self._enabled:
            return
        self._count += n
        self._updates += 1
        if postfix:
            self._postfix = postfix
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self._updates % self.every == 0:
            self._log_line()

    def close(self) -> None:
        if not self._enabled:
            return
        self._enabled = False
        if self._bar is not None:
            self._bar.close()
        elif self._count != self._logged_at or self._updates == 0:
            self._log_line()

    def _log_line(self) -> None:
        self._logged_at = self._count
        elapsed = time.perf_counter() - self._start
        rate = self._count / elapsed if elapsed > 0 else 0.0
        percent = f" ({100 * self._count / self.total:.0f}%)" if self.total else ""
        extra = " ".join(f"{k}={_short(v)}" for k, v in self._postfix.items())
        log.info(
            "%s %d/%d%s | %.2f it/s | %s%s",
            self.desc,
            self._count,
            self.total,
            percent,
            rate,
            _clock(elapsed),
            f" | {extra}" if extra else "",
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _terminal_size() -> tuple[int, int]:
    """(columns, rows) of the terminal on stderr; zeros when it reports none."""
    import os

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


def _short(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
