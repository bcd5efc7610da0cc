"""One writer per result directory: an advisory lock on `<run>/.lock`, held by rank 0 for the run's life.

A second `train.py <run>/config.yaml` (or `test.py <run>/config.yaml`) on the same directory is
refused at once, naming the process that holds it. The lock is a POSIX record lock (`fcntl.lockf`):
the kernel drops it when its process ends in any way, SIGKILL included, so a lock is never stale in
the sense of blocking; the file's text (who held it) stays, and the next holder says it took over.
POSIX locks, unlike `flock`, are also what NFS (v4, or v3 with lockd) carries between machines, and
a forked child (a DataLoader worker) does not inherit them. The file is never deleted (deleting a
locked file lets two processes lock two different files); it only ever holds one line of text.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from src.errors import ConfigError

log = logging.getLogger("template")

LOCK_NAME = ".lock"


class RunLock:
    """The held lock; `release()` empties the file and unlocks it. An error that ends the process before
    the run releases it still releases it at exit; after a kill, the kernel unlocks it and the text stays."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        atexit.register(self.release)

    def release(self) -> None:
        if self._fd is None:
            return
        atexit.unregister(self.release)
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: released cleanly, nothing to take over
        finally:
            os.close(fd)  # closing drops the lock


def lock_run_dir(run_dir: Path, action: str) -> RunLock | None:
    """Take `run_dir`'s lock for `action` ("training", "testing"); ConfigError if another process holds it.

    None where the file system cannot lock (NFS mounted with `nolock`, some FUSE file systems): the run
    goes on with a warning, unprotected.
    """
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read(path) or "another process"
            raise ConfigError(
                f"{run_dir} is in use by {holder}; one process at a time may train or test a result "
                "directory: wait for that one to end (or stop it), then run again"
            ) from None
        log.warning("cannot lock %s (%s): nothing stops a second process from writing this run at the same "
                    "time; run one at a time", path, err.strerror)  # fmt: skip
        return None
    left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if left:
        log.warning("%s was locked by %s, which ended without releasing it: lock taken over", run_dir, left)
    since = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    line = f"pid {os.getpid()} on {socket.gethostname()} ({action} since {since})\n".encode()
    try:  # who holds it, for a refusal's message; the lock itself needs no bytes (a full disk: no name)
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
    except OSError:
        pass
    return RunLock(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""
