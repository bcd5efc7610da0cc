"""`script/ray_tune.py`: a Ray Tune search whose trials are ordinary train.py runs.

Tune schedules the trials (in parallel as the cluster's resources allow) and decides which to stop
early (ASHA); each trial is `python train.py CONFIG fixed... <its values> tag=<tag>_<trial id>`,
started by the trial's Tune function, which reads the run's metrics.jsonl and reports each
validation to Tune. A trial Tune stops takes its Ray worker down with it, and the run gets SIGTERM
from its parent's death: it saves a checkpoint and ends as stopped (MLflow: KILLED), resumable like
any run. Because a trial's result directory is found again by its config (as a sweep's points are),
the directories stay resumable whatever happens to Tune's own experiment state.

The summary directory `<output>/<dataset>/<ts>_tune_<hash>_<model>[_<tag>]/` holds Tune's experiment
(`ray/`) and tune_summary.csv/.md; running the same command again restores the experiment.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from src.errors import ConfigError, RunError
from src.search.search_space import Dimension, override_value, parse
from src.search.sweep import metric_and_mode
from src.workflows import runs

EXPERIMENT = "ray"  # Tune's experiment folder inside the summary directory


def param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Tune's search space: value lists are grid axes (as in sweep.py), ranges are sampled."""
    from ray import tune

    space: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            space[d.key] = tune.grid_search(list(d.choices))
        elif d.kind == "int":
            space[d.key] = tune.randint(int(d.low), int(d.high) + 1)  # Tune's upper bound is exclusive
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(d.low, d.high)
        else:
            space[d.key] = tune.uniform(d.low, d.high)
    return space


def trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def tune_search(
    config: str,
    items: list[str],
    metric: str | None,
    mode: str | None,
    samples: int = 1,
    asha: bool = False,
    restore: bool = False,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    max_concurrent: int | None = None,
    address: str | None = None,
) -> int:
    fixed, dims = parse(items)
    if not dims:
        raise ConfigError(
            "nothing to search: give several values (batch=32,64) or a range (optimizer.lr=loguniform:1e-5:1e-1)"
        )
    if (
        samples < 1
        or cpus_per_trial <= 0
        or gpus_per_trial < 0
        or (max_concurrent is not None and max_concurrent < 1)
    ):
        raise ConfigError("--samples and --max-concurrent must be at least 1, --cpus-per-trial above 0, "
                          "--gpus-per-trial at least 0")  # fmt: skip
    base = runs.load(config, fixed)
    metric, mode = metric_and_mode(base, metric, mode)
    runs.check([_job(config, fixed, {d.key: v}, base, "check") for d in dims for v in d.bounds()])
    if not Path(str(base.output)).is_absolute():  # Tune's workers run in other folders
        fixed = [*fixed, f"output={Path(str(base.output)).resolve()}"]
        base = runs.load(config, fixed)
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError('Ray Tune is an optional extra: pip install -e ".[ray]"') from None
    key = runs.digest({"base": runs.fingerprint(base), "space": [d.spec() for d in dims], "samples": samples,
                       "asha": asha, "metric": metric, "mode": mode})  # fmt: skip
    summary = runs.summary_dir(base, "tune", key).resolve()
    experiment = summary / EXPERIMENT
    can_restore = tune.Tuner.can_restore(str(experiment))
    if restore and not can_restore:
        raise ConfigError(f"--restore: no Tune experiment to restore in {experiment}; run without --restore")
    state = runs.read_state(summary, "tune")
    state.update(config=str(config), settings=list(items), samples=samples, asha=asha)
    runs.write_state(summary, "tune", state)
    print(
        f"Ray Tune over {', '.join(d.key for d in dims)}, {metric} ({mode}): summary in {summary}", flush=True
    )
    _start_ray(ray, address)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config=str(Path(config).resolve()), fixed=fixed, keys=[d.key for d in dims],
                             tag=str(base.tag or ""), watched=_watched(metric), logs=str(summary / "logs")),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )  # fmt: skip
    try:
        if can_restore:
            tuner = _restored_tuner(tune, experiment, trainable)
        else:
            tuner = _new_tuner(tune, trainable, dims, summary, metric, mode, samples,
                               asha=asha, max_t=int(base.epoch) + 1, max_concurrent=max_concurrent)  # fmt: skip
        grid = tuner.fit()
    finally:
        ray.shutdown()
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        params = {k: (result.config or {}).get(k) for k in (d.key for d in dims)}
        job = _job(config, fixed, params, base, trial_id)
        rows.append((trial_id, params, runs.find_run(job.cfg), result.error))
    write_summary(summary, dims, rows, metric, mode)
    print((summary / "tune_summary.md").read_text(), flush=True)
    errors = [r[0] for r in rows if r[3] is not None]
    if errors:
        raise RunError(
            f"trial(s) {', '.join(errors)} failed; fix the cause and run the same command to resume"
        )
    return 0


def _start_ray(ray: Any, address: str | None) -> None:
    """Join the cluster at `address`, or start a local one; trials import this checkout's src/."""
    python_path = os.pathsep.join(
        p for p in (str(runs.ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p
    )
    env = {"PYTHONPATH": python_path}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        # A stopped trial's worker must leave its train.py to save and exit on the SIGTERM it gets:
        # by default Ray kills a dead worker's child processes outright.
        ray.init(include_dashboard=False, runtime_env={"env_vars": env},
                 _system_config={"kill_child_processes_on_worker_exit": False})  # fmt: skip


def _restored_tuner(tune: Any, experiment: Path, trainable: Any) -> Any:
    """The interrupted experiment, its unfinished and errored trials resumed; one line if Ray cannot read it."""
    print(f"restoring the Tune experiment in {experiment}", flush=True)
    try:
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    except Exception as err:  # Ray writes its experiment state in place: a SIGKILL can leave it cut
        raise RunError(
            f"Tune's experiment state in {experiment} cannot be read ({str(err).splitlines()[0][:200]}); "
            "move that folder aside and run again for a new experiment. The trials' result "
            "directories are intact: python train.py <run>/config.yaml resumes each"
        ) from None


def _new_tuner(
    tune: Any,
    trainable: Any,
    dims: list[Any],
    summary: Path,
    metric: str,
    mode: str,
    samples: int,
    asha: bool,
    max_t: int,
    max_concurrent: int | None,
) -> Any:
    """A new experiment stored in the summary folder; with `asha`, `max_t` is past the last epoch."""
    scheduler = None
    if asha:  # max_t beyond the last epoch: a trial that reaches it is never stopped before its test
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=1, reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space=param_space(dims),
        tune_config=tune.TuneConfig(
            metric=_watched(metric),
            mode=mode,
            num_samples=samples,
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent,
            reuse_actors=False,  # a stopped trial's worker exits, so its run is told to stop
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(summary), verbose=1),
    )


def _watched(metric: str) -> str:
    """The validation metric reported each epoch (a test_ metric is judged by its val_ twin)."""
    return metric if metric.startswith("val_") else "val_" + metric.removeprefix("test_")


def _job(config: str, fixed: list[str], params: dict[str, Any], base: Any, trial_id: str) -> runs.Job:
    tag = "_".join(p for p in (str(base.tag or ""), trial_id) if p)
    overrides = [*fixed, *(f"{k}={override_value(v)}" for k, v in params.items()), f"tag={tag}"]
    return runs.Job(f"trial {trial_id}", overrides, runs.load(config, overrides), extra={"config": config})


def _trial(params: dict[str, Any], config: str, fixed: list[str], keys: list[str], tag: str, watched: str,
           logs: str) -> None:  # fmt: skip
    """One Tune trial (in a Ray worker's thread): start or resume its train.py run, report each validation."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    base = runs.load(config, fixed)
    job = _job(config, fixed, {k: params[k] for k in keys}, base, trial_id)
    job.run_dir = runs.find_run(job.cfg)
    proc = None
    if job.run_dir is None or not runs.is_finished(job.run_dir):
        os.environ["PYTHONUNBUFFERED"] = "1"
        proc, _, _, out = runs._start(job, None, {}, Path(logs), concurrent=True, own_session=True)
    reported: set[int] = set()
    while True:
        ended = proc is None or proc.poll() is not None
        job.run_dir = job.run_dir or runs.find_run(job.cfg)
        path = job.run_dir / "metrics.jsonl" if job.run_dir else None
        if path is not None and path.is_file():
            for line in path.read_text().splitlines(keepends=True):
                if line.endswith("\n") and f'"{watched}"' in line:
                    event = json.loads(line)
                    epoch = int(event["epoch"])
                    if epoch not in reported:
                        reported.add(epoch)
                        numbers = {k: v for k, v in event.items() if isinstance(v, (int, float))}
                        tune.report({**numbers, "epoch": epoch})
        if ended:
            break
        time.sleep(0.2)
    if proc is not None:
        out.close()
        if proc.returncode != 0:
            raise RuntimeError(f"train.py exited with code {proc.returncode}; its output is in {logs}")


def write_summary(
    summary: Path,
    dims: list[Dimension],
    rows: list[tuple[str, dict, Path | None, Any]],
    metric: str,
    mode: str,
) -> None:
    """tune_summary.csv/.md: finished trials best first, then the stopped (resumable) ones."""
    table = []
    for trial_id, params, run_dir, error in rows:
        finished = run_dir is not None and runs.is_finished(run_dir)
        state = "FINISHED" if finished else "ERROR" if error is not None else "STOPPED"
        metrics = runs.run_metrics(run_dir) if run_dir is not None else {}
        table.append((trial_id, state, params, run_dir, metrics))
    missing = float("inf") if mode == "min" else float("-inf")
    sign = 1 if mode == "min" else -1
    table.sort(key=lambda r: (r[1] != "FINISHED", sign * r[4].get(metric, sign * missing)))
    columns = runs.metric_columns([r[4] for r in table])
    keys = [d.key for d in dims]
    header = ["trial", "state", *keys, "run", *columns]
    body = [[t, s, *[override_value(p.get(k, "")) for k in keys], str(d or ""), *[m.get(c, "") for c in columns]]
            for t, s, p, d, m in table]  # fmt: skip
    runs.write_table(summary / "tune_summary.csv", header, body)
    at = 2 + len(keys)
    short = [[*row[:at], Path(row[at]).name if row[at] else "", *row[at + 1 :]] for row in body]
    text = (
        f"# Ray Tune: {len(table)} trial(s), sorted by {metric} ({mode})\n\n"
        + runs.markdown(header, short)
        + "\nA STOPPED trial was ended early (ASHA, or an interrupted search) with a checkpoint: "
        "`python train.py <run>/config.yaml` resumes it.\n"
    )
    runs.write_text(summary / "tune_summary.md", text)
