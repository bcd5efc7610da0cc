"""MLflow run tracking from a child process, with exactly-once metrics across crash and resume.

Importing MLflow and creating a sqlite store take seconds of pure Python, and any store can be slow
or down. On a thread of the training process that work holds the GIL and slows the first steps, so
every MLflow call runs in a child process (`src.tracking.mlflow_worker`) fed over a socket; this
process never imports MLflow, and the training loop only appends to lists. `prestart()` starts the
child before the model is built, so the store's migration overlaps set-up.

Metric events are held until a checkpoint covers them: `state()` marks what the checkpoint holds (and
saves the events not yet confirmed by the store inside it), `commit()` releases the marked events to
the child. A crash therefore loses only events that the resumed run logs again, and `resume()`
re-sends the checkpoint's unconfirmed events, which the child skips where the store already has them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from src.tracking.base import Tracker, stop_signals_received

log = logging.getLogger("template.tracking")

# MLflow's own limits (mlflow.utils.validation), copied so that importing this module stays cheap.
_PARAM_VALUE_LENGTH = 6000
_TAG_VALUE_LENGTH = 8000
_KEY_LENGTH = 250
# The longest the trainer waits for the store: the run id at the last checkpoint and the final writes
# together (one deadline), or the run id for a user's evaluator. A stop signal ends a wait at once.
END_WAIT_S = 30.0
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding src/, for the child's imports

# (key, value, timestamp in ms, step): what MLflow stores for one metric point.
Event = tuple[str, float, int, int]


def resolve_tracking_uri(config_value: str | None, output_root: Path) -> str:
    """The store to use: the config's value, else $MLFLOW_TRACKING_URI, else a sqlite file in the result root."""
    if config_value:
        return config_value
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(output_root) / 'mlflow.db').resolve()}"


class _Child:
    """A started `mlflow_worker` process and this end of its socket."""

    def __init__(self, tracking_uri: str) -> None:
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "src.tracking.mlflow_worker", str(theirs.fileno()), tracking_uri,
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )  # fmt: skip
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())

    def close(self) -> None:
        """Hang up: the child reads end-of-file and exits."""
        self.conn.close()


_spares: dict[str, _Child] = {}


def spawn(tracking_uri: str) -> None:
    """Start the MLflow child for `tracking_uri` now: it imports MLflow and touches no store yet.

    train.py calls it before it imports torch, so on a machine with a free core MLflow's import
    (a second or two of Python) is over before training starts. Call it in the main thread (the
    child dies with the thread that started it); the next MlflowTracker on that store takes it.
    """
    if tracking_uri not in _spares:
        with contextlib.suppress(OSError):  # prestart and the tracker try again and say why
            _spares[tracking_uri] = _Child(tracking_uri)


def prestart(tracking_uri: str) -> None:
    """The run goes ahead: the child (started now if `spawn` did not) opens or creates the store, while
    the trainer builds its model; the next MlflowTracker on that store takes it over."""
    if tracking_uri not in _spares:
        try:
            _spares[tracking_uri] = _Child(tracking_uri)
        except OSError as err:
            log.warning("MLflow: could not start the tracking process: %s", err)
            return
    _spares[tracking_uri].conn.send(("connect",))


@atexit.register
def _close_spares() -> None:
    """A spare no tracker took (set-up failed first) is told to exit with its parent."""
    while _spares:
        _spares.popitem()[1].close()


class MlflowTracker(Tracker):
    """One MLflow run, created (or reopened from `run_id`) by a child process."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._run_dir = tags.get("run_dir")  # named in the warning when the store missed something
        self._wanted_run_id = run_id
        self._run_id: str | None = None
        self._opened = threading.Event()
        self._activate_on_open = False  # make_active(wait=False) came before the run was open
        self._off = False  # the store could not be opened: drop everything
        self._finished = False
        self._gone = False  # the child ended: keep events for the checkpoint, send nothing more
        self._done = threading.Event()  # the reader ended: the child said "finished", or it is gone
        self._end_by: float | None = None  # the end of the run's waits (settle, finish), once begun
        self._gave_up = f"no answer within {END_WAIT_S:.0f} s"  # why a wait ended early, for the warning
        self._warned = False  # a store that fails is reported in one line, whatever fails after it
        # Events not yet confirmed by the store, oldest first. The child confirms a prefix once it is
        # written; `_covered` (events a checkpoint holds) and `_sent` (events handed to the child) count
        # from the front of this list. `_covered` is None until the first state() or resume().
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._covered: int | None = None
        self._sent = 0
        self._pings: dict[int, threading.Event] = {}
        self._tokens = itertools.count()
        # Messages for the child go through a thread, so a full socket never blocks training.
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        tags = {str(k)[:_KEY_LENGTH]: str(v)[:_TAG_VALUE_LENGTH] for k, v in tags.items()}
        try:
            self._child = _spares.pop(tracking_uri, None) or _Child(tracking_uri)
        except OSError as err:
            self._child = None
            self._switch_off(f"could not start the tracking process: {err}")
            return
        self._reader = threading.Thread(target=self._read, name="mlflow-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="mlflow-writer", daemon=True)
        self._reader.start()
        self._writer.start()
        self._outbox.put(("open", experiment_name, run_name, tags, run_id))

    # -- the training side: cheap, never touches MLflow ------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The run's id once it exists (waits up to END_WAIT_S); None if the store could not be opened."""
        if not self._opened.is_set():
            until = self._end_by if self._end_by is not None else time.monotonic() + END_WAIT_S
            self._wait(self._opened, until, "to open the run")
        return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self._accepting():
            values = {str(k)[:_KEY_LENGTH]: str(v)[:_PARAM_VALUE_LENGTH] for k, v in params.items()}
            self._outbox.put(("params", values))

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._accepting():
            now = int(time.time() * 1000)
            with self._lock:
                self._events.extend((str(k), float(v), now, int(step)) for k, v in metrics.items())

    def log_artifact(self, path: str | Path) -> None:
        if self._accepting():
            self._outbox.put(("artifact", str(Path(path).resolve())))

    def log_image(self, name: str, png: bytes, step: int) -> None:
        if self._accepting():
            self._outbox.put(("image", name, png, step))

    def log_system_metrics(self) -> None:
        """Sample CPU, RAM and GPU use into this run from the tracking process (system_metrics.py)."""
        if self._accepting():
            self._outbox.put(("system_metrics",))

    def state(self) -> dict[str, Any]:
        """The events a checkpoint taken now covers, and the run id once the child has opened the run.

        Never waits: a checkpoint taken in the first seconds, while the child still imports MLflow,
        holds no run id, and a resume from it finds the run by its `run_dir` tag instead. A run's
        last checkpoint calls `settle` first, so test.py and later resumes find the run by its id.
        """
        with self._lock:
            self._covered = len(self._events)
            pending = [list(event) for event in self._events]
        return {"run_id": self._run_id, "pending": pending}

    def settle(self) -> None:
        """Wait for the run id, so the last checkpoint names the run; shares `finish`'s END_WAIT_S."""
        if not self._opened.is_set():
            self._wait(self._opened, self._end_deadline(), "to open the run")

    def _end_deadline(self) -> float:
        if self._end_by is None:
            self._end_by = time.monotonic() + END_WAIT_S
        return self._end_by

    def _wait(self, done: threading.Event, until: float, what: str) -> bool:
        """Wait for `done` until `until` (monotonic) or a stop signal; False when given up.

        Training and the end of a run never wait longer on a slow or dead store; a stop signal
        during the wait is honoured within a fraction of a second. A wait given up ends every later
        one at once: a store that kept the run waiting this long is not waited for again.
        """
        signals = stop_signals_received()
        if time.monotonic() >= until:  # given up before: not waited for again
            return done.is_set()
        log.info("waiting up to %.0f s for MLflow (%s) %s", until - time.monotonic(), self.tracking_uri, what)
        while not done.wait(0.1):
            stopped = stop_signals_received() != signals
            if stopped or time.monotonic() >= until:
                self._end_by = time.monotonic()
                self._gave_up = (
                    "a stop signal ended the wait" if stopped else f"no answer within {END_WAIT_S:.0f} s"
                )
                return False
        return True

    def commit(self) -> None:
        """Send what the last checkpoint holds; later events wait for the next checkpoint."""
        if self._accepting():
            with self._lock:
                self._send_upto(len(self._events) if self._covered is None else self._covered)

    def resume(self, state: dict[str, Any]) -> None:
        if self._off or self._finished:
            return
        if state.get("run_id") and state["run_id"] != self._wanted_run_id:
            log.warning(
                "MLflow: the checkpoint belongs to run %s but this tracker was opened with run_id=%s; "
                "its events go to this tracker's run",
                state["run_id"],
                self._wanted_run_id,
            )
        pending = [(str(k), float(v), int(t), int(s)) for k, v, t, s in state.get("pending", [])]
        with self._lock:
            self._events[self._sent : self._sent] = pending  # before anything not yet sent
            self._sent += len(pending)
            self._covered = self._sent
            self._outbox.put(("resume_events", pending))

    def make_active(self, wait: bool = True) -> None:
        """Let `mlflow.log_metric(...)` in user code (a custom evaluator, say) land in this run.

        MLflow's fluent API resumes the run named by $MLFLOW_RUN_ID, in the store named by
        $MLFLOW_TRACKING_URI, on its first call; this process never imports MLflow itself. `wait`:
        block until the child reports the run, for user code about to log; otherwise, if the run is
        not open yet, the reader thread sets the variables once it is. `finish` ends that fluent run
        before the child writes the real status, so MLflow's exit hook cannot mark a failed run FINISHED.
        """
        with self._lock:  # the reader sets the run id and reads the flag under the same lock
            run_id = self._run_id
            if run_id is None:
                self._activate_on_open = True  # the reader points user code at the run when it opens
        if run_id is None and wait:
            run_id = self.run_id
        self._point_user_code(run_id)

    def _point_user_code(self, run_id: str | None) -> None:
        if run_id is not None:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
            os.environ["MLFLOW_RUN_ID"] = run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every call queued so far has reached MLflow; False on timeout."""
        if self._child is None or not self._reader.is_alive():
            return True
        done = threading.Event()
        token = next(self._tokens)
        self._pings[token] = done
        self._outbox.put(("ping", token))
        return done.wait(timeout) or not self._reader.is_alive()

    def finish(self, status: str | None) -> None:
        """Send what is left, close the run and wait until the child says it is written (END_WAIT_S at most).

        A FAILED or KILLED run may be resumed from its last checkpoint, which logs the events after
        that checkpoint again; so only a FINISHED run (or one that never checkpointed) sends them.
        `None` sends everything and gives a reopened run back the status it had, for work done on a
        run after it ended (evaluating it on the test split).
        """
        if status is not None and status not in _STATUSES:
            raise ValueError(f"MLflow run status must be one of {_STATUSES} or None, got {status!r}")
        if self._finished:
            return
        self._finished = True
        if self._child is None:
            return
        if self._off:  # the store never opened: nothing was sent, and the warning is given
            self._child.close()
            return
        self._end_fluent_run()
        with self._lock:
            everything = status in ("FINISHED", None) or self._covered is None
            self._send_upto(len(self._events) if everything else self._covered)
        self._outbox.put(("finish", status))
        self._outbox.put(None)
        # The reader ends at the child's "finished": every event, artifact and the status are in the
        # store. The child's own exit (a second of unloading MLflow) is not waited for.
        answered = self._done.is_set() or self._wait(self._done, self._end_deadline(), "to write the run")
        with self._lock:  # handed to the child, not confirmed (later ones wait for a resume by design)
            missed = list(self._events[: self._sent])
        if not answered:
            self._missed(missed, self._gave_up, status)
            return  # the child dies with this process
        if missed and not self._off:
            self._missed(missed, "writes failed", None)
        self._child.close()
        threading.Thread(target=self._child.process.wait, name="mlflow-reaper", daemon=True).start()

    def _missed(self, events: list[Event], why: str, status: str | None) -> None:
        """The one warning of a store that missed part of the run: what, and how to log it later."""
        what = []
        if events:
            steps = [event[3] for event in events]
            what.append(f"{len(events)} metric value(s) of steps {min(steps)}-{max(steps)}")
        if status is not None:
            what.append(f"the status {status}")
        self._store_warning(
            f"MLflow: {self.tracking_uri} may lack {' and '.join(what) or 'its last writes'} ({why})"
            f"{self._how_to_log_later()}"
        )

    def _store_warning(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s", text)

    def _how_to_log_later(self) -> str:
        if not self._run_dir:  # a workflow's parent run: its children hold the metrics
            return ""
        return (
            f"; {self._run_dir}/metrics.jsonl has every metric: log it later with "
            f"python script/log_to_mlflow.py {self._run_dir}"
        )

    def _end_fluent_run(self) -> None:
        """Close the fluent run that user code resumed in this process (see `make_active`), if any."""
        mlflow = sys.modules.get("mlflow")  # only there if user code imported it
        if mlflow is None or self._run_id is None:
            return
        if os.environ.get("MLFLOW_RUN_ID") == self._run_id:
            del os.environ["MLFLOW_RUN_ID"]
        try:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self._run_id:
                mlflow.end_run()  # FINISHED for a moment: the child writes the real status after it
        except Exception as err:
            log.warning("MLflow: could not end the run user code opened: %s", err)

    def _accepting(self) -> bool:
        return not (self._off or self._finished)

    def _send_upto(self, end: int) -> None:
        """Hand the child the events up to `end` that it does not have yet (hold the lock)."""
        if end > self._sent and not (self._off or self._gone):
            self._outbox.put(("events", self._events[self._sent : end]))
            self._sent = end

    def _switch_off(self, reason: str) -> None:
        self._off = True
        with self._lock:
            self._events.clear()
            self._sent, self._covered = 0, None
        self._store_warning(f"MLflow: tracking is off for this run, {reason}{self._how_to_log_later()}")
        self._opened.set()

    # -- the threads that talk to the child ---------------------------------------------------------

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._child.conn.send(message)
            except (OSError, ValueError):
                return  # the child is gone; _read has said so

    def _read(self) -> None:
        try:
            while True:
                op, *args = self._child.conn.recv()
                if op == "opened":
                    run_id, error = args
                    if run_id is None:
                        self._switch_off(f"could not open {self.tracking_uri}: {error}")
                    else:
                        with self._lock:
                            self._run_id = run_id
                            if self._activate_on_open:
                                self._point_user_code(run_id)
                        self._opened.set()
                elif op == "confirmed":
                    with self._lock:  # written: forget them, keeping the counters relative to the front
                        del self._events[: args[0]]
                        self._sent -= args[0]
                        if self._covered is not None:
                            self._covered -= args[0]
                elif op == "warn":
                    log.warning("%s", args[0])
                elif op == "pong":
                    self._pings.pop(args[0]).set()
                elif op == "finished":
                    return
        except (EOFError, OSError):
            self._gone = True
            if not self._finished:
                self._store_warning(f"MLflow: the tracking process for {self.tracking_uri} ended early")
            if not self._opened.is_set():
                self._switch_off("its process ended before opening the run")
        finally:
            self._opened.set()
            self._done.set()
            for done in list(self._pings.values()):
                done.set()
