"""The "template" logger: timestamped lines on stderr and, for rank 0, in the run's train.log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "template"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _BarSafeHandler(logging.StreamHandler):
    """Clears any tqdm bar before writing a line and redraws it after, so bars and logs don't mangle."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def setup_logging(log_file: Path | None, rank: int, debug: bool = False) -> logging.Logger:
    """Configure (or reconfigure) the "template" logger for this process.

    Rank 0 logs INFO (DEBUG with `debug`) to stderr and appends to `log_file`, so a resumed run
    continues the same file. Other ranks log only warnings, marked with their rank, to stderr.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", _DATE_FORMAT)
    else:
        logger.setLevel(logging.WARNING)
        formatter = logging.Formatter(
            f"%(asctime)s | %(levelname)s | [rank {rank}] %(message)s", _DATE_FORMAT
        )

    console = _BarSafeHandler(sys.stderr)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if rank == 0 and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger
