"""`script/sweep.py --optuna N`: an Optuna study whose trials are ordinary train.py runs.

Optuna's ask-and-tell interface drives the search from this process; each trial is
`python train.py CONFIG fixed... <sampled key=value> tag=<tag>_trial<N>`, a result directory like any
other. While a trial trains, its metrics.jsonl is read: each validation's value goes to the pruner,
and a trial the pruner rejects gets SIGTERM, so it saves a checkpoint and stops (it resumes like any
stopped run). The study lives in `optuna.db` (sqlite) in the sweep's summary directory, so running
the same command again continues it: finished and pruned trials stay as they are, a trial cut by a
kill resumes in its own directory, and new trials are asked for until the study has N.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.errors import ConfigError, RunError
from src.search.search_space import Dimension, override_value, parse
from src.search.sweep import metric_and_mode
from src.workflows import runs

log = logging.getLogger("template.workflows")

SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class Running:
    """A trial whose train.py process is alive; `reported` holds the epochs the pruner has seen."""

    trial: Any
    job: runs.Job
    proc: Any
    gpu: str | None
    out: Any
    reported: set[int] = field(default_factory=set)
    pruned: bool = False


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError('--optuna needs Optuna, an optional extra: pip install -e ".[optuna]"') from None
    return optuna


def distributions(dims: list[Dimension]) -> dict[str, Any]:
    """Optuna's distribution for each searched key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            out[d.key] = CategoricalDistribution(list(d.choices))
        elif d.kind == "int":
            out[d.key] = IntDistribution(int(d.low), int(d.high))
        else:
            out[d.key] = FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
    return out


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401 - Optuna's CMA-ES sampler needs it
        except ImportError:
            raise ConfigError('--sampler cmaes needs the cmaes package: pip install -e ".[optuna]"') from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, epochs: int) -> Any:
    """median: prune below the median of finished trials at the same epoch, once 2 trials have finished
    (Optuna's default waits for 5, which in a study of a few long runs prunes next to nothing)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


def study(
    config: str,
    items: list[str],
    n_trials: int,
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    gpus: list[str] | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> int:
    """Run the study until it holds `n_trials` trials, then write the summary (and plots)."""
    if n_trials < 1:
        raise ConfigError(f"--optuna must be at least 1, got {n_trials}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{sampler}'")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{pruner}'")
    fixed, dims = parse(items)
    if not dims:
        raise ConfigError(
            "nothing to search: give a range (optimizer.lr=loguniform:1e-5:1e-1) or several values (batch=32,64)"
        )
    optuna = require_optuna()
    base = runs.load(config, fixed)
    metric, mode = metric_and_mode(base, metric, mode)
    # Every choice and both ends of every range must make a valid run: refused now, not in trial 7.
    runs.check([_job(config, fixed, {d.key: v}, base, 0) for d in dims for v in d.bounds()])
    key = runs.digest(
        {"base": runs.fingerprint(base), "space": [d.spec() for d in dims], "optuna": metric + ":" + mode}
    )
    sweep_dir = runs.summary_dir(base, "sweep", key)
    state = runs.read_state(sweep_dir, "sweep")
    storage = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own line per trial
    stud = optuna.create_study(
        storage=storage,
        study_name="sweep",
        direction="minimize" if mode == "min" else "maximize",
        sampler=make_sampler(sampler, seed),
        pruner=make_pruner(pruner, int(base.epoch)),
        load_if_exists=True,
    )
    print(
        f"optuna study ({sampler}, pruner {pruner}) of {n_trials} trial(s) over "
        f"{', '.join(d.key for d in dims)}, {metric} ({mode}): summary and {storage} in {sweep_dir}",
        flush=True,
    )
    parent = runs.open_parent_run(
        base,
        sweep_dir.name,
        {"workflow": "optuna", "sweep_dir": str(sweep_dir.resolve())},
        state.get("mlflow_run_id"),
    )
    state.update(config=str(config), settings=list(items), optuna=n_trials, sampler=sampler, pruner=pruner)
    env = runs.record_parent(sweep_dir, "sweep", state, parent)
    failed: list[str] = []
    try:
        failed = _run_trials(stud, dims, config, fixed, base, n_trials, gpus or [], env, sweep_dir, metric)
    finally:
        metrics = write_summary(sweep_dir, stud, dims, metric, mode, config, fixed, base)
        if parent is not None:
            parent.log_metrics(metrics, step=0, epoch=0)
            for name in ("sweep_summary.csv", "sweep_summary.md"):
                if (sweep_dir / name).is_file():
                    parent.log_artifact(sweep_dir / name)
            parent.finish("FINISHED" if not failed else "FAILED")
    if failed:
        raise RunError(
            f"{', '.join(failed)} did not finish; fix the cause and run the same command again to resume"
        )
    print((sweep_dir / "sweep_summary.md").read_text(), flush=True)
    return 0


def _job(config: str, fixed: list[str], params: dict[str, Any], base: Any, number: int) -> runs.Job:
    tag = "_".join(p for p in (str(base.tag or ""), f"trial{number}") if p)
    overrides = [*fixed, *(f"{k}={override_value(v)}" for k, v in params.items()), f"tag={tag}"]
    return runs.Job(f"trial {number}", overrides, runs.load(config, overrides), extra={"config": config})


def _run_trials(
    stud: Any,
    dims: list[Dimension],
    config: str,
    fixed: list[str],
    base: Any,
    n_trials: int,
    gpus: list[str],
    env: dict[str, str],
    sweep_dir: Path,
    metric: str,
) -> list[str]:
    """Start trials in free slots (one at a time, or one per GPU) until the study holds n_trials; returns
    the names of trials whose run failed (left RUNNING in the study: the next run of the command resumes them)."""
    from optuna.trial import Trial, TrialState

    space = distributions(dims)
    # Trials an earlier, interrupted run of this command left RUNNING: resumed first, with their own values.
    todo = [t for t in stud.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    slots: list[str | None] = list(gpus) if gpus else [None]
    running: list[Running] = []
    failed: list[str] = []
    watched = metric if metric.startswith("val_") else "val_" + metric.removeprefix("test_")
    while True:
        while slots and (todo or len(stud.get_trials(deepcopy=False)) < n_trials):
            if todo:
                frozen = todo.pop(0)
                trial, params, reported = (
                    Trial(stud, frozen._trial_id),
                    frozen.params,
                    set(frozen.intermediate_values),
                )
            else:
                trial = stud.ask(space)
                params, reported = trial.params, set()
            job = _job(config, fixed, params, base, trial.number)
            job.run_dir = runs.find_run(job.cfg)
            if job.run_dir is not None and runs.is_finished(job.run_dir):  # finished while no one watched
                _tell(stud, trial, job, metric, pruned=False)
                continue
            gpu = slots.pop(0)
            proc, _, _, out = runs._start(job, gpu, env, sweep_dir / "logs", concurrent=len(gpus) > 1)
            running.append(Running(trial, job, proc, gpu, out, reported))
        if not running:
            return failed
        time.sleep(0.2)
        for item in list(running):
            ended = item.proc.poll() is not None
            _feed_pruner(item, watched)
            if not ended:
                continue
            running.remove(item)
            slots.append(item.gpu)
            if item.out is not None:
                item.out.close()
            job = item.job
            job.run_dir = job.run_dir or runs.find_run(job.cfg)
            if item.pruned:
                _tell(stud, item.trial, job, metric, pruned=True)
            elif item.proc.returncode == 0 and job.run_dir is not None and runs.is_finished(job.run_dir):
                _tell(stud, item.trial, job, metric, pruned=False)
            else:
                print(f"{job.name}: exited with code {item.proc.returncode} ({job.run_dir})", flush=True)
                failed.append(job.name)


def _feed_pruner(item: Running, watched: str) -> None:
    """Report each new validation of the trial's run to Optuna; SIGTERM the run once it is to be pruned."""
    job = item.job
    if item.pruned:  # the pruned value stays the one judged, however far the run got before it stopped
        return
    if job.run_dir is None:
        job.run_dir = runs.find_run(job.cfg)  # config.yaml appears once the run has started
        if job.run_dir is None:
            return
    path = job.run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n") or watched not in line:  # a line still being written waits
            continue
        event = json.loads(line)
        epoch, value = int(event.get("epoch", 0)), event.get(watched)
        if epoch in item.reported or not isinstance(value, (int, float)):
            continue
        item.reported.add(epoch)
        item.trial.report(float(value), epoch)
        if item.trial.should_prune():
            item.pruned = True
            print(f"{job.name}: pruned at epoch {epoch} ({watched}={value:.4g}); stopping it", flush=True)
            if item.proc.poll() is None:
                os.kill(item.proc.pid, signal.SIGTERM)
            return


def _tell(stud: Any, trial: Any, job: runs.Job, metric: str, pruned: bool) -> None:
    from optuna.trial import TrialState

    if pruned:
        stud.tell(trial, state=TrialState.PRUNED)
        print(f"{job.name}: pruned, resumable in {job.run_dir}", flush=True)
        return
    value = runs.run_metrics(job.run_dir).get(metric) if job.run_dir else None
    if value is None:
        log.warning("%s: %s has no %s; the trial is marked FAIL", job.name, job.run_dir, metric)
        stud.tell(trial, state=TrialState.FAIL)
        return
    stud.tell(trial, value)
    print(f"{job.name}: finished, {metric}={value:.4g} ({job.run_dir})", flush=True)


# ---------------------------------------------------------------------- summary
def write_summary(
    sweep_dir: Path,
    stud: Any,
    dims: list[Dimension],
    metric: str,
    mode: str,
    config: str,
    fixed: list[str],
    base: Any,
) -> dict[str, float]:
    """sweep_summary.csv/.md: finished trials best first, then pruned and unfinished ones; and the plots."""
    from optuna.trial import TrialState

    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}
    sign = 1.0 if mode == "min" else -1.0
    rows = []
    for t in stud.get_trials(deepcopy=False):
        run_dir = runs.find_run(_job(config, fixed, t.params, base, t.number).cfg) if t.params else None
        metrics = runs.run_metrics(run_dir) if run_dir is not None else {}
        score = sign * t.value if t.value is not None else float("inf")
        rows.append((order.get(t.state, 2), score, t, run_dir, metrics))
    rows.sort(key=lambda r: (r[0], r[1], r[2].number))
    columns = runs.metric_columns([r[4] for r in rows])
    keys = [d.key for d in dims]
    header = ["trial", "state", *keys, "run", *columns]
    table = [
        [
            t.number,
            t.state.name,
            *[override_value(t.params.get(k, "")) for k in keys],
            str(run_dir or ""),
            *[m.get(c, "") for c in columns],
        ]
        for _, _, t, run_dir, m in rows
    ]
    runs.write_table(sweep_dir / "sweep_summary.csv", header, table)
    at = 2 + len(keys)
    short = [[*row[:at], Path(row[at]).name if row[at] else "", *row[at + 1 :]] for row in table]
    counts = {s: sum(1 for r in rows if r[2].state.name == s) for s in ("COMPLETE", "PRUNED")}
    text = (
        f"# Optuna study: {len(rows)} trial(s), {counts['COMPLETE']} finished, {counts['PRUNED']} pruned; "
        f"sorted by {metric} ({mode})\n\n"
        + runs.markdown(header, short)
        + "\nA PRUNED trial was stopped with a checkpoint when the pruner judged it: "
        "`python train.py <run>/config.yaml` resumes it. Validation metrics are those of each run's best "
        "checkpoint; the pruner saw every validation.\n"
    )
    runs.write_text(sweep_dir / "sweep_summary.md", text)
    _plots(stud, sweep_dir)
    done = [r for r in rows if r[2].state == TrialState.COMPLETE]
    return {f"best_{metric}": float(done[0][2].value)} if done else {}


def _plots(stud: Any, sweep_dir: Path) -> None:
    """Optuna's optimisation history and parameter importances as PNGs (skipped, with a line, when not possible)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name, draw in (("optuna_history.png", plots.plot_optimization_history),
                       ("optuna_importance.png", plots.plot_param_importances)):  # fmt: skip
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of Optuna's matplotlib backend
                axes = draw(stud)
            axes.figure.savefig(sweep_dir / name, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
        except Exception as err:  # too few finished trials, or a missing optional package
            print(f"{name} not drawn: {err}", flush=True)
            plt.close("all")
