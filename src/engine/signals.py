"""Preemption: SIGTERM/SIGINT/SIGUSR1 ask the loop to save at the next step boundary and exit."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

from src.tracking.base import stop_signal_received

log = logging.getLogger("template")


class StopRequest:
    """Set by a signal handler; the training loop reads it between steps. A second signal kills."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self, names: Iterable[str]) -> None:
        for name in names:
            sig = getattr(signal, str(name).upper(), None)
            if sig is None:
                from src.errors import ConfigError

                raise ConfigError(
                    f"training.stop_signals: unknown signal '{name}' (e.g. SIGTERM, SIGINT, SIGUSR1)"
                )
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # asked twice: stop now, without saving
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt(f"{name} received twice")
        self.signal_name = name
        stop_signal_received()  # a tracker waiting on a slow store lets the run end now
        log.warning("%s received: saving a checkpoint at the next step boundary, then exiting", name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for 'ended by this signal'."""
        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))
