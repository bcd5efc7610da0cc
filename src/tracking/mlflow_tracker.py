"""MLflow run tracking from a background thread, with exactly-once metrics across crash and resume.

Importing MLflow and creating a sqlite store take seconds, and any store can be slow or down, so
every MLflow call runs on one worker thread fed by a queue; the training loop only appends to
lists. Metric events are held until a checkpoint covers them: `state()` marks what the checkpoint
holds (and saves the events not yet confirmed by the store inside it), `commit()` releases the
marked events to the store. A crash therefore loses only events that the resumed run logs again,
and `resume()` re-sends the checkpoint's unconfirmed events, skipping those the store already has.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from src.tracking.base import Tracker

log = logging.getLogger("template.tracking")

# MLflow's own limits (mlflow.utils.validation), copied so that importing this module stays cheap.
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_LENGTH = 6000
_TAG_VALUE_LENGTH = 8000
_KEY_LENGTH = 250
_FINISH_TIMEOUT_S = 60.0
_STATUSES = ("FINISHED", "FAILED", "KILLED")

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


class MlflowTracker(Tracker):
    """One MLflow run, created (or reopened from `run_id`) on a background thread."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._run_name = run_name
        self._tags = {str(k)[:_KEY_LENGTH]: str(v)[:_TAG_VALUE_LENGTH] for k, v in tags.items()}
        self._wanted_run_id = run_id
        self._run_id: str | None = None
        self._status_before: str | None = None  # a reopened run's status, restored by finish(None)
        self._client: Any = None
        self._opened = threading.Event()
        self._off = False  # the store could not be opened: drop everything
        self._finished = False
        # Events not yet confirmed by the store, oldest first. The worker removes a prefix once
        # written; `_covered` (events a checkpoint holds) and `_release` (events commit() let go)
        # count from the front of this list. `_covered` is None until the first state() or resume().
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._covered: int | None = None
        self._release = 0
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        self._tasks.put(self._open)

    # -- the training side: cheap, never touches MLflow ------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The run's id once it exists (blocks until then); None if the store could not be opened."""
        self._opened.wait()
        return self._run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self._accepting():
            values = {str(k)[:_KEY_LENGTH]: str(v)[:_PARAM_VALUE_LENGTH] for k, v in params.items()}
            self._submit(lambda: self._write_params(values))

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._accepting():
            now = int(time.time() * 1000)
            with self._lock:
                self._events.extend((str(k), float(v), now, int(step)) for k, v in metrics.items())

    def log_artifact(self, path: str | Path) -> None:
        if self._accepting():
            local = Path(path).resolve()
            self._submit(lambda: self._write_artifact(local))

    def log_figure(self, name: str, figure: Any, step: int) -> None:
        """Render now, on this thread: matplotlib figures are not safe to draw from another thread."""
        if self._accepting():
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", bbox_inches="tight")
            png = buffer.getvalue()
            self._submit(lambda: self._write_figure(name, png, step))

    def state(self) -> dict[str, Any]:
        run_id = self.run_id
        with self._lock:
            self._covered = len(self._events)
            pending = [list(event) for event in self._events]
        return {"run_id": run_id, "pending": pending}

    def commit(self) -> None:
        """Send what the last checkpoint holds; later events wait for the next checkpoint."""
        if self._accepting():
            with self._lock:
                self._release = len(self._events) if self._covered is None else self._covered
            self._submit(self._send)

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
            self._events[:0] = pending
            self._covered = len(pending)
            self._release = len(pending)
        self._submit(self._send_unless_stored)

    def make_active(self) -> None:
        """Let `mlflow.log_metric(...)` in user code (a custom evaluator, say) land in this run.

        MLflow's fluent API resumes the run named by $MLFLOW_RUN_ID, in the store named by
        $MLFLOW_TRACKING_URI, on its first call. Waits until the run exists, so call it once at start;
        `finish` ends that fluent run before writing the real status, so MLflow's exit hook cannot
        mark a failed run FINISHED.
        """
        run_id = self.run_id
        if run_id is not None:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
            os.environ["MLFLOW_RUN_ID"] = run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every call queued so far has reached MLflow; False on timeout."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._tasks.put(done.set)
        return done.wait(timeout)

    def finish(self, status: str | None) -> None:
        """Send what is left, close the run and stop the worker, waiting at most a minute.

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
        self._end_fluent_run()
        with self._lock:
            everything = status in ("FINISHED", None) or self._covered is None
            self._release = len(self._events) if everything else self._covered
        self._submit(self._send)
        if status is None:
            self._submit(
                lambda: self._client.update_run(self._run_id, status=self._status_before or "FINISHED")
            )
        else:
            self._submit(lambda: self._client.set_terminated(self._run_id, status))
        self._tasks.put(None)
        self._thread.join(_FINISH_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning(
                "MLflow: %s did not answer within %.0fs; run %s may miss its last events",
                self.tracking_uri,
                _FINISH_TIMEOUT_S,
                self._run_id,
            )

    def _end_fluent_run(self) -> None:
        """Close the fluent run that user code resumed on this thread (see `make_active`), if any."""
        mlflow = sys.modules.get("mlflow")
        if mlflow is None or self._run_id is None:
            return
        if os.environ.get("MLFLOW_RUN_ID") == self._run_id:
            del os.environ["MLFLOW_RUN_ID"]
        try:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self._run_id:
                mlflow.end_run()  # FINISHED for a moment: finish() queues the real status after it
        except Exception as err:
            log.warning("MLflow: could not end the run user code opened: %s", err)

    def _accepting(self) -> bool:
        return not (self._off or self._finished)

    def _submit(self, call: Callable[[], Any]) -> None:
        """Queue an MLflow call; it is skipped if the store turned out to be unusable."""
        self._tasks.put(lambda: None if self._off else call())

    # -- the worker side: every MLflow call happens here ------------------------------------------

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception as err:
                log.warning("MLflow: %s (run %s, store %s)", err, self._run_id, self.tracking_uri)

    def _open(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            if "MLFLOW_LOGGING_LEVEL" not in os.environ:  # its INFO lines ("Creating initial MLflow
                logging.getLogger("mlflow").setLevel(logging.WARNING)  # database tables") are not ours

            _make_sqlite_folder(self.tracking_uri)
            client = MlflowClient(self.tracking_uri)
            run_id = self._reopen(client, self._wanted_run_id) if self._wanted_run_id else None
            if run_id is None:
                run = client.create_run(self._experiment_id(client), run_name=self._run_name, tags=self._tags)
                run_id = run.info.run_id
            self._client, self._run_id = client, run_id
        except Exception as err:
            self._off = True
            with self._lock:
                self._events.clear()
            log.warning("MLflow: tracking is off for this run, could not open %s: %s", self.tracking_uri, err)
        finally:
            self._opened.set()

    def _reopen(self, client: Any, run_id: str) -> str | None:
        """Set the run back to RUNNING; None when the store has no such live run."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            log.warning("MLflow: cannot reopen run %s (%s); starting a new run", run_id, err)
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("MLflow: run %s was deleted; starting a new run", run_id)
            return None
        self._status_before = run.info.status
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self._tags.items()], synchronous=True)
        return run_id

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self._experiment_name)
        if experiment is None:
            try:
                return client.create_experiment(
                    self._experiment_name, artifact_location=_artifact_location(self.tracking_uri)
                )
            except MlflowException:  # another process created it a moment ago
                experiment = client.get_experiment_by_name(self._experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            log.warning("MLflow: experiment %r was deleted; restoring it", self._experiment_name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _send(self) -> None:
        from mlflow.entities import Metric

        with self._lock:
            batch = self._events[: self._release]
        for start in range(0, len(batch), _METRICS_PER_BATCH):
            chunk = batch[start : start + _METRICS_PER_BATCH]
            self._client.log_batch(
                self._run_id, metrics=[Metric(*event) for event in chunk], synchronous=True
            )
            with self._lock:  # confirmed: forget them, keeping the counters relative to the front
                del self._events[: len(chunk)]
                self._release -= len(chunk)
                if self._covered is not None:
                    self._covered -= len(chunk)

    def _send_unless_stored(self) -> None:
        """Drop the resumed checkpoint's events that reached the store before the crash, send the rest."""
        with self._lock:
            pending = self._events[: self._release]
        stored: dict[str, set[tuple[int, int]]] = {}
        for key in {event[0] for event in pending}:
            history = self._client.get_metric_history(self._run_id, key)
            stored[key] = {(m.step, m.timestamp) for m in history}
        missing = [e for e in pending if (e[3], e[2]) not in stored[e[0]]]
        dropped = len(pending) - len(missing)
        with self._lock:
            self._events[: len(pending)] = missing
            self._release -= dropped
            if self._covered is not None:
                self._covered -= dropped
        self._send()

    def _write_params(self, values: dict[str, str]) -> None:
        """Log params the run lacks; MLflow refuses to change one, so a changed value is reported."""
        from mlflow.entities import Param

        existing = self._client.get_run(self._run_id).data.params
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            log.warning(
                "MLflow keeps the first value of params changed on resume: %s", ", ".join(changed[:10])
            )
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self._client.log_batch(
                self._run_id, params=new[start : start + _PARAMS_PER_BATCH], synchronous=True
            )

    def _write_artifact(self, local: Path) -> None:
        if local.is_dir():
            self._client.log_artifacts(self._run_id, str(local), artifact_path=local.name)
        else:
            self._client.log_artifact(self._run_id, str(local))

    def _write_figure(self, name: str, png: bytes, step: int) -> None:
        where = PurePosixPath("figures", name)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp, f"{where.name}_step{step}.png")
            file.write_bytes(png)
            self._client.log_artifact(self._run_id, str(file), artifact_path=str(where.parent))


def _make_sqlite_folder(uri: str) -> None:
    """sqlite creates the database file but not its folder."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its file; MLflow would put them under the cwd."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri.removeprefix("sqlite:///")).resolve().parent.joinpath("mlartifacts").as_uri()
    return None
