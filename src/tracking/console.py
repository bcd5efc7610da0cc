"""The "template" logger: timestamped lines on stderr and, for rank 0, in the run's train.log."""

from __future__ import annotations

import logging
import os
import re
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


# ANSI colours for a terminal, after the k-fold guide's console: cyan time, yellow epochs and values,
# blue training, magenta validation, green test and successes.
_RESET = "\033[0m"
_CYAN, _YELLOW, _BLUE, _MAGENTA, _GREEN, _RED = (f"\033[{c}m" for c in (36, 33, 34, 35, 32, "1;31"))
_LEVELS = {"DEBUG": "\033[2m", "INFO": _GREEN, "WARNING": _YELLOW, "ERROR": _RED, "CRITICAL": _RED}
_PHASES = {"train": _BLUE, "val": _MAGENTA, "test": _GREEN}
_PAIR = re.compile(r"\b((train|val|test)_\w+|loss|lr|samples/s|\w+)=([^,\s|]+)")
_EPOCH = re.compile(r"\b((?:epoch|val) \d+(?:/\d+)?)(?= |:|$)")
_SUCCESS = re.compile(r"^(checkpoint saved|test \(|run: )")


class _ColourFormatter(logging.Formatter):
    """The console line with its parts coloured; used only when the console is a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = super().format(record).split(" | ", 2)
        if len(parts) < 3:
            return parts[0]
        stamp, level, message = parts
        message = _EPOCH.sub(lambda m: f"{_YELLOW}{m.group(1)}{_RESET}", message)

        def pair(m: re.Match) -> str:
            phase = m.group(2) or ("train" if m.group(1) in ("loss", "lr", "samples/s") else "")
            key_colour = _PHASES.get(phase, "")
            key = f"{key_colour}{m.group(1)}{_RESET}" if key_colour else m.group(1)
            return f"{key}={_YELLOW}{m.group(3)}{_RESET}"

        message = _PAIR.sub(pair, message)
        if _SUCCESS.match(message):
            message = f"{_GREEN}{message}{_RESET}"
        colour = _LEVELS.get(record.levelname, "")
        return f"{_CYAN}{stamp}{_RESET} | {colour}{level}{_RESET} | {message}"


def use_colour(stream: object) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set or TERM=dumb."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return False
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def plural(count: int, noun: str) -> str:
    """'1 step', '2 steps': log lines read as sentences."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


class _LogFile(logging.FileHandler):
    """train.log; on a full disk it says so once on stderr instead of a traceback per log line."""

    full = False

    def handleError(self, record: logging.LogRecord) -> None:
        import errno

        err = sys.exc_info()[1]
        if not isinstance(err, OSError) or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            super().handleError(record)
        elif not self.full:
            self.full = True
            print(
                f"warning: {self.baseFilename}: {err.strerror}; log lines go to the console only",
                file=sys.stderr,
            )


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
    if use_colour(sys.stderr):  # train.log and piped output keep the plain format
        colour = _ColourFormatter(formatter._fmt, _DATE_FORMAT)
        console.setFormatter(colour)
    else:
        console.setFormatter(formatter)
    logger.addHandler(console)
    if rank == 0 and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file = _LogFile(log_file, mode="a", encoding="utf-8")
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger
