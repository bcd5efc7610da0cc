"""The child process that makes every MLflow call for one `MlflowTracker`.

`import mlflow` and a new sqlite store's migration take seconds of pure Python. On a thread of the
training process they hold the GIL and slow the first steps several times over; in this process they
cost the trainer nothing. The tracker starts it with `python -m src.tracking.mlflow_worker FD URI PID`,
where FD is this end of a socket pair. It imports MLflow at once (train.py starts it before it
imports torch), then serves the messages the tracker sends, in order:

    ("connect",)                      the run goes ahead: open or create the store now
    ("open", experiment, run_name, tags, run_id | None)  -> ("opened", run_id | None, error | None)
        (without a run_id, a live run tagged with the same run_dir is reopened if there is one)
    ("params", {key: value}) / ("artifact", path) / ("image", name, png, step)
    ("events", [event, ...])          metric events released by a checkpoint
    ("resume_events", [event, ...])   a resumed checkpoint's events; from then on, steps the run
                                      holds already (a crash, a fallback to an older checkpoint) are skipped
    ("ping", token)                   -> ("pong", token) once everything before it is done
    ("finish", status | None)         -> ("finished",), then exit

It answers ("confirmed", n) whenever the first n events it was given (counted across messages, oldest
first) are in the store or found there, and ("warn", text) for anything that went wrong. It ignores
Ctrl-C (the trainer decides when the run ends) and dies with its parent, so a killed trainer's
unsent events stay unsent, exactly as a thread's would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path, PurePosixPath
from typing import Any

# MLflow's own limits (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100

Event = tuple[str, float, int, int]  # (key, value, timestamp in ms, step)


class Worker:
    """Holds the MLflow client and the events not yet confirmed to the tracker."""

    def __init__(self, uri: str, conn: Connection) -> None:
        self.uri, self.conn = uri, conn
        self.client: Any = None
        self.run_id: str | None = None
        self.status_before: str | None = None  # a reopened run's status, restored by finish(None)
        # Events in the order the tracker holds them; True marks one the store already has.
        self.backlog: list[tuple[Event, bool]] = []
        self.monitor: Any = None  # MLflow's system metrics thread (logging.system_metrics)

        # After a resume: the steps the run holds per metric. A run resumed from an older checkpoint
        # (its newest was unreadable) trains steps again that the store already has; they are skipped.
        self.held: dict[str, set[int]] | None = None
        self.failed = False  # a write failed: said once, later failures are not repeated

    def connect(self) -> None:
        """Open the store (creating a sqlite file) before any run is asked for; `prestart` says when."""
        from mlflow.tracking import MlflowClient

        create_sqlite_store(self.uri)
        client = MlflowClient(self.uri)
        client.search_experiments(max_results=1)  # opens it (a schema check: about a second)
        self.client = client

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return  # the tracker went away without finish(): nothing more to do
            op, *args = message
            try:
                if op == "ping":
                    self.conn.send(("pong", args[0]))
                elif op == "connect":
                    self.try_connect()
                elif op == "open":
                    self.open(*args)
                elif op == "finish":
                    self.finish(args[0])
                    return
                elif self.run_id is not None:  # the store could not be opened: drop the rest
                    getattr(self, op)(*args)
            except Exception as err:
                if not self.failed:  # one line: a store that is down fails every call after this one
                    self.failed = True
                    self.warn(f"MLflow: {first_line(err)} (run {self.run_id}, store {self.uri})")
                if op == "finish":
                    return

    def try_connect(self) -> None:
        try:
            self.connect()
        except Exception:
            self.client = None  # "open" tries again and reports the error

    def warn(self, text: str) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("warn", text))

    # -- the operations ---------------------------------------------------------------------------

    def open(self, experiment: str, run_name: str, tags: dict[str, str], wanted: str | None) -> None:
        try:
            if self.client is None:
                self.connect()
            wanted = wanted or self.run_of_directory(experiment, tags.get("run_dir"))
            run_id = self.reopen(wanted, tags) if wanted else None
            if run_id is None:
                run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
                run_id = run.info.run_id
        except Exception as err:
            self.conn.send(("opened", None, first_line(err)))
            return
        self.run_id = run_id
        self.conn.send(("opened", run_id, None))

    def run_of_directory(self, experiment: str, run_dir: str | None) -> str | None:
        """The live run that an earlier start of this run directory opened, if any.

        A checkpoint taken before the run id was known names no run; resuming from it continues the
        run tagged with the same `run_dir`. A new run directory matches none.
        """
        if not run_dir or "'" in run_dir:  # no quoting in MLflow's filter strings
            return None
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = self.client.search_runs(
            [found.experiment_id], filter_string=f"tags.run_dir = '{run_dir}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def reopen(self, run_id: str, tags: dict[str, str]) -> str | None:
        """Set the run back to RUNNING; None when the store has no such live run."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            self.warn(f"MLflow: cannot reopen run {run_id} ({err}); starting a new run")
            return None
        if run.info.lifecycle_stage != "active":
            self.warn(f"MLflow: run {run_id} was deleted; starting a new run")
            return None
        self.status_before = run.info.status
        self.client.update_run(run_id, status="RUNNING")
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        return run_id

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location(self.uri))
            except MlflowException:  # another process created it a moment ago
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            self.warn(f"MLflow: experiment {name!r} was deleted; restoring it")
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def events(self, events: list[Event]) -> None:
        self.backlog.extend((tuple(event), self.holds(event)) for event in events)
        self.drain()

    def resume_events(self, events: list[Event]) -> None:
        """A resumed checkpoint's events, and the steps the run already holds for every metric.

        The checkpoint's own events may have reached the store before the crash; a resume from an
        older checkpoint (the newest unreadable) trains steps again that the store has. Each step
        is stored once: the first value written stays, later ones for the same metric and step are
        dropped (an exact resume computes the same values).
        """
        try:
            keys = set(self.client.get_run(self.run_id).data.metrics) | {event[0] for event in events}
            self.held = {
                key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in keys
            }
        except Exception as err:  # cannot tell: send them all rather than lose any
            self.warn(f"MLflow: could not read run {self.run_id}'s metrics back ({err})")
        self.events(events)

    def holds(self, event: Event) -> bool:
        return self.held is not None and event[3] in self.held.get(event[0], ())

    def drain(self) -> None:
        """Write the backlog oldest first, confirming each written prefix; a failure keeps the rest for later."""
        from mlflow.entities import Metric

        while self.backlog:
            end, chunk = 0, []
            while end < len(self.backlog) and len(chunk) < METRICS_PER_BATCH:
                event, stored = self.backlog[end]
                if not stored:
                    chunk.append(Metric(*event))
                end += 1
            if chunk:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            del self.backlog[:end]
            self.conn.send(("confirmed", end))

    def params(self, values: dict[str, str]) -> None:
        """Log params the run lacks; MLflow refuses to change one, so a changed value is reported."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
        if changed:
            self.warn(f"MLflow keeps the first value of params changed on resume: {', '.join(changed[:10])}")
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        for start in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + PARAMS_PER_BATCH], synchronous=True)

    def artifact(self, path: str) -> None:
        local = Path(path)
        if local.is_dir():
            self.client.log_artifacts(self.run_id, str(local), artifact_path=local.name)
        else:
            self.client.log_artifact(self.run_id, str(local))

    def image(self, name: str, png: bytes, step: int) -> None:
        where = PurePosixPath("figures", name)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp, f"{where.name}_step{step}.png")
            file.write_bytes(png)
            self.client.log_artifact(self.run_id, str(file), artifact_path=str(where.parent))

    def system_metrics(self) -> None:
        from src.tracking.system_metrics import start_monitor

        self.monitor, problem = start_monitor(self.run_id, self.uri)
        if problem:
            self.warn(f"MLflow: {problem}")

    def finish(self, status: str | None) -> None:
        if self.monitor is not None:  # its last samples go in before the run is closed
            from src.tracking.system_metrics import stop_monitor

            problem = stop_monitor(self.monitor)
            if problem:
                self.warn(problem)
        if self.run_id is not None:
            try:
                self.drain()
            finally:
                if status is None:
                    self.client.update_run(self.run_id, status=self.status_before or "FINISHED")
                else:
                    self.client.set_terminated(self.run_id, status)
        with contextlib.suppress(OSError):
            self.conn.send(("finished",))


def create_sqlite_store(uri: str) -> None:
    """A new sqlite store is built under a temporary name, then linked into place.

    Creating MLflow's tables takes seconds; a trainer killed in that time takes this process with it
    (see `_die_with_parent`), and a half-migrated database is one MLflow cannot open again. Built
    aside, a kill leaves only a temporary file, removed by the next start. If another process
    created the store meanwhile, its store is used and this one dropped.

    MLflow builds a store by running every schema migration since its first version: 3 s of CPU,
    most of this process's work in a short run. The first store built with an MLflow version is
    kept as a template (`empty_store_template`); later new stores are a copy of it.
    """
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a start that was killed
        with contextlib.suppress(ValueError, OSError):
            if not _alive(int(stale.suffixes[-2].lstrip("."))):
                stale.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    template = empty_store_template()
    if template is not None and template.is_file():
        shutil.copyfile(template, tmp)
    else:
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates every table
        if template is not None:  # another process may write it too: each writes aside, then renames
            with contextlib.suppress(OSError):
                template.parent.mkdir(parents=True, exist_ok=True)
                aside = template.with_name(f".{template.name}.{os.getpid()}.tmp")
                shutil.copyfile(tmp, aside)
                os.replace(aside, template)
    try:
        os.link(tmp, path)  # atomic, and never replaces a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def empty_store_template() -> Path | None:
    """Where a new, empty sqlite store of the installed MLflow version is kept: $XDG_CACHE_HOME or ~/.cache."""
    from importlib.metadata import PackageNotFoundError, version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        return cache / "torch-research-template" / f"mlflow-{version('mlflow')}-empty.db"
    except PackageNotFoundError:
        return None


def first_line(err: BaseException) -> str:
    """An error in one short line: SQLAlchemy and HTTP errors carry the statement or the whole URL."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside its file; MLflow would put them under the cwd."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri.removeprefix("sqlite:///")).resolve().parent.joinpath("mlartifacts").as_uri()
    return None


def _die_with_parent(parent: int) -> None:
    """On Linux the kernel kills this process when the trainer dies, mid-write or not, like a thread."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(0)


# MLflow's defaults retry an unreachable server for minutes (7 tries, 2 minutes each); a run's end
# waits 30 s for this process, so fail fast instead. The user's own settings win.
QUICK_STORE = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no usage-reporting thread in a process that should idle
}


def lower_priority() -> None:
    """Run only on CPU time that nothing else wants: training's threads and loader workers go first.

    SCHED_IDLE (Linux) is below any `nice` level: a step's intra-op threads are not preempted by this
    process mid-operation, which at `nice` 10 still cost a small model's steps several times over
    while MLflow was imported. Elsewhere, the lowest `nice`.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)


# MLflow imports pandas, NumPy and pyarrow for its dataset helpers, which this process never uses
# (it logs floats, params, tags and files): 40% of its import time. MLflow registers those helpers
# only if they import, so they are kept out.
UNUSED_MODULES = ("pandas", "numpy", "pyarrow")


def import_mlflow(uri: str) -> None:
    """MLflow's modules, before the store is opened: this runs while the trainer imports torch.

    For a database store that includes MLflow's SQLAlchemy store, alembic and the ORM mappers: most
    of what opening the store costs (0.9 s of CPU), so opening it later is cheap.
    """
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    import mlflow.tracking

    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    # MLflow, alembic, SQLAlchemy and urllib3 log every retry of a store that is down (~90 lines
    # with tracebacks for a read-only sqlite file); the tracker says it once, in one line.
    level = os.environ.get("MLFLOW_LOGGING_LEVEL", "CRITICAL").upper()
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(level)


def main(argv: list[str]) -> None:
    fd, uri, parent = int(argv[1]), argv[2], int(argv[3])
    _die_with_parent(parent)
    lower_priority()
    for key, value in QUICK_STORE.items():
        os.environ.setdefault(key, value)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then ends the run
    os.dup2(2, 1)  # anything printed goes to stderr, never into the trainer's stdout
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s WARNING %(name)s: %(message)s")
    import_mlflow(uri)
    Worker(uri, Connection(fd)).serve()  # the store is opened at "connect" (prestart) or "open"


if __name__ == "__main__":
    main(sys.argv)
