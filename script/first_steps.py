"""Does start-up work (MLflow's import and store) slow the first steps? Fresh processes, MLflow on vs off.

    python script/first_steps.py                 # 3 rounds, each: one run with MLflow, one without
    python script/first_steps.py --rounds 5 --steps 375

Each run is a new `python` process calling `train_main` (what train.py does) on the mlp-cpu preset of
script/benchmark.py, 3 epochs, a new sqlite store each time, so every run pays MLflow's import and
the store's migration as a user's first run does. The two settings alternate, so load from other
processes on a shared machine hits both alike. Reported per setting: time from the process start to
the first batch, the mean and median step of the first and the last epoch, and the whole process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import json, os, sys, time, itertools
sys.path.insert(0, {root!r})
sys.argv = ["train.py"]
import torch
from script import benchmark as b
p = b.PRESETS["mlp-cpu"]
p.steps_per_epoch, p.epochs = {steps}, 3
b.register_dataset()
b.stamp_batches()
gen = torch.Generator().manual_seed(0)
n = p.steps_per_epoch * p.batch
b.DATA.update(inputs=torch.randn(n, *p.input_shape, generator=gen), targets=torch.randint(0, 10, (n,), generator=gen),
              val_inputs=torch.randn(p.batch, *p.input_shape, generator=gen),
              val_targets=torch.randint(0, 10, (p.batch,), generator=gen), val_samples=0, decode=False,
              batch=p.batch, num_classes=10)
b.CLOCK.start(p.batch)
b.trainer_overrides_base = b.trainer_overrides
b.trainer_overrides = lambda *a: b.trainer_overrides_base(*a) + ["logging.mlflow={mlflow}", "logging.progress_bar=false"]
b.trainer_loop(p, __import__("pathlib").Path({out!r}), 0)
print("STAMPS " + json.dumps(b.CLOCK.stamps[: 3 * p.steps_per_epoch]), flush=True)
"""


def one_run(mlflow: bool, steps: int, root: Path, work: Path) -> dict[str, float]:
    out = tempfile.mkdtemp(dir=work)
    code = ONE_RUN.format(root=str(root), steps=steps, mlflow=str(mlflow).lower(), out=out)
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()  # CLOCK_MONOTONIC: the child's perf_counter stamps share it
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    stamps = json.loads(done.stdout.split("STAMPS ", 1)[1])
    steps_of = [b - a for a, b in itertools.pairwise(stamps)]
    first, last = steps_of[: steps - 1], steps_of[2 * steps : 3 * steps - 1]
    return {
        "to_first_step_s": stamps[0] - start,
        "first_epoch_mean_ms": 1e3 * statistics.mean(first),
        "first_epoch_median_ms": 1e3 * statistics.median(first),
        "last_epoch_mean_ms": 1e3 * statistics.mean(last),
        "last_epoch_median_ms": 1e3 * statistics.median(last),
        "whole_run_s": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=375, help="steps per epoch (batch 64)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for mlflow in (True, False) if r % 2 == 0 else (False, True):
                results[mlflow].append(one_run(mlflow, args.steps, args.root.resolve(), Path(work)))
                print(f"round {r} mlflow={mlflow}: {json.dumps(results[mlflow][-1])}", flush=True)
    for key in results[True][0]:
        on = [run[key] for run in results[True]]
        off = [run[key] for run in results[False]]
        ratio = statistics.median(on) / statistics.median(off)
        print(f"{key:24s} mlflow on {statistics.median(on):8.3f}  off {statistics.median(off):8.3f}  "
              f"ratio {ratio:.2f}  (on: {', '.join(f'{v:.3f}' for v in on)})")  # fmt: skip


if __name__ == "__main__":
    main()
