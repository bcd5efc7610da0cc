"""What train.py and test.py do: decide where the run lives, train it, test it, and report how it ended."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.checkpoint.checkpointer import find_resume_state, load_checkpoint
from src.config import load_config
from src.distributed import process_group as dist_utils
from src.engine.build import preflight
from src.engine.precision import nondeterministic_op, prepare_determinism
from src.engine.signals import Stopped
from src.engine.tester import run_test
from src.engine.trainer import Trainer
from src.errors import ConfigError, RunError, TemplateError
from src.results.atomic_files import NoRoomError, as_no_room, atomic_write
from src.results.run_dir import (
    config_changes,
    elastic_marker,
    new_run_dir,
    refuse_harmful_changes,
    resume_command,
    run_dir_of,
    save_config,
)
from src.results.run_lock import RunLock, lock_run_dir
from src.tracking import setup_logging
from src.tracking.start import experiment_name, resolve_uri
from src.user_modules import import_user_modules

log = logging.getLogger("template")


def train_main(
    config_path: str | Path,
    overrides: list[str],
    cfg: DictConfig | None = None,
    on_epoch_end: Callable[[Path, int, dict[str, float]], None] | None = None,
) -> int:
    """Train (or resume) the run described by `config_path`; returns the process exit code.

    `on_epoch_end(run_dir, epoch, metrics)`: a launcher's hook (Ray Train's report), called on every
    rank once the epoch's checkpoint is written.
    """
    config_path = Path(config_path)
    cfg = cfg if cfg is not None else load_config(config_path, overrides)
    import_user_modules(list(cfg.imports))
    preflight(cfg)
    prepare_determinism(cfg.gpu)  # before dist setup, which may start CUDA
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    setup_logging(None, ctx.rank, debug=bool(cfg.debug))
    run_dir, resume, fresh, lock = _plan(cfg, config_path, overrides, ctx)  # rank 0 holds the run's lock
    if not fresh and _finished(run_dir, resume, int(cfg.epoch), ctx):
        dist_utils.cleanup()
        if lock is not None:
            lock.release()
        return 0
    cfg = OmegaConf.merge(cfg, {"run_dir": str(run_dir)})
    if ctx.is_main:
        cfg = resolve_uri(cfg)
        _save_config(cfg, run_dir, fresh)
    setup_logging(run_dir / "train.log", ctx.rank, debug=bool(cfg.debug))
    log.info("result directory: %s", run_dir)
    if ctx.is_main:  # summary.txt marks a finished run; a resumed one is not finished until it says so again
        (run_dir / "summary.txt").unlink(missing_ok=True)
    trainer = Trainer(cfg, ctx, run_dir, resume)
    if on_epoch_end is not None:
        trainer.on_epoch_end = lambda epoch, metrics: on_epoch_end(run_dir, epoch, metrics)
    started = time.time()
    status = "FAILED"
    try:
        state = trainer.fit()
        if not state.finished:
            status = "KILLED"
            return trainer.stop.exit_code
        stop = trainer.stop.agreed(ctx.device)  # a stop signal now ends the test: a re-run tests again
        try:
            metrics = run_test(cfg, ctx, run_dir, checkpoint=None, trackers=trainer.trackers, stop=stop)
        except NoRoomError as err:  # training is done and saved: the same command only tests
            raise NoRoomError(f"{err}, then finish the test with: {resume_command(run_dir)}") from None
        status = "FINISHED"
        marker = elastic_marker(cfg)
        if marker is not None and ctx.local_rank == 0:
            marker.unlink(missing_ok=True)  # done: nothing left for a torchrun restart to resume
        if ctx.is_main:
            _write_summary(cfg, run_dir, trainer, metrics, time.time() - started)
        return 0
    except Stopped:
        status = "KILLED"
        log.warning("stopped by %s during the test; training is complete and saved; test it with: %s (it "
                    "trains nothing more)", trainer.stop.signal_name or "another rank's stop request",
                    resume_command(run_dir))  # fmt: skip
        return trainer.stop.exit_code
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C twice; a launcher's stop (Ray) in a worker thread
        status = "KILLED"
        log.warning("stopped; resume with: %s", resume_command(run_dir))
        raise
    except TemplateError as err:
        # Failing in set-up (bad argument, missing data, unfit checkpoint) leaves no half-made directory,
        # and the error is said once, by the caller's `error:` line; a kept run's train.log records it.
        started = trainer.state.global_step > 0 or (run_dir / "checkpoints").exists()
        if fresh and ctx.is_main and not started:
            _discard(run_dir, trainer)
            status = "DISCARDED"
        else:
            log.error("run failed: %s", err)
        raise
    except Exception as err:
        problem = _explained(err, cfg, run_dir)
        if problem is None:
            log.exception("run failed")
            raise
        log.error("run failed: %s", problem)
        raise problem from None
    finally:
        _close(trainer, status, run_dir, lock)


def _save_config(cfg: DictConfig, run_dir: Path, fresh: bool) -> None:
    """Write the run's config.yaml; on a full disk a new directory goes, a resumed one keeps its config."""
    try:
        save_config(cfg, run_dir)
    except NoRoomError as err:
        if not fresh:
            raise NoRoomError(f"{err}, then resume with: {resume_command(run_dir)}") from None
        _remove_new_dir(run_dir)
        raise NoRoomError(f"{err}, then run the same command again") from None


def _explained(err: Exception, cfg: DictConfig, run_dir: Path) -> TemplateError | None:
    """A failure the user can act on, said in one line (None: an unexpected error, shown with its traceback)."""
    if isinstance(err, RuntimeError):
        op = nondeterministic_op(err)
        if op is None or not cfg.gpu.get("deterministic", False):
            return None
        return RunError(
            f"{op} has no deterministic implementation, and gpu.deterministic=true allows only "
            "deterministic kernels; replace the op in your code, or set gpu.deterministic=false"
        )
    full = as_no_room(err, str(run_dir))
    return None if full is None else NoRoomError(f"{full}, then resume with: {resume_command(run_dir)}")


def _close(trainer: Trainer, status: str, run_dir: Path, lock: RunLock | None) -> None:
    """However the run ended: stop handlers off, trackers told how, pending writes done, the lock freed."""
    trainer.stop.uninstall()
    if trainer.trackers is not None:
        _finish_trackers(trainer.trackers, status, run_dir)
    if status == "FAILED":
        _say_failed(run_dir)
    if trainer.checkpointer is not None:
        trainer.checkpointer.close()
    dist_utils.cleanup()
    if lock is not None:
        lock.release()


def test_main(
    config_path: str | Path, overrides: list[str], checkpoint: str | None, cfg: DictConfig | None = None
) -> int:
    """Evaluate a finished (or stopped) run on its test split, writing `test/` in its directory."""
    config_path = Path(config_path)
    cfg = cfg if cfg is not None else load_config(config_path, overrides)
    import_user_modules(list(cfg.imports))
    preflight(cfg)
    if not cfg.run_dir and not checkpoint:
        raise ConfigError(
            f"{config_path} is not a result directory's config.yaml; pass result/<...>/config.yaml, "
            "or add --checkpoint <file.pth>"
        )
    out = None
    if cfg.run_dir:
        run_dir = run_dir_of(config_path)
    else:  # an experiment config and any checkpoint: the results go beside the checkpoint
        run_dir = Path(str(checkpoint)).parent
        out = run_dir / f"test_{Path(str(checkpoint)).stem}"
    prepare_determinism(cfg.gpu)
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    lock = _lock(run_dir, ctx, "testing") if out is None else None  # test/ and train.log are the run's
    log_file = run_dir / "train.log" if ctx.is_main and out is None else None
    setup_logging(log_file, ctx.rank, debug=bool(cfg.debug))
    trackers = None
    try:
        if ctx.is_main and cfg.logging.mlflow and out is None:
            trackers = _reopen_mlflow(cfg, run_dir)
        ckpt = Path(checkpoint) if checkpoint else None
        run_test(cfg, ctx, run_dir, checkpoint=ckpt, trackers=trackers, out=out)
        return 0
    finally:
        if trackers is not None:
            trackers.finish(None)
        dist_utils.cleanup()
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------- where the run lives
def _plan(
    cfg: DictConfig, config_path: Path, overrides: list[str], ctx: Any
) -> tuple[Path, dict | None, bool, RunLock | None]:
    """(result directory, checkpoint state to resume from or None, whether the directory is new, its lock).

    The directory is locked (rank 0) before anything in it is read for the resume or changed.
    """
    marker = elastic_marker(cfg)
    # Ray Train's restarts keep TEMPLATE_RUN_KEY: its marker, when there is one, names the run to resume.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or "TEMPLATE_RUN_KEY" in os.environ
    if cfg.run_dir:  # python train.py result/.../config.yaml: resume in place
        run_dir = run_dir_of(config_path)
        lock = _lock(run_dir, ctx, "training")
        saved = load_config(config_path)
        if any(o.split("=", 1)[0].strip() == "checkpoint.resume_from" for o in overrides):
            raise ConfigError(
                "checkpoint.resume_from and resuming a result directory in place were both given; "
                "resume in place with `python train.py <run>/config.yaml`, or warm-start a new run from your "
                "experiment config with checkpoint.resume_from=<file>"
            )
        changes = config_changes(saved, cfg)
        harmful = refuse_harmful_changes(changes, bool(cfg.checkpoint.allow_config_change))
        for key, old, new in changes:
            log.info(
                "resume: %s changed %r -> %r%s",
                key,
                old,
                new,
                " (allowed explicitly)" if (key, old, new) in harmful else "",
            )
        kept = [key for key, _, _ in harmful if key.startswith(("optimizer.", "lr_scheduler."))]
        if kept:
            log.warning(
                "resume: %s changed, but the optimizer and schedule continue from the checkpoint's state, "
                "which keeps the old values; to train with new ones start a new run from the weights: "
                "checkpoint.resume_from=<checkpoint> checkpoint.weights_only_resume=true",
                ", ".join(kept),
            )
        problems: list[str] = []
        state = find_resume_state(run_dir, tidy=ctx.is_main, problems=problems)
        if state is None:
            if not cfg.checkpoint.allow_restart:
                raise ConfigError(_no_checkpoint(run_dir, problems))
            if ctx.is_main:
                _set_history_aside(run_dir, cfg)
            state = _state_to_continue(cfg) if cfg.checkpoint.resume_from else None
        _check_world_size(state, ctx, cfg)
        _forget_other_metric(state, [key for key, _, _ in changes])
        if state is not None and "progress" in state:  # written before `planned_epochs` was saved
            state["progress"].setdefault("planned_epochs", int(saved.epoch))
        return run_dir, state, False, lock
    if restarted:  # torchrun restarted a failed worker group: rank 0's marker names the run to resume
        found = (
            marker.read_text().strip() if ctx.is_main and marker is not None and marker.is_file() else None
        )
        found = dist_utils.broadcast_object(found)
        if found:
            run_dir = Path(found)
            count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            log.warning(
                "%s: resuming %s", f"torchrun restart {count}" if count else "Ray Train restart", run_dir
            )
            lock = _lock(run_dir, ctx, "training")
            return run_dir, find_resume_state(run_dir, tidy=ctx.is_main), False, lock
    # A bad resume_from file fails before any directory exists.
    warm = _state_to_continue(cfg) if cfg.checkpoint.resume_from else None
    run_dir = new_run_dir(cfg) if ctx.is_main else None
    run_dir = Path(dist_utils.broadcast_object(str(run_dir) if run_dir else None))
    lock = _lock(run_dir, ctx, "training")
    if ctx.local_rank == 0 and marker is not None:  # one per node: the agent key differs between nodes
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(marker, str(run_dir))
        except NoRoomError as err:  # a full disk at start-up under torchrun: nothing is left behind
            if ctx.is_main:
                _remove_new_dir(run_dir)
            raise NoRoomError(f"{err}, then run the same command again") from None
    return run_dir, warm, True, lock


def _lock(run_dir: Path, ctx: Any, action: str) -> RunLock | None:
    """Rank 0 locks the result directory; every rank raises its refusal, so the whole job exits 2."""
    lock, refusal = None, None
    if ctx.is_main:
        try:
            lock = lock_run_dir(run_dir, action)
        except ConfigError as err:
            refusal = str(err)
    refusal = dist_utils.broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal)
    return lock


def _remove_new_dir(run_dir: Path) -> None:
    """A new result directory that could not be set up goes again, with its dataset folder if now empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
        run_dir.parent.rmdir()


def _no_checkpoint(run_dir: Path, problems: list[str]) -> str:
    """The refusal of a resume that has nothing to resume from: what was found, and the two ways on."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        found = f"{folder} does not exist"
    elif not problems:
        found = f"{folder} holds no checkpoint"
    else:
        found = f"none of the {len(problems)} checkpoint(s) in {folder} loads ({problems[0]})"
    return (
        f"cannot resume {run_dir}: {found}, so it would train again from step 0; start a fresh run from your "
        f"experiment config (python train.py <experiment>.yaml), or restart this directory from step 0 with "
        f"{resume_command(run_dir)} checkpoint.allow_restart=true (its metrics.jsonl, train.log, test/ and "
        f"checkpoints/ are moved into {run_dir}/restarted_<time>/ first)"
    )


def _set_history_aside(run_dir: Path, cfg: DictConfig) -> Path:
    """checkpoint.allow_restart: move what the lost attempt left into restarted_<time>/, then start over."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    aside = run_dir / f"restarted_{stamp}"
    for i in range(1, 1000):
        if not aside.exists():
            break
        aside = run_dir / f"restarted_{stamp}_{i}"
    aside.mkdir()
    log_dir = Path(str(cfg.logging.log_dir))
    # TensorBoard's folder, when it is inside the run directory
    tensorboard = () if log_dir.is_absolute() or not log_dir.parts else (log_dir.parts[0],)
    names = ("metrics.jsonl", "train.log", "summary.txt", "test", "checkpoints", *tensorboard)
    moved = [name for name in names if (run_dir / name).exists()]
    for name in moved:
        (run_dir / name).rename(aside / name)
    log.warning("checkpoint.allow_restart=true: %s has no checkpoint that loads; %s moved to %s; training "
                "starts again from step 0", run_dir, ", ".join(moved) or "nothing", aside)  # fmt: skip
    return aside


def _say_failed(run_dir: Path) -> None:
    """The closing line of a failed run: where its checkpoints are, or that it has none to resume."""
    folder = run_dir / "checkpoints"
    if folder.is_dir() and any(p for p in folder.glob("*.pth") if not p.name.startswith(".")):
        log.error("the run FAILED; checkpoints kept in %s; after a fix, resume with: %s",
                  folder, resume_command(run_dir))  # fmt: skip
    else:
        log.error("the run FAILED before its first checkpoint, so there is nothing to resume; after a fix, start "
                  "a fresh run from your experiment config, or again in this directory with: %s "
                  "checkpoint.allow_restart=true", resume_command(run_dir))  # fmt: skip


def _finished(run_dir: Path, state: dict | None, epochs: int, ctx: Any) -> bool:
    """A run that trained all its epochs (or that early stopping ended) and was tested, resumed without a
    larger `epoch`: say so and how to go on, and touch nothing (a run cut before its test is tested)."""
    progress = (state or {}).get("progress")
    if progress is None or state.get("weights_only"):
        return False
    done = int(progress.get("epoch", 0))
    stopped = bool(progress.get("early_stopped")) and epochs <= int(progress.get("planned_epochs") or epochs)
    summary = run_dir / "summary.txt"
    tested = dist_utils.broadcast_object(summary.is_file() if ctx.is_main else None)
    if not tested or (done < epochs and not stopped):
        return False
    how = (
        f"early stopping ended it at epoch {done} of {epochs}"
        if done < epochs
        else f"it trained {done} epoch(s)"
    )
    log.info(
        "this run is finished (%s, tested; see %s) and nothing was changed; to train it longer: %s epoch=<more "
        "than %d>; to test it again: python test.py %s/config.yaml",
        how, summary, resume_command(run_dir), max(done, epochs), run_dir,
    )  # fmt: skip
    return True


def _state_to_continue(cfg: DictConfig) -> dict[str, Any]:
    """checkpoint.resume_from: the whole training state of another run, in this new directory."""
    state = load_checkpoint(cfg.checkpoint.resume_from)
    state.pop("tracking", None)
    if cfg.checkpoint.weights_only_resume:
        return {"model": state["model"], "weights_only": True}
    if "progress" not in state:
        raise RunError(
            f"{cfg.checkpoint.resume_from} holds weights only; use model.pretrained_weight=<file> for it"
        )
    done = int(state["progress"].get("epoch", 0))
    if done >= int(cfg.epoch) and not cfg.debug:
        raise ConfigError(
            f"checkpoint.resume_from={cfg.checkpoint.resume_from} has trained {done} epoch(s) and epoch={cfg.epoch}: "
            f"nothing is left to train; set epoch above {done}, or checkpoint.weights_only_resume=true to start "
            "over from its weights"
        )
    # A new directory keeps its own best.pth and top-k files: the other run's records stay with it.
    state["progress"] = {
        **state["progress"],
        "best_value": None,
        "best_epoch": 0,
        "top_k": [],
        "stale_epochs": 0,
        "stale_best": None,
    }
    return state


def _forget_other_metric(state: dict | None, changed: list[str]) -> None:
    """A changed monitor (allowed explicitly) starts its ranking afresh: a best value of another metric,
    or of the other direction, must never be compared with the new one."""
    progress = (state or {}).get("progress")
    if progress is None:
        return
    if {"checkpoint.monitor", "checkpoint.mode"} & set(changed):
        progress.update(best_value=None, best_epoch=0, top_k=[])
        log.warning("resume: checkpoint.monitor/mode changed: best.pth and the top-k files are chosen afresh "
                    "from the next validation on")  # fmt: skip
    if {"training.early_stopping.monitor", "training.early_stopping.mode"} & set(changed):
        progress.update(stale_best=None, stale_epochs=0)


def _check_world_size(state: dict | None, ctx: Any, cfg: DictConfig) -> None:
    if state is None or "world_size" not in state or state["world_size"] == ctx.world_size:
        return
    if cfg.checkpoint.allow_config_change:
        log.warning(
            "resuming a %d-process run with %d processes: the global batch changes",
            state["world_size"],
            ctx.world_size,
        )
        return
    raise ConfigError(
        f"this run was trained with {state['world_size']} process(es) and is resumed with {ctx.world_size}: the global "
        "batch and data order would change; use the same number, or add checkpoint.allow_config_change=true"
    )


def _discard(run_dir: Path, trainer: Trainer) -> None:
    """A run that failed before its first step and checkpoint leaves nothing behind."""
    if trainer.trackers is not None:
        trainer.trackers.finish("FAILED")
        trainer.trackers = None
    log.info("removed %s: the run stopped before its first step", run_dir)
    logging.getLogger("template").handlers.clear()
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


# ---------------------------------------------------------------------- tracking and summary
def _finish_trackers(trackers: Any, status: str, run_dir: Path) -> None:
    """Close the trackers; a full disk while flushing them is one line, and never hides the run's own error."""
    try:
        trackers.finish(status)
    except Exception as err:
        full = as_no_room(err, str(run_dir))
        if full is None:
            raise
        if status == "FINISHED":  # the history is incomplete: the run must not report success
            raise NoRoomError(f"{full}, then check {run_dir / 'metrics.jsonl'}") from None
        log.error("%s", full)  # the error already in flight is the one the user reads


def _reopen_mlflow(cfg: DictConfig, run_dir: Path) -> Any:
    state = find_resume_state(run_dir)
    run_id = ((state or {}).get("tracking") or {}).get("MlflowTracker", {}).get("run_id")
    if not run_id:
        return None
    from src.tracking import MlflowTracker

    tracker = MlflowTracker(
        cfg.logging.mlflow_tracking_uri, experiment_name(cfg), run_dir.name, tags={}, run_id=run_id
    )
    tracker.make_active()
    return tracker


def _write_summary(
    cfg: DictConfig, run_dir: Path, trainer: Trainer, test: dict[str, float], seconds: float
) -> None:
    st = trainer.state
    monitor = cfg.checkpoint.monitor
    best = (
        f"{monitor} = {st.best_value:.6g} at epoch {st.best_epoch}"
        if st.best_value is not None
        else "not validated"
    )
    lines = [
        f"run:        {run_dir}",
        f"epochs:     {st.epoch} ({st.global_step} optimizer steps)",
        f"best:       {best}",
        f"wall time:  {_clock(seconds)} (this session)",
        *([f"privacy:    {trainer.privacy.summary()}"] if trainer.privacy else []),  # privacy hook
        "test:       " + ", ".join(f"{k}={v:.4f}" for k, v in test.items()),
        f"resume:     {resume_command(run_dir)} epoch=<more than {st.epoch}>",
        f"test again: python test.py {run_dir}/config.yaml",
    ]
    (run_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        log.info(line)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
