"""script/sweep.py --optuna: a real Optuna study (sqlite) whose trials are real train.py runs.

The pruner reads each trial's metrics.jsonl and stops a poor trial with SIGTERM, so it keeps a
checkpoint; the sweep process is SIGKILLed mid-trial and the same command resumes that trial in its
own directory and trains nothing that finished.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, explain, run_script, slow_mlp_source, start_script, user_module_config
from tests.test_workflows import load_script

# 48 samples / batch 8 = 6 steps per epoch of 0.05 s each: a pruned trial is stopped with epochs to go.
CONFIG = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [optuna_parts]
epoch: 4
batch: 8
model: {{name: SlowMLP, in_features: 16, hidden: [16]}}
dataset: {{name: SyntheticClassification, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}}
optimizer: {{name: AdamW, lr: 0.01}}
logging: {{log_frequency: 1, mlflow: false, tensorboard: false, progress_bar: false}}
"""


def trials(out: Path) -> list[dict[str, str]]:
    with open(next(out.glob("*/*_sweep_*_SlowMLP/sweep_summary.csv")), newline="") as f:
        return list(csv.DictReader(f))


def trial_dirs(out: Path) -> dict[str, Path]:
    return {p.parent.name.rsplit("_", 1)[-1]: p.parent for p in out.glob("*/*_trial*/config.yaml")}


@pytest.mark.slow
def test_optuna_study_prunes_and_continues_without_retraining(tmp_path):
    pytest.importorskip("optuna", reason='the optuna extra is not installed: pip install -e ".[optuna]"')
    config, env = user_module_config(tmp_path, "optuna_parts", slow_mlp_source("OPTUNA_TEST_SLEEP"), CONFIG)
    env["OPTUNA_TEST_SLEEP"] = "0.05"
    out = tmp_path / "out"
    args = [str(config), "optimizer.lr=loguniform:1e-4:1e-1", f"output={out}", "--seed", "3"]
    first = run_script("script/sweep.py", *args, "--optuna", "6", env=env, timeout=600)
    assert first.returncode == 0, explain(first)
    table = trials(out)
    states = [r["state"] for r in table]
    assert len(table) == 6 and "PRUNED" in states and "COMPLETE" in states, table
    losses = [float(r["val_loss"]) for r in table if r["state"] == "COMPLETE"]
    assert losses == sorted(losses)  # best first
    summary = next(out.glob("*/*_sweep_*_SlowMLP"))
    assert {"optuna.db", "optuna_history.png", "optuna_importance.png"} <= {p.name for p in summary.iterdir()}
    dirs = trial_dirs(out)
    assert len(dirs) == 6
    for row in table:
        run = Path(row["run"])
        assert run == dirs[f"trial{row['trial']}"]
        if row["state"] == "COMPLETE":
            assert (run / "summary.txt").is_file() and (run / "test" / "metrics.json").is_file()
    # A pruned trial got SIGTERM mid-run: it saved a checkpoint and says how to resume (unless it had
    # already finished when the signal came, which a loaded machine can make happen).
    stopped = [
        Path(r["run"]) for r in table if r["state"] == "PRUNED" and not Path(r["run"], "summary.txt").exists()
    ]
    assert stopped, "no pruned trial was stopped before its end"
    for run in stopped:
        assert (run / "checkpoints" / "last.pth").is_file()
        assert "stopped by SIGTERM" in (run / "train.log").read_text()
    finished = {name: (d / "config.yaml").stat().st_mtime_ns for name, d in dirs.items()}

    # One more trial; the sweep is SIGKILLed while it trains, then the same command resumes it.
    log_file = tmp_path / "sweep.log"
    proc = start_script("script/sweep.py", *args, "--optuna", "7", log_file=log_file, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "trial6" not in trial_dirs(out):
        assert proc.poll() is None, log_file.read_text()
        time.sleep(0.05)
    run6 = trial_dirs(out)["trial6"]
    log6 = run6 / "metrics.jsonl"
    while time.monotonic() < deadline and not (log6.exists() and '"train_loss"' in log6.read_text()):
        assert proc.poll() is None, log_file.read_text()
        time.sleep(0.02)
    child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text():
        time.sleep(0.05)  # the trial got SIGTERM from its parent's death and saved a checkpoint
    assert not (run6 / "summary.txt").exists()

    again = run_script("script/sweep.py", *args, "--optuna", "7", env=env, timeout=600)
    assert again.returncode == 0, explain(again)
    assert f"trial 6: resuming {run6}" in again.stdout
    assert not re.search(r"trial \d: python train.py", again.stdout), (
        "a finished or pruned trial trained again"
    )
    dirs = trial_dirs(out)
    assert len(dirs) == 7 and dirs["trial6"] == run6 and "resum" in (run6 / "train.log").read_text()
    assert {r["trial"]: r["state"] for r in trials(out)}["6"] in ("COMPLETE", "PRUNED")  # judged, not RUNNING
    assert {n: (d / "config.yaml").stat().st_mtime_ns for n, d in dirs.items() if n != "trial6"} == finished


def test_optuna_and_range_refusals(tmp_path, monkeypatch, capsys):
    """Bad search settings: one `error:` line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    sweep = load_script("sweep").main
    dummy = str(ROOT / "config" / "dummy.yaml")
    cases = [
        ([dummy, "optimizer.lr=loguniform:1e-5:1e-1"], "is a range, which a grid cannot list"),
        ([dummy, "optimizer.lr=loguniform:0:1e-1", "--optuna", "3"], "loguniform needs a low bound above 0"),
        ([dummy, "optimizer.lr=uniform:1e-1:1e-5", "--optuna", "3"], "low bound must be below the high"),
        ([dummy, "batch=int:8:x", "--optuna", "3"], "a range is int:LOW:HIGH with two integers"),
        ([dummy, "batch=8,16", "--optuna", "3", "--index", "1"], "--count, --index and --random list grid"),
        ([dummy, "batch=8,16", "--optuna", "0"], "--optuna must be at least 1"),
        ([dummy, "batch=8,16", "--optuna", "3", "--sampler", "grid"], "--sampler must be one of tpe"),
        ([dummy, "batch=8,16", "--optuna", "3", "--pruner", "asha"], "--pruner must be one of median"),
        ([dummy, "batch=8", "--optuna", "3"], "nothing to search"),
        ([dummy, "batch=8,16", "batch=int:8:16", "--optuna", "3"], "'batch' is searched twice"),
    ]
    for argv, message in cases:
        assert sweep(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert list(tmp_path.iterdir()) == []
