"""Tracking end to end: real train.py runs read back with MLflow's client, TensorBoard's reader and a terminal."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    TINY,
    explain,
    only_run_dir,
    read_metrics,
    run_in_terminal,
    run_script,
    start_script,
    wait_for_line,
)

NO_TRACKERS = TINY[:2]  # logging.mlflow=false logging.tensorboard=false
SMALL = TINY[2:]  # epoch=2 batch=16 and small splits: 4 optimizer steps per epoch


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def only_mlflow_run(uri: str, experiment: str = "SyntheticClassification"):
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def saved_uri(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["logging"]["mlflow_tracking_uri"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One short run with MLflow and TensorBoard on, as the defaults have them (system metrics sampled
    every second instead of every 10, so that a run of seconds holds some)."""
    out = tmp_path_factory.mktemp("tracked")
    proc = run_script(
        "train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.log_frequency=2",
        env={"MLFLOW_TRACKING_URI": "", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    return out, only_run_dir(out), proc


# ---------------------------------------------------------------------- MLflow
def test_mlflow_holds_the_finished_run(tracked, tmp_path):
    out, run_dir, _ = tracked
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    assert saved_uri(run_dir) == uri  # the store in use is in the saved config
    client, run = only_mlflow_run(uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_dir.name

    events = read_metrics(run_dir)
    val = [e for e in events if "val_accuracy" in e]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(e["step"], e["val_accuracy"]) for e in val]
    train = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in train] == [e["step"] for e in events if "train_loss" in e]
    test = json.loads((run_dir / "test/metrics.json").read_text())
    assert run.data.metrics["test_accuracy"] == test["test_accuracy"]

    params = run.data.params
    assert params["optimizer.lr"] == "0.003" and params["model.name"] == "SimpleCNN"
    assert params["dataset.train_size"] == "64" and params["run_dir"] == str(run_dir)
    tags = run.data.tags
    assert tags["tag"] == "dummy" and tags["host"] == socket.gethostname()
    if (ROOT / ".git").exists():  # a git checkout, not an unpacked archive
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]) and tags["git_dirty"] in ("true", "false")
        known = subprocess.run(["git", "cat-file", "-e", f"{tags['git_commit']}^{{commit}}"], cwd=ROOT)
        assert known.returncode == 0  # a commit of this repository

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "test"} <= top
    tested = {a.path for a in client.list_artifacts(run.info.run_id, "test")}
    assert {"test/metrics.json", "test/classification_report.txt", "test/confusion_matrix.png"} <= tested
    copy = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert Path(copy).read_text() == (run_dir / "config.yaml").read_text()


def test_a_run_shorter_than_the_sampling_interval_still_holds_one_system_sample(tmp_path):
    """MLflow's sampler logs only after a full interval; the closing sample covers a shorter run."""
    out = tmp_path / "short"
    proc = run_script("train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.tensorboard=false",
                      env={"MLFLOW_TRACKING_URI": "", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "600"})  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    client, run = only_mlflow_run(f"sqlite:///{out.resolve()}/mlflow.db")
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in cpu] == [0] and 0 <= cpu[0].value <= 100
    assert run.info.status == "FINISHED"


def test_mlflow_holds_cpu_and_memory_use_over_time(tracked, tmp_path):
    """logging.system_metrics (on by default): MLflow's sampler, read back from the store."""
    import psutil

    out, _, _ = tracked
    client, run = only_mlflow_run(f"sqlite:///{out.resolve()}/mlflow.db")
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert cpu and memory, sorted(run.data.metrics)
    assert [m.step for m in cpu] == list(range(len(cpu)))  # one step per sample
    assert all(0 <= m.value <= 100 for m in cpu)
    total_mb = psutil.virtual_memory().total / 1e6  # MLflow counts megabytes of 10^6 bytes
    assert all(0 < m.value <= total_mb for m in memory)
    assert not any(k.startswith("system/gpu") for k in run.data.metrics)  # no GPU here

    off = tmp_path / "off"
    proc = run_script("train.py", "config/dummy.yaml", f"output={off}", *SMALL, "logging.tensorboard=false",
                      "logging.system_metrics=false",
                      env={"MLFLOW_TRACKING_URI": "", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    client, run = only_mlflow_run(f"sqlite:///{off.resolve()}/mlflow.db")
    assert "test_accuracy" in run.data.metrics
    assert not any(k.startswith("system/") for k in run.data.metrics)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["nan loss", "model raises"])
def test_mlflow_marks_a_failed_run_failed(tmp_path, failure):
    """NaN through the template's own check (RunError); an exception from user code mid-run (epoch 2)."""
    out = tmp_path / "out"
    if failure == "nan loss":  # the store from the environment this time
        uri = f"sqlite:///{tmp_path}/from_env.db"
        args = ["optimizer.name=SGD", "optimizer.lr=1e30", "logging.log_frequency=1"]
        env = {"MLFLOW_TRACKING_URI": uri}
    else:  # and from the config
        uri = f"sqlite:///{tmp_path}/from_config.db"
        (tmp_path / "exploding.py").write_text(EXPLODING)
        args = [
            "imports=[exploding]",
            "model.name=ExplodingCNN",
            "model.width=8",
            f"logging.mlflow_tracking_uri={uri}",
            "evaluator.name=logging_evaluator",
            "evaluator.num_classes=10",
        ]
        env = {"PYTHONPATH": str(tmp_path), "MLFLOW_TRACKING_URI": "sqlite:///nowhere/else.db"}
    proc = run_script(
        "train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.tensorboard=false", *args, env=env
    )
    assert proc.returncode == 1, explain(proc)
    run_dir = only_run_dir(out)
    assert saved_uri(run_dir) == uri and not (out / "mlflow.db").exists()
    client, run = only_mlflow_run(uri)
    assert run.info.status == "FAILED"
    assert "the run FAILED" in (run_dir / "train.log").read_text()
    assert not (run_dir / "summary.txt").exists()
    if failure == "model raises":  # the first epoch, checkpointed before the crash, is in MLflow
        assert (run_dir / "checkpoints/last.pth").is_file()
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [4]
        # and so is what the user's evaluator logged with mlflow.log_metric, as the guide shows
        custom = client.get_metric_history(run.info.run_id, "custom_accuracy")
        assert [m.value for m in custom] == [history[0].value]


EXPLODING = textwrap.dedent(
    '''
    """A user's model that breaks in the middle of the second epoch, and an evaluator that logs to MLflow."""
    import mlflow

    from src import EVALUATOR_REGISTRY, MODEL_REGISTRY
    from src.evaluators.classification import ClassificationEvaluator
    from src.models.small import SimpleCNN


    @EVALUATOR_REGISTRY.register("logging_evaluator")
    class LoggingEvaluator(ClassificationEvaluator):
        def compute(self):
            metrics = super().compute()
            self.log_custom_metrics({"custom_accuracy": metrics["accuracy"]})
            return metrics

        def log_custom_metrics(self, metrics_dict):
            for key, value in metrics_dict.items():
                mlflow.log_metric(key, value)


    @MODEL_REGISTRY.register()
    class ExplodingCNN(SimpleCNN):
        calls = 0

        def forward(self, x):
            if self.training:
                ExplodingCNN.calls += 1
                if ExplodingCNN.calls == 6:  # 4 training steps per epoch
                    raise RuntimeError("the user's model broke")
            return super().forward(x)
    '''
)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (exit {proc.returncode}) before the expected checkpoint")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for a checkpoint")
        time.sleep(0.02)


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_mlflow_run_survives_sigterm_and_sigkill_as_one_run(tmp_path):
    """Stopped by SIGTERM (KILLED), resumed, killed outright, resumed again: one MLflow run, each step once."""
    out = tmp_path / "out"
    args = [
        "config/dummy.yaml", f"output={out}", "epoch=3", "batch=16", "dataset.train_size=128", "dataset.val_size=32",
        "dataset.test_size=32", "logging.log_frequency=1", "checkpoint.save_every_n_steps=2",
        "logging.tensorboard=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}

    def start(*argv: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def last() -> Path | None:
        found = list(out.glob("*/*/checkpoints/last.pth"))
        return found[0] if found else None

    first = start(*args)
    wait_for(lambda: last() is not None, first)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 128 + signal.SIGTERM, err[-3000:]
    run_dir = last().parents[1]
    uri = saved_uri(run_dir)
    client, run = only_mlflow_run(uri)
    assert run.info.status == "KILLED"
    run_id = run.info.run_id

    before = mtime(run_dir / "checkpoints/last.pth")
    second = start(str(run_dir / "config.yaml"))
    wait_for(lambda: mtime(run_dir / "checkpoints/last.pth") not in (0, before), second)
    second.kill()  # SIGKILL: no handler, no status update, events after the checkpoint lost
    second.wait(timeout=60)
    _, run = only_mlflow_run(uri)
    # No status update after SIGKILL: RUNNING if MLflow's child had reopened the run, else still KILLED.
    assert run.info.run_id == run_id and run.info.status in ("RUNNING", "KILLED")

    proc = run_script("train.py", str(run_dir / "config.yaml"))
    assert proc.returncode == 0, explain(proc)
    client, run = only_mlflow_run(uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    events = read_metrics(run_dir)
    train_steps = [e["step"] for e in events if "train_loss" in e]
    assert train_steps == list(range(1, 3 * 8 + 1))  # each step logged once in the run's own history
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == train_steps
    val = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy"))
    assert val == [(e["step"], e["val_accuracy"]) for e in events if "val_accuracy" in e]
    assert [step for step, _ in val] == [8, 16, 24]


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_event_files_hold_the_scalars_and_figure(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = tracked
    reader = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    tags = reader.Tags()
    assert {"train_loss", "val_accuracy", "val_loss", "lr", "samples_per_sec", "train_epoch_loss"} <= set(
        tags["scalars"]
    )
    events = read_metrics(run_dir)
    for key in ("train_loss", "val_accuracy", "lr"):
        expected = [(e["step"], e[key]) for e in events if key in e]
        got = [(s.step, s.value) for s in reader.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), (
            key
        )  # stored as float32
    assert "confusion_matrix" in tags["images"]


# ---------------------------------------------------------------------- console, train.log, summary
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| (INFO|WARNING|ERROR) \| ")


def test_piped_output_is_plain_timestamped_lines_with_a_summary(tracked):
    _, run_dir, proc = tracked
    log = (run_dir / "train.log").read_text()
    for text in (proc.stderr, log):
        assert "\r" not in text and "\x1b[" not in text  # no bar redraws or terminal codes
    assert all(STAMP.match(line) for line in log.splitlines())
    assert sum(bool(STAMP.match(line)) for line in proc.stderr.splitlines()) >= 10
    assert re.search(r"\| INFO \| epoch 1 step 2: train_loss=[\d.]+, lr=", log)

    summary = (run_dir / "summary.txt").read_text()
    val = [e for e in read_metrics(run_dir) if "val_loss" in e]
    best = min(val, key=lambda e: e["val_loss"])  # checkpoint.monitor val_loss, mode min
    assert f"val_loss = {best['val_loss']:.6g} at epoch {best['epoch']}" in summary
    assert re.search(r"wall time:\s+\d+:\d\d:\d\d", summary)
    assert f"python train.py {run_dir}/config.yaml" in summary
    assert f"python test.py {run_dir}/config.yaml" in summary
    assert summary.splitlines()[-1] in proc.stderr  # also shown at the end of the console output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminals as on Linux")
def test_a_terminal_gets_progress_bars_for_training_and_validation(tmp_path):
    text = run_in_terminal(
        [sys.executable, "train.py", "config/dummy.yaml", f"output={tmp_path}", *NO_TRACKERS, *SMALL,
         "logging.log_frequency=1"],
        rows=40,
        cols=120,
    )  # fmt: skip
    assert "\r" in text  # tqdm redraws its line in place
    assert re.search(r"\repoch 1/2: +\d+%\|.*\| \d/4 \[.*it/s", text), text[-3000:]  # the training bar
    # each log line redraws the bar below it with the values it just logged
    assert re.search(r"\repoch 1/2: .*it/s, loss=[\d.]+, lr=[\d.e-]+, samples/s=[\d.]+\]", text), text[-3000:]
    assert re.search(r"\rval 2/2: +\d+%\|.*\| \d/2 \[.*it/s", text), text[-3000:]  # and validation's
    plain = re.sub(r"\x1b\[[\d;]*m", "", text)  # a terminal's log lines are coloured
    assert re.search(r"\| INFO \| epoch 2 step 8: ", plain)  # the log lines still come, between bar redraws
    log = (only_run_dir(tmp_path) / "train.log").read_text()
    assert "\r" not in log and "it/s" not in log  # the bar stays on the terminal


# ---------------------------------------------------------------------- MLflow faults
def warnings_of(proc: subprocess.CompletedProcess | str) -> list[str]:
    text = proc if isinstance(proc, str) else proc.stdout + proc.stderr
    return [line for line in text.splitlines() if "WARNING" in line or "ERROR" in line or "Traceback" in line]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mlflow_server_gives_one_warning_and_a_way_to_log_later(tmp_path):
    """A closed port: the run trains, tests and exits 0 at once (MLflow's default retries took 8 min), one
    warning line names metrics.jsonl and script/log_to_mlflow.py, which then logs every step once."""
    out = tmp_path / "out"
    uri = f"http://127.0.0.1:{closed_port()}"
    proc = run_script(
        "train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.tensorboard=false",
        "logging.log_frequency=1", f"logging.mlflow_tracking_uri={uri}", timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    run_dir = only_run_dir(out)
    assert (run_dir / "test/metrics.json").is_file() and (run_dir / "summary.txt").is_file()
    lines = warnings_of(proc)
    assert len(lines) == 1, lines
    assert uri in lines[0] and f"python script/log_to_mlflow.py {run_dir}" in lines[0]
    assert "Retrying" not in proc.stdout + proc.stderr

    store = f"sqlite:///{tmp_path}/later.db"
    for _ in range(2):  # twice: the second run finds every step there and adds nothing
        later = run_script("script/log_to_mlflow.py", str(run_dir), "--tracking-uri", store)
        assert later.returncode == 0, explain(later)
    client, run = only_mlflow_run(store)
    assert run.info.status == "FINISHED" and run.data.params["optimizer.lr"] == "0.003"
    events = read_metrics(run_dir)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [
        (e["step"], e["train_loss"]) for e in events if "train_loss" in e
    ]
    test = json.loads((run_dir / "test/metrics.json").read_text())
    assert run.data.metrics["test_accuracy"] == test["test_accuracy"]


def test_log_to_mlflow_refuses_a_folder_that_is_no_run(tmp_path):
    proc = run_script("script/log_to_mlflow.py", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path.resolve() / 'config.yaml'} not found; give a result directory of train.py"
    ]


@pytest.fixture
def read_only_store(tmp_path):
    """An MLflow sqlite store on a tmpfs remounted read-only: unwritable for root too (chmod is not)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        made = tmp_path / "mlflow.db"
        client_for(f"sqlite:///{made}").search_experiments(max_results=1)  # a real, complete store
        shutil.copyfile(made, folder / "mlflow.db")  # copied: this process keeps its own file open
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        uri = f"sqlite:///{folder}/mlflow.db"
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        yield uri
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_mlflow_store_gives_one_warning_not_sqlalchemy_retries(tmp_path, read_only_store):
    out = tmp_path / "out"
    proc = run_script(
        "train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.tensorboard=false",
        f"logging.mlflow_tracking_uri={read_only_store}", timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    run_dir = only_run_dir(out)
    assert (run_dir / "test/metrics.json").is_file()
    lines = warnings_of(proc)
    assert len(lines) == 1, lines
    assert "readonly database" in lines[0] and "log_to_mlflow.py" in lines[0]
    assert "sqlalchemy" not in (proc.stdout + proc.stderr).lower()


class BlackHole:
    """A server on 127.0.0.1 that accepts connections and never answers: a store that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"


@pytest.mark.slow
def test_a_hanging_mlflow_store_holds_the_end_of_a_run_30_s_at_most(tmp_path):
    """MLflow's child never gets an answer: the last checkpoint waits for the run at most 30 s, then the
    run tests and exits 0 with one warning (before: 8 minutes in settle, then the run untested)."""
    hole = BlackHole()
    out = tmp_path / "out"
    proc = run_script(
        "train.py", "config/dummy.yaml", f"output={out}", *SMALL, "logging.tensorboard=false",
        f"logging.mlflow_tracking_uri={hole.uri}", timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    run_dir = only_run_dir(out)
    assert (run_dir / "test/metrics.json").is_file()
    lines = warnings_of(proc)
    assert len(lines) == 1 and hole.uri in lines[0] and "log_to_mlflow.py" in lines[0], lines
    log = (run_dir / "train.log").read_text()
    assert f"waiting up to 30 s for MLflow ({hole.uri})" in log


def test_a_stop_signal_during_the_wait_for_a_hanging_store_is_honoured(tmp_path):
    hole = BlackHole()
    out = tmp_path / "out"
    log_file = tmp_path / "train.out"
    args = [*SMALL, "logging.tensorboard=false", f"logging.mlflow_tracking_uri={hole.uri}"]
    proc = start_script("train.py", "config/dummy.yaml", f"output={out}", *args, log_file=log_file)
    try:
        wait_for_line(proc, log_file, "waiting up to 30 s for MLflow", timeout=240)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, log_file.read_text()[-3000:]
    run_dir = only_run_dir(out)
    assert (run_dir / "checkpoints/last.pth").is_file()
    text = log_file.read_text()  # the wait ended on the signal, not at its 30 s deadline
    assert "a stop signal ended the wait" in text and "log_to_mlflow.py" in text


@pytest.mark.slow
def test_mlflow_holds_each_step_once_after_a_fallback_to_an_older_checkpoint(tmp_path):
    """last.pth and best.pth unreadable: the resume starts from previous.pth and trains epoch 2 again; MLflow, which
    holds epoch 2's steps already, keeps them once (before: 16 points for 12 steps)."""
    out = tmp_path / "out"
    base = [
        "config/dummy.yaml",
        f"output={out}",
        *SMALL,
        "logging.tensorboard=false",
        "logging.log_frequency=1",
    ]
    proc = run_script("train.py", *base, env={"MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, explain(proc)
    run_dir = only_run_dir(out)
    for newer in ("last.pth", "best.pth"):  # corrupt in place, as a failing disk would (best may be a link)
        with open(run_dir / "checkpoints" / newer, "r+b") as f:
            f.truncate(1000)
    proc = run_script("train.py", str(run_dir / "config.yaml"), "epoch=3")
    assert proc.returncode == 0, explain(proc)
    assert "previous.pth" in proc.stdout + proc.stderr  # it did fall back
    client, run = only_mlflow_run(saved_uri(run_dir))
    assert run.info.status == "FINISHED"
    events = read_metrics(run_dir)
    for key, every in (("train_loss", list(range(1, 13))), ("val_accuracy", [4, 8, 12])):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == every, (key, steps)
        assert [e["step"] for e in events if key in e] == every
