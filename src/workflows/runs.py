"""What cross-validation and sweeps share: finding a finished or cut run, launching train.py, summaries.

A workflow never keeps its own record of which runs it started. A run belongs to a workflow when its
saved config.yaml equals the config the workflow would train (ignoring where the run lives and which
device it used), so a workflow killed at any moment is picked up again by running the same command:
finished runs (summary.txt and test/metrics.json written) are skipped, a cut one resumes in place
from its config.yaml, and only missing ones start anew.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.config import load_config
from src.config.sections import flatten, to_plain
from src.errors import ConfigError, RunError
from src.results.run_dir import _slug

log = logging.getLogger("template.workflows")

ROOT = Path(__file__).resolve().parents[2]
# Settings that say where, on what and how loudly a run trained, not what it computed.
VOLATILE = (
    "run_dir", "logging", "gpu.use", "gpu.device", "dataloader.num_workers", "dataloader.pin_memory",
    "dataloader.persistent_workers", "dataloader.prefetch_factor",
)  # fmt: skip


@dataclass
class Job:
    """One train.py run of a workflow: `name` ("fold 2"), its overrides and the config they give."""

    name: str
    overrides: list[str]
    cfg: DictConfig
    run_dir: Path | None = None
    returncode: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load(config: str | Path, overrides: Sequence[str]) -> DictConfig:
    return load_config(Path(config), list(overrides))


def check(jobs: list[Job]) -> None:
    """Refuse a bad component name or argument now (exit 2), not once per run in a subprocess."""
    from src.engine.build import preflight
    from src.user_modules import import_user_modules

    for job in jobs:
        import_user_modules(list(job.cfg.imports))
        preflight(job.cfg)


def fingerprint(cfg: DictConfig | dict, drop: Sequence[str] = ()) -> dict[str, Any]:
    """The flat settings that decide what a run computes (VOLATILE and `drop` removed)."""
    flat = flatten(to_plain(cfg))
    skip = (*VOLATILE, *drop)
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_folder(cfg: DictConfig) -> Path:
    """<output>/<dataset>/: where the runs of `cfg` land."""
    return Path(cfg.output) / _slug(cfg.dataset.name)


def find_run(cfg: DictConfig) -> Path | None:
    """The newest result directory whose config.yaml trains exactly `cfg`, or None."""
    folder = dataset_folder(cfg)
    if not folder.is_dir():
        return None
    wanted = fingerprint(cfg)
    for config in sorted(folder.glob("*/config.yaml"), reverse=True):
        try:
            saved = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        except Exception:  # a foreign or damaged file is simply not ours
            continue
        if isinstance(saved, dict) and fingerprint(saved) == wanted:
            return config.parent
    return None


def is_finished(run_dir: Path) -> bool:
    """train.py writes summary.txt (after test/metrics.json) only when a run ends normally."""
    return (run_dir / "summary.txt").is_file() and (run_dir / "test" / "metrics.json").is_file()


def parse_gpus(text: str | None) -> list[str]:
    if not text:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ConfigError(f"--gpus takes GPU ids separated by commas, e.g. --gpus 0,1; got {text!r}")
    return gpus


def run_jobs(jobs: list[Job], gpus: list[str], env: dict[str, str], log_dir: Path) -> None:
    """Run every job that is not finished: in turn, or one per GPU at once with --gpus.

    Each job is `python train.py CONFIG overrides` (or `python train.py <run>/config.yaml` to resume
    a cut one). Processes start from this thread and, on Linux, receive SIGTERM if this process dies,
    so a killed workflow leaves runs that saved a checkpoint and stopped, ready to resume.
    """
    pending = []
    for job in jobs:
        job.run_dir = find_run(job.cfg)
        if job.run_dir is not None and is_finished(job.run_dir):
            print(f"{job.name}: finished in {job.run_dir}, skipped", flush=True)
            job.returncode = 0
        else:
            pending.append(job)
    slots: list[str | None] = list(gpus) if gpus else [None]
    running: list[tuple[subprocess.Popen, Job, str | None, Any]] = []
    while pending or running:
        while pending and slots:
            job, gpu = pending.pop(0), slots.pop(0)
            running.append(_start(job, gpu, env, log_dir, concurrent=len(gpus) > 1))
        time.sleep(0.2)
        for item in list(running):
            proc, job, gpu, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            slots.append(gpu)
            if out is not None:
                out.close()
            job.returncode = proc.returncode
            job.run_dir = find_run(job.cfg)
            state = "finished" if proc.returncode == 0 else f"exited with code {proc.returncode}"
            print(f"{job.name}: {state} ({job.run_dir})", flush=True)


def _start(
    job: Job, gpu: str | None, env: dict[str, str], log_dir: Path, concurrent: bool, own_session: bool = False
) -> tuple:
    """Start the job's train.py. `own_session`: outside this process's group, so that only the SIGTERM
    of this process's death reaches it (Ray signals a dead worker's whole group, a second signal)."""
    if job.run_dir is not None:  # a run cut before its first checkpoint starts over, its leftovers set aside
        args = [str(job.run_dir / "config.yaml"), "checkpoint.allow_restart=true"]
        print(f"{job.name}: resuming {job.run_dir}", flush=True)
    else:
        args = [str(job.extra["config"]), *job.overrides]
        print(f"{job.name}: python train.py {' '.join(args)}", flush=True)
    full_env = {**os.environ, **env}
    if gpu is not None:
        full_env["CUDA_VISIBLE_DEVICES"] = gpu
    out = None
    if concurrent:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = open(log_dir / f"{_slug(job.name)}.out", "a")  # noqa: SIM115 - closed when the run ends
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        preexec_fn=_stop_with_parent(),
        start_new_session=own_session,
    )
    return proc, job, gpu, out


@functools.cache
def _stop_with_parent() -> Any:
    """A call for the child to make before exec: SIGTERM when the workflow dies, to checkpoint and exit.

    Linux's prctl(PR_SET_PDEATHSIG); None elsewhere. libc is loaded here, in the parent, so the
    child (forked while MLflow's thread may run) only calls a function it already has.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


# ---------------------------------------------------------------------- results of runs
def run_metrics(run_dir: Path) -> dict[str, float]:
    """The run's validation metrics at its best checkpoint (what test/ evaluates) and its test metrics."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    monitor, mode = str(cfg.checkpoint.monitor), str(cfg.checkpoint.mode)
    events = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                event = json.loads(line)
                if any(k.startswith("val_") for k in event):
                    events.append(event)
    out: dict[str, float] = {}
    if events:
        scored = [e for e in events if isinstance(e.get(monitor), (int, float))]
        if scored:
            pick = (min if mode == "min" else max)(scored, key=lambda e: e[monitor])
        else:
            pick = events[-1]
        out.update({k: float(v) for k, v in pick.items() if k.startswith("val_") and _number(v)})
    test = run_dir / "test" / "metrics.json"
    if test.is_file():
        out.update({k: float(v) for k, v in json.loads(test.read_text()).items() if _number(v)})
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    names = sorted({k for row in rows for k in row if k.startswith(("val_", "test_"))})
    return [n for n in names if n.startswith("val_")] + [n for n in names if n.startswith("test_")]


def write_table(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the summary directory
def summary_dir(cfg: DictConfig, kind: str, key: str) -> Path:
    """<output>/<dataset>/<ts>_<kind>_<key6>_<model>[_<tag>]/ of this workflow: the one made before, or a
    new one. The first 6 characters of the settings' digest tell apart two workflows of the same model
    and tag (other overrides, another config), so no two share a name beyond the stamp."""
    folder = dataset_folder(cfg)
    suffix = f"_{kind}_{key[:6]}_{_slug(cfg.model.name)}" + (f"_{_slug(cfg.tag)}" if cfg.tag else "")
    if folder.is_dir():
        for state in sorted(folder.glob(f"*_{kind}_{key[:6]}_*/{kind}.json"), reverse=True):
            try:
                if json.loads(state.read_text()).get("key") == key:
                    return state.parent
            except (OSError, ValueError):
                continue
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = folder / (f"{stamp}{suffix}" + (f"_{i}" if i else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        write_text(path / f"{kind}.json", json.dumps({"key": key}, indent=2) + "\n")
        return path
    raise ConfigError(f"could not create a summary directory under {folder}")


def read_state(path: Path, kind: str) -> dict[str, Any]:
    return json.loads((path / f"{kind}.json").read_text())


def write_state(path: Path, kind: str, state: dict[str, Any]) -> None:
    write_text(path / f"{kind}.json", json.dumps(state, indent=2, default=str) + "\n")


def open_parent_run(cfg: DictConfig, name: str, tags: dict[str, str], run_id: str | None) -> Any:
    """The workflow's MLflow parent run (reopened by id on a rerun), or None with MLflow off."""
    if not cfg.logging.mlflow:
        return None
    from src.tracking import MlflowTracker
    from src.tracking.start import experiment_name, resolve_uri

    cfg = resolve_uri(cfg)
    tracker = MlflowTracker(cfg.logging.mlflow_tracking_uri, experiment_name(cfg), name, tags, run_id=run_id)
    return tracker if tracker.run_id else None


def record_parent(path: Path, kind: str, state: dict[str, Any], parent: Any) -> dict[str, str]:
    """Save the parent run's id in the workflow state (a rerun reopens it) and write the state.

    Returns the environment that nests each child run under the parent (empty with MLflow off).
    """
    if parent is not None:
        state["mlflow_run_id"] = parent.run_id
    write_state(path, kind, state)
    env: dict[str, str] = {}
    if parent is not None:
        from src.tracking.start import PARENT_RUN_ENV

        env[PARENT_RUN_ENV] = parent.run_id
    return env


def run_then_summarise(
    jobs: list[Job],
    gpus: list[str],
    env: dict[str, str],
    path: Path,
    kind: str,
    state: dict[str, Any],
    parent: Any,
    label: Callable[[Job], str],
    summarise: Callable[[list[Job]], dict[str, float]],
) -> None:
    """Run a workflow's jobs; then, even when one fails or the workflow is interrupted, record them and close up.

    The state (`<kind>.json`) gets each job's run directory under `label(job)`; `summarise` writes
    `<kind>_summary.csv` and `.md` from the finished jobs and returns the metrics for the MLflow parent
    run, which also gets those files and ends FAILED if any job did not finish. Raises RunError
    naming those jobs: the same command resumes them.
    """
    failed: list[Job] = []
    try:
        run_jobs(jobs, gpus, env, path / "logs")
    finally:
        done = [j for j in jobs if j.returncode == 0 and j.run_dir is not None and is_finished(j.run_dir)]
        failed = [j for j in jobs if j not in done]
        state["runs"] = {label(j): str(j.run_dir) if j.run_dir else None for j in jobs}
        write_state(path, kind, state)
        metrics = summarise(done) if done else {}
        if parent is not None:
            parent.log_metrics(metrics, step=0, epoch=0)
            for name in (f"{kind}_summary.csv", f"{kind}_summary.md"):
                if (path / name).is_file():
                    parent.log_artifact(path / name)
            parent.finish("FINISHED" if not failed else "FAILED")
    if failed:
        names = ", ".join(j.name for j in failed)
        raise RunError(f"{names} did not finish; fix the cause and run the same command again to resume")
