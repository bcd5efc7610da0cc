"""Log a run's history into MLflow after the fact: for a run whose store was down or unwritable.

    python script/log_to_mlflow.py RESULT/<dataset>/<run>                 # the store in its config.yaml
    python script/log_to_mlflow.py RESULT/<dataset>/<run> --tracking-uri sqlite:///other/mlflow.db

Reads `<run>/metrics.jsonl` (every metric by step), `<run>/test/metrics.json` and `<run>/config.yaml`
(the params), and logs them into the MLflow run tagged with this run directory, or a new one. Steps
the run already holds are skipped, so running it twice, or on a run that was partly logged, stores
each step once. A finished run (it has summary.txt) is marked FINISHED.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS_PER_BATCH = 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dir", type=Path, help="a result directory (it holds config.yaml and metrics.jsonl)"
    )
    parser.add_argument("--tracking-uri", help="the MLflow store; default: the one named in its config.yaml")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            print(f"error: {run_dir / name} not found; give a result directory of train.py", file=sys.stderr)
            return 2

    from omegaconf import OmegaConf

    from src.config.sections import flatten, to_plain
    from src.tracking.start import experiment_name

    cfg = OmegaConf.load(run_dir / "config.yaml")
    uri = args.tracking_uri or OmegaConf.select(cfg, "logging.mlflow_tracking_uri")
    if not uri:
        print(f"error: {run_dir / 'config.yaml'} names no MLflow store; pass --tracking-uri", file=sys.stderr)
        return 2
    events = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    test_file = run_dir / "test" / "metrics.json"
    if test_file.is_file() and events:  # the test's metrics go at the run's last step, as train.py logs them
        events.append({"step": max(int(e["step"]) for e in events), **json.loads(test_file.read_text())})

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from src.tracking.mlflow_worker import artifact_location, create_sqlite_store

    create_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name(cfg))
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(experiment_name(cfg), artifact_location=artifact_location(uri))
    )
    tag = str(cfg.get("run_dir") or run_dir)
    runs = client.search_runs([experiment_id], filter_string=f"tags.run_dir = '{tag}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(
            experiment_id, run_name=run_dir.name, tags={"run_dir": tag, "tag": str(cfg.tag)}
        ).info.run_id
        params = flatten(to_plain(cfg), keep_empty=False)
        values = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(values), 100):
            client.log_batch(run_id, params=values[start : start + 100], synchronous=True)
        client.log_artifact(run_id, str(run_dir / "config.yaml"))
    held: dict[str, set[int]] = {}
    new: list[Metric] = []
    now = int(time.time() * 1000)
    for event in events:
        step = int(event["step"])
        for key, value in event.items():
            if key in ("epoch", "step"):
                continue
            if key not in held:
                held[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in held[key]:
                held[key].add(step)
                new.append(Metric(key, float(value), now, step))
    for start in range(0, len(new), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=new[start : start + METRICS_PER_BATCH], synchronous=True)
    if (run_dir / "summary.txt").is_file():
        client.set_terminated(run_id, "FINISHED")
    print(f"logged {len(new)} metric value(s) to MLflow run {run_id} in {uri} (steps it held were skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
