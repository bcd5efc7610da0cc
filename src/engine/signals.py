"""Preemption: SIGTERM/SIGINT/SIGUSR1 ask the loop to save at the next step boundary and exit.

Under torchrun the same stop is asked for when the launcher dies (`watch_launcher`): a worker that
outlived a `kill -9` of its torchrun agent would otherwise train on alone, beside any resume.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable

from src.tracking.base import stop_signal_received

log = logging.getLogger("template")

# Exit code of a worker whose launcher died: 128 + SIGHUP, the shell's code for "lost its controller".
LAUNCHER_GONE_EXIT = 128 + int(signal.SIGHUP)
# How long a worker whose launcher died may take to save and exit before it exits without saving.
LAUNCHER_GONE_GRACE_S = 60.0

_active: StopRequest | None = None  # the installed request, which the launcher watch sets too
_started = False  # a StopRequest was installed: training (and its test) is under way


class Stopped(Exception):
    """A stop request ended an evaluation pass (the run's final test) before its end."""


class StopRequest:
    """Set by a signal handler; the training loop reads it between steps. A second signal kills."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.code = 0  # the exit code once requested
        self.testing = False  # the run's final test is under way: a stop ends the test, nothing is saved
        self._previous: dict[int, object] = {}

    def install(self, names: Iterable[str]) -> None:
        global _active, _started
        if threading.current_thread() is not threading.main_thread():
            # Python takes signals on the main thread only; a launcher that runs training in a thread
            # (Ray Train) stops it its own way.
            log.info(
                "stop signals not installed: training runs outside the main thread (the launcher stops it)"
            )
            _active, _started = self, True
            return
        for name in names:
            sig = getattr(signal, str(name).upper(), None)
            if sig is None:
                from src.errors import ConfigError

                raise ConfigError(
                    f"training.stop_signals: unknown signal '{name}' (e.g. SIGTERM, SIGINT, SIGUSR1)"
                )
            self._previous[sig] = signal.signal(sig, self._handle)
        _active, _started = self, True

    def uninstall(self) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if _active is self:
            _active = None

    def request(self, name: str, code: int, why: str) -> None:
        """Ask for a stop as a signal does: `name` is what stopped the run, `why` the log's opening words."""
        if self.signal_name is not None:
            return
        self.signal_name, self.code = name, code
        stop_signal_received()  # a tracker waiting on a slow store lets the run end now
        if self.testing:
            log.warning("%s: the test stops at its next batch, then the run exits (training is complete "
                        "and saved)", why)  # fmt: skip
        else:
            log.warning("%s: saving a checkpoint at the next step boundary, then exiting", why)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # asked twice: stop now, without saving
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt(f"{name} received twice")
        self.request(name, 128 + signum, f"{name} received")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device: object) -> Callable[[], bool]:
        """The check the final test makes before each batch: every rank stops at the same batch."""
        from src.distributed.process_group import any_rank

        self.testing = True
        return lambda: any_rank(self.requested, device)  # type: ignore[arg-type]

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for 'ended by this signal' (129 when the
        launcher died, as for SIGHUP)."""
        return self.code or 128 + int(signal.SIGTERM)


def watch_launcher(interval: float = 1.0) -> None:
    """Under torchrun, stop this worker when its launcher (the torchrun agent, its parent) dies.

    torchrun starts each worker in a session of its own, so a `kill -9` of the agent alone reaches
    no worker, and nothing else tells them. A daemon thread compares the parent's pid once per
    `interval` seconds (reparenting changes it). Before training starts there is nothing to save:
    the worker exits at once. Once training runs, the stop goes the way of a stop signal (save at
    the next step boundary, exit with the resume hint); a worker that has not ended after
    LAUNCHER_GONE_GRACE_S (stuck in a collective whose peer is gone, say) exits without saving.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by a torchrun agent
        return
    parent = os.getppid()  # read as the process starts: the agent, unless it is gone already
    threading.Thread(target=_watch, args=(parent, interval), name="launcher-watch", daemon=True).start()


def _watch(parent: int, interval: float) -> None:
    while os.getppid() == parent and parent != 1:
        time.sleep(interval)
    what = f"the torchrun agent (pid {parent}) that started this worker is gone"
    stop = _active
    if not _started:
        log.error("%s: exiting before training started (nothing to save)", what)
        _exit(LAUNCHER_GONE_EXIT)
    if stop is not None:
        stop.request("the launcher's death", LAUNCHER_GONE_EXIT, what)
    time.sleep(LAUNCHER_GONE_GRACE_S)
    log.error("%s, and this worker did not stop within %.0f s: exiting without saving further",
              what, LAUNCHER_GONE_GRACE_S)  # fmt: skip
    _exit(LAUNCHER_GONE_EXIT)


def _exit(code: int) -> None:
    """End the process now, from the watch thread (the main thread may be blocked in C++)."""
    for handler in logging.getLogger("template").handlers:
        handler.flush()
    os._exit(code)
