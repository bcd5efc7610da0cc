"""Grid or random search over config settings: one ordinary result directory per point.

`optimizer.lr=1e-4,1e-3 batch=32,64` is a 2x2 grid; `--random N` trains N of its points, drawn
without replacement by `--seed`, so a rerun draws the same ones. Each point is
`python train.py CONFIG fixed... optimizer.lr=1e-4 batch=32 tag=<tag>_lr1e-4_batch32`, found again,
skipped or resumed the way cross-validation folds are. The summary directory
<output>/<dataset>/<ts>_sweep_<hash>_<model>[_<tag>]/ holds sweep_summary.csv and .md, best first.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from src.errors import ConfigError, RunError
from src.results.run_dir import _slug
from src.search.search_space import parse
from src.workflows import runs


def grid_points(
    axes: list[tuple[str, list[str]]], random_n: int | None, seed: int
) -> list[list[tuple[str, str]]]:
    """Every point of the grid, or `random_n` of them drawn by `seed` (in grid order)."""
    grid = [
        list(zip([k for k, _ in axes], values, strict=True))
        for values in itertools.product(*[v for _, v in axes])
    ]
    if random_n is None or random_n >= len(grid):
        return grid
    chosen = sorted(random.Random(seed).sample(range(len(grid)), random_n))
    return [grid[i] for i in chosen]


def point_tag(base: str, point: list[tuple[str, str]]) -> str:
    parts = [_slug(f"{key.rsplit('.', 1)[-1]}{value}") for key, value in point]
    return "_".join([base, *parts] if base else parts)


def plan(
    config: str, items: list[str], random_n: int | None, seed: int
) -> tuple[Any, list[tuple[str, list[str]]], list[runs.Job]]:
    fixed, dims = parse(items)
    ranges = [d.spec() for d in dims if d.kind != "choice"]
    if ranges:
        raise ConfigError(
            f"{ranges[0]} is a range, which a grid cannot list: sample it with --optuna N, or list values "
            "(key=v1,v2,...)"
        )
    axes = [(d.key, list(d.choices)) for d in dims]
    if not axes:
        raise ConfigError(
            "nothing to sweep: give at least one key with several values, e.g. optimizer.lr=1e-4,1e-3"
        )
    if random_n is not None and random_n < 1:
        raise ConfigError(f"--random must be at least 1, got {random_n}")
    base = runs.load(config, fixed)
    jobs = []
    for i, point in enumerate(grid_points(axes, random_n, seed)):
        overrides = [*fixed, *(f"{k}={v}" for k, v in point), f"tag={point_tag(str(base.tag), point)}"]
        job = runs.Job(
            f"point {i}", overrides, runs.load(config, overrides), extra={"config": config, "point": point}
        )
        jobs.append(job)
    return base, axes, jobs


def metric_and_mode(base: Any, metric: str | None, mode: str | None) -> tuple[str, str]:
    """The metric that ranks runs (default checkpoint.monitor) and whether min or max is best."""
    metric = metric or str(base.checkpoint.monitor)
    if mode is None:
        lower = ("loss", "error")
        mode = (
            str(base.checkpoint.mode)
            if metric == base.checkpoint.monitor
            else "min"
            if any(w in metric for w in lower)
            else "max"
        )
    if not metric.startswith(("val_", "test_")):
        raise ConfigError(f"--metric must be a val_ or test_ metric, e.g. val_accuracy; got '{metric}'")
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got '{mode}'")
    return metric, mode


def sweep(
    config: str,
    items: list[str],
    random_n: int | None = None,
    seed: int = 0,
    gpus: list[str] | None = None,
    metric: str | None = None,
    mode: str | None = None,
    index: int | None = None,
) -> int:
    """Train every point (or only point `index`, for one SLURM array task) and write the summary."""
    base, axes, jobs = plan(config, items, random_n, seed)
    metric, mode = metric_and_mode(base, metric, mode)
    runs.check(jobs if index is None else jobs[index : index + 1])
    if index is not None:  # one point, no summary: many of these run at once under SLURM
        if not 0 <= index < len(jobs):
            raise ConfigError(
                f"--index {index} is outside the sweep's {len(jobs)} points (0..{len(jobs) - 1})"
            )
        runs.run_jobs([jobs[index]], [], {}, Path("."))
        if jobs[index].returncode != 0:
            raise RunError(f"{jobs[index].name} did not finish; run the same command again to resume it")
        return 0
    key = runs.digest({"base": runs.fingerprint(base), "axes": axes, "random": random_n, "seed": seed})
    sweep_dir = runs.summary_dir(base, "sweep", key)
    state = runs.read_state(sweep_dir, "sweep")
    print(
        f"sweep of {len(jobs)} point(s) over {', '.join(k for k, _ in axes)}: summary in {sweep_dir}",
        flush=True,
    )
    parent = runs.open_parent_run(
        base,
        sweep_dir.name,
        {"workflow": "sweep", "sweep_dir": str(sweep_dir.resolve())},
        state.get("mlflow_run_id"),
    )
    state.update(config=str(config), settings=list(items), random=random_n, seed=seed)
    env = runs.record_parent(sweep_dir, "sweep", state, parent)
    runs.run_then_summarise(
        jobs,
        gpus or [],
        env,
        sweep_dir,
        "sweep",
        state,
        parent,
        label=lambda j: j.name,
        summarise=lambda done: write_summary(sweep_dir, axes, done, metric, mode, tie_breaker(base, metric)),
    )
    print((sweep_dir / "sweep_summary.md").read_text(), flush=True)
    return 0


def tie_breaker(base: Any, metric: str) -> str | None:
    """The loss that orders points equal on `metric` (lower first): the monitored one when it is a loss,
    else the loss of the metric's phase; None when `metric` is that loss itself."""
    monitor = str(base.checkpoint.monitor)
    loss = monitor if "loss" in monitor else f"{metric.split('_', 1)[0]}_loss"
    return None if loss == metric else loss


def write_summary(
    sweep_dir: Path,
    axes: list[tuple[str, list[str]]],
    jobs: list[runs.Job],
    metric: str,
    mode: str,
    tie: str | None = None,
) -> dict[str, float]:
    """sweep_summary.csv and .md, best point first by `metric`, then by the `tie` loss (lower first);
    returns {best_<metric>: value} for the parent run."""
    rows = [(j, runs.run_metrics(j.run_dir)) for j in jobs]
    sign, inf = (-1.0 if mode == "max" else 1.0), float("inf")

    def order(row: tuple[runs.Job, dict[str, float]]) -> tuple[float, float]:
        value = row[1].get(metric)  # a point without the metric goes last
        return (inf if value is None else sign * value, row[1].get(tie, inf) if tie else 0.0)

    rows.sort(key=order)
    metrics = runs.metric_columns([m for _, m in rows])
    keys = [k for k, _ in axes]
    header = [*keys, "run", *metrics]
    table = [
        [*dict(j.extra["point"]).values(), str(j.run_dir), *[m.get(c, "") for c in metrics]] for j, m in rows
    ]
    runs.write_table(sweep_dir / "sweep_summary.csv", header, table)
    short = [[*row[: len(keys)], Path(row[len(keys)]).name, *row[len(keys) + 1 :]] for row in table]
    best = rows[0][1].get(metric) if rows else None
    text = (
        f"# Sweep: {len(rows)} point(s), sorted by {metric} ({mode})"
        + (f", ties by {tie} (min)" if tie else "")
        + "\n\n"
        + runs.markdown(header, short)
        + "\nValidation metrics are those of each run's best checkpoint (checkpoint.monitor), which test/ evaluates.\n"
    )
    runs.write_text(sweep_dir / "sweep_summary.md", text)
    return {} if best is None else {f"best_{metric}": best}
