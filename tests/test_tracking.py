"""Tracking backends against the real tools: a sqlite MLflow store, TensorBoard event files, a pty."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from src.tracking import (
    MetricsFile,
    MlflowTracker,
    MultiTracker,
    TensorBoardTracker,
    Tracker,
    resolve_tracking_uri,
    setup_logging,
)
from tests.helpers import run_in_terminal

REPO = Path(__file__).resolve().parents[1]


# -- MLflow ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module: creating its tables takes seconds, runs are cheap."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store)


def _steps(store: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in _client(store).get_metric_history(run_id, key))


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _log_steps(tracker: Tracker, steps: range, offset: float = 0.0) -> None:
    for step in steps:
        tracker.log_metrics({"train_loss": 1.0 / (step + 1) + offset}, step=step, epoch=step // 3)


def test_mlflow_run_holds_params_metrics_artifact_figure(store: str, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    tracker = MlflowTracker(store, "round_trip", "run_a", tags={"model": "TinyNet"})
    params = {f"group.key{i}": i for i in range(150)}  # more than one batch of 100
    params["model.long"] = "x" * 7000  # over MLflow's value limit
    tracker.log_params(params)
    for chunk in (range(0, 4), range(4, 8), range(8, 12)):
        _log_steps(tracker, chunk)
        tracker.state()
        tracker.commit()
    (tmp_path / "config.yaml").write_text("model: TinyNet\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    tracker.log_image("confusion_matrix", _png(figure), step=11)
    tracker.finish("FINISHED")

    client = _client(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run_a"
    assert run.data.tags["model"] == "TinyNet"
    assert client.get_experiment(run.info.experiment_id).name == "round_trip"
    assert _steps(store, tracker.run_id, "train_loss") == list(range(12))
    assert run.data.params["group.key149"] == "149"
    assert len(run.data.params) == 151
    assert run.data.params["model.long"] == "x" * 6000
    assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    figures = [a.path for a in client.list_artifacts(tracker.run_id, "figures")]
    assert figures == ["figures/confusion_matrix_step11.png"]
    # artifacts of a sqlite store sit beside the database, not in the working directory
    db_folder = Path(store.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_folder / "mlartifacts").as_uri())


def test_mlflow_reopened_run_after_crash_has_each_step_once(store: str) -> None:
    first = MlflowTracker(store, "resume", "run_b", tags={})
    _log_steps(first, range(0, 5))
    assert first.run_id is not None  # open: checkpoints from here on name the run
    state = first.state()
    first.commit()
    assert first.flush(timeout=60)
    _log_steps(first, range(5, 8), offset=100.0)  # logged after the checkpoint: lost with the crash
    del first  # abandoned without finish, like a killed process

    second = MlflowTracker(store, "resume", "run_b", tags={}, run_id=state["run_id"])
    assert second.run_id == state["run_id"]
    assert _client(store).get_run(state["run_id"]).info.status == "RUNNING"
    second.resume(state)
    _log_steps(second, range(5, 10))
    second.state()
    second.commit()
    second.finish("FINISHED")

    client = _client(store)
    history = client.get_metric_history(state["run_id"], "train_loss")
    assert sorted(m.step for m in history) == list(range(10))
    assert all(m.value < 100 for m in history)  # nothing from after the checkpoint of the crashed run
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(state["run_id"]).info.status == "FINISHED"

    # evaluating the finished run later adds its test metrics and leaves it FINISHED
    tester = MlflowTracker(store, "resume", "run_b", tags={}, run_id=state["run_id"])
    tester.log_metrics({"test_accuracy": 0.75}, step=9, epoch=3)
    tester.commit()
    tester.finish(None)
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == 0.75


def test_mlflow_checkpoint_before_the_run_is_open_costs_nothing_and_resumes_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint taken while MLflow's child is still starting holds no run id and never waits for
    it; resuming from it finds the run by its run_dir tag, and user code is pointed at the run once open."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"run_dir": str(tmp_path / "run")}
    first = MlflowTracker(store, "early", "run_g", tags=tags)
    os.kill(first._child.process.pid, signal.SIGSTOP)  # the child cannot open the run until SIGCONT
    try:
        _log_steps(first, range(3))
        state = first.state()  # would hang here if it waited for the run
        first.make_active(wait=False)
        assert state["run_id"] is None and len(state["pending"]) == 3
        assert "MLFLOW_RUN_ID" not in os.environ
    finally:
        os.kill(first._child.process.pid, signal.SIGCONT)
    assert first.run_id is not None
    assert os.environ["MLFLOW_RUN_ID"] == first.run_id  # set by the reader thread when the run opened
    first.commit()
    assert first.flush(timeout=60)
    del first  # killed before any checkpoint named the run

    second = MlflowTracker(store, "early", "run_g", tags=tags)  # resumed from `state`: no run id in it
    second.resume(state)
    _log_steps(second, range(3, 5))
    second.state()
    second.commit()
    second.finish("FINISHED")
    other = MlflowTracker(store, "early", "run_h", tags={"run_dir": str(tmp_path / "other")})
    other.finish("FINISHED")

    client = _client(store)
    experiment = client.get_experiment_by_name("early")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # the resumed run and the other one
    assert second.run_id == os.environ["MLFLOW_RUN_ID"] and other.run_id != second.run_id
    assert _steps(store, second.run_id, "train_loss") == [0, 1, 2, 3, 4]
    assert client.get_run(second.run_id).info.status == "FINISHED"


def test_a_kill_while_the_mlflow_store_is_created_leaves_no_half_made_store(tmp_path: Path) -> None:
    """The trainer's death kills MLflow's child, maybe while it creates a new store's tables; the
    store is built aside and linked into place, so the next start opens it as if nothing happened."""
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from src.tracking.mlflow_worker import create_sqlite_store; create_sqlite_store({uri!r})"
    no_template = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # MLflow builds the tables
    child = subprocess.Popen([sys.executable, "-c", code], env=no_template)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".mlflow.db.*.tmp")):
        assert child.poll() is None and time.monotonic() < deadline, "the store was not built aside"
        time.sleep(0.002)
    child.kill()
    child.wait()
    assert not (tmp_path / "mlflow.db").exists()

    tracker = MlflowTracker(uri, "after_kill", "run_k", tags={})
    _log_steps(tracker, range(2))
    tracker.finish("FINISHED")
    assert tracker.run_id is not None
    assert _steps(uri, tracker.run_id, "train_loss") == [0, 1]
    assert not list(tmp_path.glob(".mlflow.db.*.tmp"))  # the killed start's file is gone


def test_a_new_mlflow_store_is_a_copy_of_the_first_one_mlflow_built(tmp_path: Path) -> None:
    """MLflow's migrations run once per MLflow version (3 s of CPU); later new stores copy that result."""
    cache = tmp_path / "cache"
    code = "import sys; sys.path.insert(0, sys.argv[1]); from src.tracking.mlflow_worker import create_sqlite_store; create_sqlite_store(sys.argv[2])"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    for name in ("first.db", "second.db"):
        uri = f"sqlite:///{tmp_path / name}"
        subprocess.run([sys.executable, "-c", code, str(REPO), uri], env=env, check=True, timeout=120)
    (template,) = cache.glob("torch-research-template/mlflow-*-empty.db")
    assert (tmp_path / "second.db").read_bytes() == template.read_bytes()
    uri = f"sqlite:///{tmp_path / 'second.db'}"
    tracker = MlflowTracker(uri, "copied", "run_t", tags={})
    _log_steps(tracker, range(3))
    tracker.state()
    tracker.commit()
    tracker.finish("FINISHED")
    assert _steps(uri, tracker.run_id, "train_loss") == [0, 1, 2]


@pytest.mark.slow
def test_mlflow_sigkill_right_after_commit_loses_nothing(store: str) -> None:
    """The commit may not have reached the store when the process dies; resume sends it then."""
    child = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from src.tracking import MlflowTracker
        tracker = MlflowTracker({store!r}, "killed", "run_c", tags={{}})
        for step in range(5):
            tracker.log_metrics({{"train_loss": float(step)}}, step=step, epoch=0)
        tracker.run_id  # open: the checkpoint names the run
        print(json.dumps(tracker.state()), flush=True)
        tracker.commit()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    state = json.loads(done.stdout.splitlines()[-1])
    assert len(state["pending"]) == 5

    tracker = MlflowTracker(store, "killed", "run_c", tags={}, run_id=state["run_id"])
    tracker.resume(state)
    _log_steps(tracker, range(5, 7))
    tracker.finish("FINISHED")
    assert _steps(store, state["run_id"], "train_loss") == list(range(7))


def test_mlflow_failed_run_keeps_only_checkpointed_events(store: str) -> None:
    tracker = MlflowTracker(store, "failed", "run_d", tags={})
    _log_steps(tracker, range(0, 3))
    tracker.state()
    tracker.commit()
    _log_steps(tracker, range(3, 5))  # a resume from the checkpoint would log these again
    tracker.finish("FAILED")
    assert _client(store).get_run(tracker.run_id).info.status == "FAILED"
    assert _steps(store, tracker.run_id, "train_loss") == [0, 1, 2]


def test_mlflow_unusable_store_warns_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tracker = MlflowTracker(f"sqlite:///{blocker}/sub/mlflow.db", "x", "y", tags={})
    with caplog.at_level(logging.WARNING, logger="template.tracking"):
        assert tracker.run_id is None
    _log_steps(tracker, range(3))
    tracker.log_params({"a": 1})
    assert tracker.state()["run_id"] is None
    tracker.commit()
    tracker.finish("FINISHED")
    assert "tracking is off" in caplog.text


def test_mlflow_calls_run_in_a_child_process_and_its_death_never_stops_training(store: str) -> None:
    """The trainer's process never imports MLflow (its import and store set-up hold the GIL for
    seconds); a prestarted child is taken over; a dead child costs events, never an exception."""
    child = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from src.tracking import MlflowTracker
        from src.tracking.mlflow_tracker import _spares, prestart
        prestart({store!r})
        spare = _spares[{store!r}].process.pid
        tracker = MlflowTracker({store!r}, "child", "run_e", tags={{}})
        tracker.log_metrics({{"train_loss": 1.0}}, step=1, epoch=0)
        tracker.state()
        tracker.commit()
        tracker.make_active()
        tracker.finish("FINISHED")
        doomed = MlflowTracker({store!r}, "child", "run_f", tags={{}})
        doomed.run_id
        os.kill(doomed._child.process.pid, signal.SIGKILL)
        doomed._child.process.wait()
        doomed.log_metrics({{"train_loss": 2.0}}, step=1, epoch=0)
        kept = doomed.state()["pending"]
        doomed.commit()
        assert doomed.flush(timeout=10)
        doomed.finish("FINISHED")
        print(json.dumps({{"run_id": tracker.run_id, "adopted": tracker._child.process.pid == spare,
                          "env": os.environ.get("MLFLOW_TRACKING_URI"), "kept": kept,
                          "imported": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["imported"] == [] and seen["adopted"]
    assert seen["env"] == store  # user code's mlflow.log_metric resumes this run
    assert seen["kept"] == [["train_loss", 2.0, seen["kept"][0][2], 1]]  # in the checkpoint, for resume
    assert _client(store).get_run(seen["run_id"]).info.status == "FINISHED"
    assert _steps(store, seen["run_id"], "train_loss") == [1]
    assert "ended early" in done.stderr


def test_resolve_tracking_uri_prefers_config_then_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "result") == f"sqlite:///{tmp_path}/result/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("", Path("result")) == f"sqlite:///{tmp_path}/result/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None, Path("result")) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///other.db", Path("result")) == "sqlite:///other.db"


# -- metrics.jsonl --------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_file_resume_cuts_events_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first = MetricsFile(path)
    _log_steps(first, range(0, 3))
    state = first.state()
    first.commit()
    _log_steps(first, range(3, 5), offset=100.0)
    assert len(_records(path)) == 5  # flushed per line, visible before any commit
    assert state == {"lines": 3}

    second = MetricsFile(path)  # a new process opening the same run directory
    assert second.state() == {"lines": 5}
    second.resume(state)
    assert [r["step"] for r in _records(path)] == [0, 1, 2]
    _log_steps(second, range(3, 6))
    second.finish("FINISHED")

    records = _records(path)
    assert [r["step"] for r in records] == list(range(6))
    assert all(r["train_loss"] < 100 for r in records)
    assert records[4] == {"epoch": 1, "step": 4, "train_loss": 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


# -- TensorBoard ----------------------------------------------------------------------------------


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


@pytest.mark.parametrize("purge_in_constructor", [True, False])
def test_tensorboard_resume_replaces_events_after_the_checkpoint(
    tmp_path: Path, purge_in_constructor: bool
) -> None:
    first = TensorBoardTracker(tmp_path)
    _log_steps(first, range(0, 4))
    state = first.state()
    assert state == {"step": 3}
    first.commit()
    _log_steps(first, range(4, 6), offset=100.0)
    first.commit()  # the stale events are on disk when the process dies

    if purge_in_constructor:
        second = TensorBoardTracker(tmp_path, purge_step=state["step"] + 1)
    else:
        second = TensorBoardTracker(tmp_path)
    second.resume(state)
    _log_steps(second, range(4, 7))
    second.finish("FINISHED")

    scalars = _scalars(tmp_path, "train_loss")
    assert [step for step, _ in scalars] == list(range(7))
    assert all(value == pytest.approx(1.0 / (step + 1)) for step, value in scalars)


def test_tensorboard_figure_and_multitracker_state(tmp_path: Path) -> None:
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = MultiTracker([MetricsFile(tmp_path / "metrics.jsonl"), TensorBoardTracker(tmp_path / "tb")])
    _log_steps(tracker, range(3))
    figure = Figure()
    figure.add_subplot().imshow([[1, 0], [0, 1]])
    tracker.log_image("val/confusion_matrix", _png(figure), step=2)
    assert tracker.state() == {"MetricsFile": {"lines": 3}, "TensorBoardTracker": {"step": 2}}
    tracker.finish("FINISHED")

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["val/confusion_matrix"]
    assert [e.step for e in accumulator.Images("val/confusion_matrix")] == [2]


def test_multitracker_finishes_every_tracker_then_reraises(tmp_path: Path) -> None:
    class Broken(Tracker):
        def finish(self, status: str) -> None:
            raise OSError("disk full")

    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    tracker = MultiTracker([Broken(), metrics])
    tracker.log_metrics({"val_loss": 0.5}, step=1, epoch=0)
    with pytest.raises(OSError, match="disk full"):
        tracker.finish("FAILED")
    assert metrics._file.closed
    assert _records(tmp_path / "metrics.jsonl") == [{"epoch": 0, "step": 1, "val_loss": 0.5}]


# -- console log and progress ---------------------------------------------------------------------


@pytest.fixture
def clean_logger():
    yield
    logger = logging.getLogger("template")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"


def test_setup_logging_appends_timestamped_lines(tmp_path: Path, clean_logger, capsys) -> None:
    log_file = tmp_path / "run" / "train.log"
    logger = setup_logging(log_file, rank=0)
    logger.info("first run")
    logger.debug("hidden without debug")
    logger = setup_logging(log_file, rank=0, debug=True)  # e.g. a resumed run: same file, no doubled lines
    logging.getLogger("template.engine").debug("resumed")
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(rf"{STAMP} \| INFO \| first run", lines[0])
    assert re.fullmatch(rf"{STAMP} \| DEBUG \| resumed", lines[1])
    assert capsys.readouterr().err.count("first run") == 1


def test_setup_logging_other_ranks_warn_only_with_rank(tmp_path: Path, clean_logger, capsys) -> None:
    logger = setup_logging(tmp_path / "train.log", rank=3)
    logger.info("chatty")
    logger.warning("slow disk")
    err = capsys.readouterr().err
    assert "chatty" not in err
    assert re.search(rf"{STAMP} \| WARNING \| \[rank 3\] slow disk", err)
    assert not (tmp_path / "train.log").exists()


PROGRESS_CHILD = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {str(REPO)!r})
    from src.tracking import Progress, setup_logging
    setup_logging(None, rank=0)
    with Progress(total=0, desc="off", enabled=False) as quiet:
        quiet.update(1, loss=9.0)
    bar = Progress(total=20, desc="epoch 1", enabled=True, every=8)
    for i in range(20):
        bar.update(1, loss=1.0 / (i + 1), lr=0.001)
        time.sleep(0.01)
    bar.close()
    """
)


def test_progress_draws_a_bar_on_a_terminal() -> None:
    output = run_in_terminal([sys.executable, "-c", PROGRESS_CHILD], rows=24, cols=100)
    assert "\r" in output
    assert "%|" in output or "it/s" in output
    assert "epoch 1" in output
    assert "off" not in output


def test_progress_logs_plain_lines_when_piped() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRESS_CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    assert "\x1b[" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "epoch 1" in line]
    counts = [re.search(r"epoch 1 (\d+)/20", line).group(1) for line in lines]
    assert counts == ["8", "16", "20"]
    assert re.match(
        rf"{STAMP} \| INFO \| epoch 1 20/20 \(100%\) \| [\d.]+ it/s \| .* loss=0\.05 lr=0\.001$", lines[-1]
    )
    assert "off" not in done.stderr
