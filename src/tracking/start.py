"""Start the run's trackers (metrics.jsonl, TensorBoard, MLflow) on rank 0, continuing a resumed run's own logs."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.config.sections import flatten, to_plain

# The MLflow run that a workflow (cross-validation, sweep) opened; its runs become that run's children.
PARENT_RUN_ENV = "TEMPLATE_MLFLOW_PARENT_RUN_ID"


def resolve_uri(cfg: DictConfig) -> DictConfig:
    """Fix the MLflow store in the config (the saved config.yaml names the store its run is in)."""
    if not cfg.logging.mlflow:
        return cfg
    from src.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.logging.mlflow_tracking_uri, Path(cfg.output).resolve())
    return OmegaConf.merge(cfg, {"logging": {"mlflow_tracking_uri": uri}})


def spawn_mlflow(cfg: DictConfig) -> None:
    """On the process that will track (rank 0), start MLflow's child as early as the config is known:
    it imports MLflow while train.py imports torch, and opens no store until `prestart_mlflow`."""
    if cfg.logging.mlflow and os.environ.get("RANK", "0") == "0":
        from src.tracking import resolve_tracking_uri
        from src.tracking.mlflow_tracker import spawn

        spawn(resolve_tracking_uri(cfg.logging.mlflow_tracking_uri, Path(cfg.output).resolve()))


def prestart_mlflow(cfg: DictConfig) -> None:
    """Start MLflow's tracking process now, so its slow start (import, store migration) overlaps the
    rest of set-up; `start_trackers` takes it over. Called once the run is known to go ahead, so a
    refused start writes no store."""
    if cfg.logging.mlflow:
        from src.tracking.mlflow_tracker import prestart

        prestart(cfg.logging.mlflow_tracking_uri)


def experiment_name(cfg: DictConfig) -> str:
    return str(cfg.logging.experiment_name or cfg.dataset.name)


def start_trackers(cfg: DictConfig, run_dir: Path, saved: dict | None, step: int) -> Any:
    """metrics.jsonl always; TensorBoard and MLflow as configured. Resumed runs continue their own logs."""
    from src.tracking import MetricsFile, MlflowTracker, MultiTracker, TensorBoardTracker

    saved = saved or {}
    trackers: list[Any] = [MetricsFile(run_dir / "metrics.jsonl")]
    if cfg.logging.tensorboard:
        trackers.append(
            TensorBoardTracker(run_dir / cfg.logging.log_dir, purge_step=step + 1 if step else None)
        )
    if cfg.logging.mlflow:
        tags = {"tag": str(cfg.tag), "run_dir": str(run_dir), "host": socket.gethostname(), **_git_tags()}
        # debug=true smoke tests say so; the UI's search `tags.debug = 'false'` hides them
        tags["debug"] = str(bool(cfg.get("debug"))).lower()
        if cfg.dataset.get("fold") is not None:
            tags["fold"] = str(cfg.dataset.fold)
        if os.environ.get(PARENT_RUN_ENV):  # started by script/cross_validate.py or sweep.py: nest under it
            tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        run_id = saved.get("MlflowTracker", {}).get("run_id")
        mlflow = MlflowTracker(
            cfg.logging.mlflow_tracking_uri, experiment_name(cfg), run_dir.name, tags, run_id=run_id
        )
        if cfg.logging.get("system_metrics"):
            mlflow.log_system_metrics()
        trackers.append(mlflow)  # activate_mlflow() points user code at it once it is needed
    multi = MultiTracker(trackers)
    if saved:
        multi.resume(saved)
    elif step == 0:
        multi.resume({"MetricsFile": {"lines": 0}})  # a restart from nothing drops a crashed attempt's lines
    if not saved.get("MlflowTracker"):
        multi.log_params(flatten(to_plain(cfg), keep_empty=False))
        multi.log_artifact(run_dir / "config.yaml")
    return multi


def activate_mlflow(trackers: Any, wait: bool = True) -> None:
    """Make `mlflow.log_metric(...)` in user code (a custom evaluator) land in this run's MLflow run.

    `wait`: until the tracking process has opened the run (it starts before the model is built, so it
    usually has); without it the run is pointed at as soon as it opens. The trainer calls it before
    the first validation, waiting only when the evaluator is a user's.
    """
    from src.tracking import MlflowTracker

    for tracker in getattr(trackers, "trackers", []):
        if isinstance(tracker, MlflowTracker):
            tracker.make_active(wait)


def _git_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()} if commit else {}
