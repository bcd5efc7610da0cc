"""Shared helpers for tests that run train.py / test.py as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings appended to a command so a run takes seconds on a CPU.
TINY = [
    "logging.mlflow=false",
    "logging.tensorboard=false",
    "epoch=2",
    "batch=16",
    "dataset.train_size=64",
    "dataset.val_size=32",
    "dataset.test_size=32",
]


def run_script(
    script: str, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository root and return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_dirs(output: Path) -> list[Path]:
    """Every run directory under an output root (<output>/<dataset>/<run>/)."""
    return sorted(p.parent for p in Path(output).glob("*/*/config.yaml"))


def only_run_dir(output: Path) -> Path:
    runs = result_dirs(output)
    assert len(runs) == 1, f"expected one run under {output}, found {runs}"
    return runs[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
