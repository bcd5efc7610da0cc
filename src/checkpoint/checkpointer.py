"""Checkpoints: what a save holds, where it goes, and how a run finds and loads the state it resumes.

The `Checkpointer` is handed the model, optimizer, schedule, scaler, EMA and the run's progress
(TrainState, which also holds the sampler's position: `batches_done`). A save copies the state to
host memory at the step boundary and hands it to the background `CheckpointWriter`, which writes,
fsyncs and renames it (src/results/atomic_files.py) while training goes on. At most one write is in flight: the
next save, the end of training, a stop signal and every failure path wait for it, and its error
surfaces there as one line. Tracker commits (MLflow's exactly-once metrics) run only once the
files are published. Under FSDP the sharded model and optimizer go to a DCP folder, written in the
background too (see `_save_sharded`): a .pth file is published only after the folder it points to
is complete and renamed, so a kill at any moment leaves a last.pth whose folder loads. Each
checkpoint records which DCP folder every file points to, so pruning never has to load a file.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import shutil
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from src.checkpoint.rng import capture_rng, restore_rng
from src.checkpoint.train_state import TrainState, improved
from src.checkpoint.writer import CheckpointWriter
from src.distributed import process_group as dist_utils
from src.errors import RunError
from src.optim.schedule_free import evaluation_weights, train_weights
from src.optim.schedulers import replan
from src.results.atomic_files import NoRoomError, atomic_save
from src.results.run_dir import resume_command

log = logging.getLogger("template")


class Checkpointer:
    """Saves, loads and prunes one run's checkpoints; best.pth, top-k, periodic, last and previous files."""

    def __init__(
        self,
        section: Any,
        ctx: Any,
        run_dir: Path,
        parts: dict[str, Any],
        progress: TrainState,
        epochs: int,
        *,
        batch: int,
        model_name: str,
        timeout_minutes: int,
    ) -> None:
        """`section`: the config's checkpoint section (what to save when, what ranks best).

        `parts`: raw_model, optimizer, schedule (or None), scaler, ema (or None), privacy (optional).
        `batch` is recorded in each save, `model_name` names the model when weights
        do not fit, `timeout_minutes` (distributed.timeout_minutes) bounds FSDP's checkpoint collectives.
        """
        self.section, self.ctx, self.run_dir = section, ctx, run_dir
        self.batch, self.model_name, self.timeout_minutes = int(batch), str(model_name), int(timeout_minutes)
        self.ckpt_dir = run_dir / "checkpoints"
        self.raw_model: torch.nn.Module = parts["raw_model"]
        self.optimizer: torch.optim.Optimizer = parts["optimizer"]
        self.schedule: Any = parts["schedule"]
        self.scaler: torch.amp.GradScaler = parts["scaler"]
        self.ema: Any = parts["ema"]
        self.privacy: Any = parts.get("privacy")  # training.privacy: the accountant's history
        self.progress = progress
        self.epochs = epochs  # the `epoch` this session trains to (a change re-plans the schedule)
        self.trackers: Any = None  # set once started: their state goes into each checkpoint
        self.tracking_state: dict[str, Any] | None = None  # the resumed checkpoint's, for the trackers
        self.dcp_files: dict[str, str] | None = None  # file name -> the DCP folder it points to (FSDP)
        self.shards: ShardWrite | None = None  # FSDP: this rank's DCP write in flight
        self.shard_group: Any = None  # FSDP: the gloo group DCP's writing thread talks over
        self.writer = CheckpointWriter(self._write_files)

    # ------------------------------------------------------------------ saving
    def epoch_names(self, epoch: int, metrics: dict[str, float]) -> list[str]:
        """Extra names this epoch's checkpoint gets: best.pth, a top-k file, a periodic epoch file.

        Nothing is named best.pth before a validation has measured `checkpoint.monitor`.
        """
        section, st = self.section, self.progress
        names: list[str] = []
        freq = int(section.save_frequency)
        if freq and (epoch + 1) % freq == 0:
            names.append(f"epoch_{epoch + 1:04d}.pth")
        value = metrics.get(str(section.monitor))
        if value is None or not math.isfinite(value):  # a NaN metric is never best, nor in the top k
            return names
        if improved(value, st.best_value, section.mode):
            st.best_value, st.best_epoch = value, epoch + 1
            if section.save_best:
                names.append("best.pth")
        k = int(section.save_top_k)
        if k > 1:
            name = f"top_epoch_{epoch + 1:04d}.pth"
            ranked = sorted([*st.top_k, [value, name]], key=lambda t: t[0], reverse=section.mode == "max")
            st.top_k = ranked[:k]
            if [value, name] in st.top_k:
                names.append(name)
        return names

    def save(self, extra_names: list[str], reason: str, final: bool = False) -> None:
        """Snapshot the state to host memory and start writing last.pth (+ `extra_names`) on rank 0.

        Returns once the copy is taken; the write goes on in the background (see `wait`). `final`:
        the run ends after this save, so the trackers' state is settled first (the end of a run
        waits for MLflow anyway); earlier saves take it as it is.
        """
        ctx, st = self.ctx, self.progress
        if not math.isfinite(st.window_loss_sum):  # weights a NaN touched never replace last.pth
            raise self.non_finite(st.window_loss_sum)
        if not self.weights_finite():  # nor weights that went NaN/inf on a step whose loss was finite
            raise self.non_finite_weights()
        self.wait()  # the previous write is published and committed before the trackers' state is read
        with evaluation_weights(self.optimizer) as kept:  # schedule-free: save the evaluation weights
            rng = dist_utils.all_gather_object(capture_rng())
            state: dict[str, Any] = {
                "format": 1,
                "model": self._model_state_dict(),
                "scheduler": self.schedule.state_dict() if self.schedule is not None else None,
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "progress": asdict(st),
                "rng": rng,
                "world_size": ctx.world_size,
                "batch": self.batch,
            }
            if self.privacy is not None:
                state["privacy"] = self.privacy.state_dict()
            if ctx.strategy == "fsdp":
                self.shards = self._save_sharded()
                state["dcp"] = self.shards.final.name
            else:
                state["optimizer"] = self.optimizer.state_dict()
                if kept is not None:  # and the training weights, bit for bit, for an exact resume
                    state["schedule_free_train"] = kept
            if self.ema is not None:  # "model" holds the weights the run reports; the trained ones resume
                state["raw_model"] = state["model"]
                state["model"] = self.ema.module.state_dict()
            if not ctx.is_main:
                dist_utils.barrier()
                return
            if self.trackers is not None:
                if final:
                    self.trackers.settle()
                state["tracking"] = self.trackers.state()
            names = set(extra_names)
            if self.section.save_last or not names:  # a save always leaves a resumable file
                names.add("last.pth")
            keep_top = {name for _, name in st.top_k}
            live_dcp = self._record_dcp(sorted(names), state.get("dcp"), keep_top)
            if live_dcp is not None:
                state["dcp_files"] = dict(self.dcp_files or {})
            host = self.writer.snapshot(state)  # training may change the originals from here on
        paths = [self.ckpt_dir / n for n in sorted(names)]
        shards = self.shards
        self.writer.submit(
            host,
            paths,
            before=shards.publish if shards is not None else None,  # the folder first, then files naming it
            after=lambda: self._published(paths, reason, keep_top, live_dcp),
        )
        dist_utils.barrier()

    def wait(self, failed: bool = False) -> None:
        """Block until the write in flight is published, and this rank's DCP shards are written (FSDP);
        its error surfaces here as one line.

        `failed`: the run is ending with another error, which wins; a write error is only logged.
        """
        shards, self.shards = self.shards, None
        try:
            self.writer.wait()  # rank 0: its job waited for the shards, renamed their folder, then wrote
            if shards is not None:
                shards.wait()  # the other ranks: their own part (done already on rank 0)
        except RunError as err:
            if isinstance(err, NoRoomError):
                err = NoRoomError(f"{err}, then resume with: {resume_command(self.run_dir)}")
            if failed:
                log.error("%s", err)
                return
            raise err from None

    def finish(self, failed: bool = False) -> None:
        """End of training or a stop: wait for the write in flight; then every rank may read the files."""
        self.wait(failed)
        if not failed:
            dist_utils.barrier()

    def close(self) -> None:
        """FSDP: destroy the gloo group DCP wrote over and drop it, so its worker threads are joined now,
        on this thread. Kept alive (the loop's objects are frozen out of the garbage collector), they
        would run into the interpreter's shutdown, where a thread that touches Python aborts the process."""
        group, self.shard_group = self.shard_group, None
        if group is not None and self.ctx.distributed:
            import torch.distributed as dist

            dist.destroy_process_group(group)

    def _what_is_kept(self) -> str:
        """For a run stopped by non-finite numbers: where the last good state is, if any was saved."""
        if (self.ckpt_dir / "last.pth").exists():
            return f"the last good checkpoint is kept in {self.ckpt_dir}"
        return "no checkpoint had been saved yet"

    def non_finite(self, loss: float) -> RunError:
        """The error for a loss that became NaN/inf, naming the checkpoint that is still good."""
        kept = self._what_is_kept()
        return RunError(
            f"the training loss became {loss} at epoch {self.progress.epoch + 1}, step {self.progress.global_step}; "
            f"{kept}; lower optimizer.lr, set training.gradient_clip_norm, or training.nan_policy=skip"
        )

    def weights_finite(self) -> bool:
        """Whether every weight and float buffer is finite on every rank: one reduction and one sync, at a
        save or a skipped step only (a pass over the weights per step would slow the loop)."""
        tensors = [*self.raw_model.parameters(), *self.raw_model.buffers()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: this rank's shard
        local = [t.detach() for t in local if t.is_floating_point() and t.numel()]
        finite = not local or bool(torch.isfinite(torch.nn.utils.get_total_norm(local, norm_type=math.inf)))
        return not dist_utils.any_rank(not finite, self.ctx.device)

    def non_finite_weights(self) -> RunError:
        """The error for weights that are NaN/inf: no policy can train on, so the run stops, saving nothing."""
        kept = self._what_is_kept()
        return RunError(
            f"the model's weights became non-finite (NaN/inf) by epoch {self.progress.epoch + 1}, step "
            f"{self.progress.global_step}, so the run cannot train on (training.nan_policy=skip cannot undo it); "
            f"{kept}; lower optimizer.lr or set training.gradient_clip_norm"
        )

    def _write_files(self, state: dict[str, Any], paths: list[Path]) -> None:
        """On the writer thread: write atomically, last.pth its own file and the other names one copy of
        it; the last.pth replaced becomes previous.pth once the new one is on disk."""
        last = self.ckpt_dir / "last.pth"
        ordered = sorted(paths, key=lambda p: p != last)  # last.pth first: the written file itself
        atomic_save(state, ordered, previous=self.ckpt_dir / "previous.pth" if last in paths else None)

    def _published(
        self, paths: list[Path], reason: str, keep_top: set[str], live_dcp: set[str] | None
    ) -> None:
        """On the writer thread, once every name is in place: prune, commit the trackers, say so."""
        for path in self.ckpt_dir.glob("top_epoch_*.pth"):
            if path.name not in keep_top:
                path.unlink()
        if live_dcp is not None:
            for folder in self.ckpt_dir.glob("dcp_step_*"):
                if folder.name not in live_dcp:
                    shutil.rmtree(folder, ignore_errors=True)
        if self.trackers is not None:
            self.trackers.commit()  # exactly once: only what a published checkpoint holds
        log.info("checkpoint saved (%s): %s", reason, ", ".join(p.name for p in paths))

    def _record_dcp(self, names: list[str], dcp: str | None, keep_top: set[str]) -> set[str] | None:
        """Which DCP folder each file will point to after this save; the set still in use (None: no DCP)."""
        if dcp is None and self.dcp_files is None and not any(self.ckpt_dir.glob("dcp_step_*")):
            return None
        if self.dcp_files is None:  # a run from before the record: read each file once
            self.dcp_files = {}
            for pth in self.ckpt_dir.glob("*.pth"):
                try:
                    found = torch.load(pth, map_location="cpu", weights_only=True, mmap=True).get("dcp")
                except Exception:
                    continue
                if found:
                    self.dcp_files[pth.name] = found
        files = self.dcp_files
        if "last.pth" in names and "last.pth" in files:
            files["previous.pth"] = files["last.pth"]
        for name in names:
            if dcp is None:
                files.pop(name, None)
            else:
                files[name] = dcp
        for name in [n for n in files if n.startswith("top_epoch_") and n not in keep_top]:
            del files[name]
        return set(files.values())

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.raw_model.state_dict()  # references: the writer's snapshot copies them

    def _save_sharded(self) -> ShardWrite:
        """Start writing the model and optimizer shards through torch.distributed.checkpoint (loadable
        at any world size) into `.dcp_step_<step>.tmp`; returns once this rank's shards are copied.

        `dcp.async_save` stages before it returns: its default stager deep-copies every tensor into
        new CPU storage (torch/distributed/checkpoint/staging.py, DefaultStager), so training may
        change the weights at once. A thread of DCP's then writes the copy. Every rank calls `wait`
        before its next save and at the end; on rank 0 the writer thread waits first, then renames
        the folder and only then writes the .pth files that point to it (`ShardWrite.publish`).
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"dcp_step_{self.progress.global_step:08d}"
        tmp = self.ckpt_dir / f".{name}.tmp"
        if self.ctx.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        dist_utils.barrier()  # every rank waited for its previous write, and the folder is fresh
        if self.shard_group is None:
            # DCP's thread runs collectives (plans gathered to rank 0, results back) while training
            # runs its own: on the default group the two streams would reach each rank in a
            # different order and mismatch (a hang or mixed-up data). Gloo: DCP's object
            # collectives need a CPU backend, and the default group is NCCL on GPUs.
            minutes = self.timeout_minutes  # not gloo's default 30 minutes
            self.shard_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes))
        msd, osd = get_state_dict(self.raw_model, self.optimizer)
        future = dcp.async_save(
            {"model": msd, "optimizer": osd}, checkpoint_id=str(tmp), process_group=self.shard_group
        )
        return ShardWrite(future, tmp, self.ckpt_dir / name)

    # ------------------------------------------------------------------ loading
    def resume(self, state: dict[str, Any] | None) -> tuple[int, bool]:
        """Load `state` (None: a fresh run); (the epoch to train up to, whether a training state was restored).

        A re-run of a finished run, or of one early stopping ended while `epoch` did not grow, trains nothing.
        """
        st, epochs = self.progress, self.epochs
        if state is not None:
            self.load(state)
        restored = state is not None and not state.get("weights_only")
        end = epochs
        if restored and (st.epoch >= epochs or (st.early_stopped and epochs <= st.planned_epochs)):
            how = "early stopping ended it at" if st.early_stopped and st.epoch < epochs else "it has trained"
            log.info(
                "nothing left to train: %s epoch %d of epoch=%d; to train it longer: %s epoch=<more than %d>",
                how, st.epoch, epochs, resume_command(self.run_dir), max(epochs, st.epoch),
            )  # fmt: skip
            end = st.epoch
        elif st.early_stopped:  # `epoch` grew: train on
            st.early_stopped = False
        st.planned_epochs = epochs
        return end, restored

    def load(self, state: dict[str, Any]) -> None:
        """Weights, optimizer, schedule (re-planned if `epoch` changed), scaler, EMA, progress, RNG of this rank."""
        if state.get("weights_only"):  # checkpoint.weights_only_resume: a new run from these weights
            self._load_model_weights(state["model"], strict=False)
            log.info("warm start from weights only: optimizer, schedule and progress start fresh")
            return
        plan = self._replan_schedule(state)  # before the optimizer's saved lr replaces the configured one
        if self.ctx.strategy == "fsdp" and state.get("dcp"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(self.raw_model, self.optimizer)
            sd = {"model": msd, "optimizer": osd}
            dcp.load(sd, checkpoint_id=str(self.ckpt_dir / state["dcp"]))
            set_state_dict(
                self.raw_model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"]
            )
        else:
            if self.ctx.strategy == "fsdp":
                raise RunError(
                    "this checkpoint has no sharded (DCP) state; resume it without distributed.strategy=fsdp"
                )
            # With EMA, "model" is the average and "raw_model" the weights training continues from.
            self._load_model_weights(state.get("raw_model", state["model"]), strict=True)
            if "optimizer" not in state:
                raise RunError(
                    "this checkpoint was written by an FSDP run; resume it with distributed.strategy=fsdp"
                )
            self.optimizer.load_state_dict(state["optimizer"])
        if plan is not None and self.schedule is not None:
            lrs = self.schedule.apply_plan(plan)
            log.info(self.schedule.replan_line(state["progress"]["planned_epochs"], self.epochs, *lrs))
        elif self.schedule is not None and state.get("scheduler") is not None:
            self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state.get("privacy"))
        self.progress.restore(state["progress"])
        rng = state.get("rng") or []
        if self.ctx.rank < len(rng):
            restore_rng(rng[self.ctx.rank])
        self.tracking_state = state.get("tracking")
        self.dcp_files = state.get("dcp_files")
        train_weights(self.optimizer, state.get("schedule_free_train"))
        log.info("resumed at epoch %d, step %d", self.progress.epoch + 1, self.progress.global_step)

    def _replan_schedule(self, state: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
        if self.schedule is None:
            return None
        old = int(state["progress"].get("planned_epochs") or 0)
        return replan(self.schedule, state.get("scheduler"), old, self.epochs)

    def _load_model_weights(self, weights: dict[str, torch.Tensor], strict: bool) -> None:
        mismatch = describe_mismatch(self.raw_model, weights)
        if mismatch and strict:
            raise RunError(f"the checkpoint does not fit model '{self.model_name}': {mismatch}")
        result = self.raw_model.load_state_dict(weights, strict=False)
        if mismatch:
            log.warning("loaded weights with differences: %s (missing=%d, unexpected=%d)", mismatch,
                        len(result.missing_keys), len(result.unexpected_keys))  # fmt: skip


@dataclass
class ShardWrite:
    """One rank's DCP write in flight (FSDP): its future, its temporary folder, the folder's final name."""

    future: Future
    tmp: Path
    final: Path

    def wait(self) -> None:
        """Block until the folder is complete; a failure, on any rank, as one line.

        DCP's future ends on every rank only after rank 0, the coordinator, gathered every rank's
        write results and wrote `.metadata` (`_DistWrapper.all_reduce` in state_dict_saver.py:
        gather, `finish_checkpoint` on rank 0, then broadcast): once it is done the folder is whole.
        """
        try:
            self.future.result()
        except BaseException as err:  # DCP's CheckpointException: a traceback for each failed rank
            failures = getattr(err, "failures", None) or {}
            first = next(iter(failures.values()), (err, None))[0]
            reason = (str(first).strip().splitlines() or [""])[0]
            raise RunError(
                f"writing checkpoint shards {self.tmp} failed: {type(first).__name__}: {reason}"
            ) from err

    def publish(self) -> None:
        """Rank 0, on the checkpoint writer's thread: the complete folder gets its name before any .pth names it."""
        self.wait()
        if self.final.exists():  # a second save at the same step
            shutil.rmtree(self.final)
        self.tmp.replace(self.final)


def load_pretrained_weights(model: torch.nn.Module, path: str | Path) -> None:
    """model.pretrained_weight: the tensors that fit, from a checkpoint or a plain state dict, before wrapping."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"weights file not found: {path}")
    state = safe_load(path)
    weights = state.get("model", state)
    own = model.state_dict()
    fitting = {k: v for k, v in weights.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    mismatch = describe_mismatch(model, weights)
    model.load_state_dict(fitting, strict=False)
    (log.warning if mismatch else log.info)(
        "loaded %d/%d tensors from %s%s", len(fitting), len(own), path, f" ({mismatch})" if mismatch else ""
    )


def find_resume_state(
    run_dir: Path, tidy: bool = False, problems: list[str] | None = None
) -> dict[str, Any] | None:
    """The newest checkpoint that loads; `tidy` (the resuming writer only) then drops unfinished writes.

    `problems`: collects why each checkpoint did not load instead of logging it, for a caller that
    refuses to go on when none loads (see `newest_valid_checkpoint`).
    """
    found = newest_valid_checkpoint(run_dir / "checkpoints", problems)
    if found is None:
        return None
    if tidy:
        remove_partial_writes(run_dir / "checkpoints")
    path, state = found
    if path.name != "last.pth":
        log.warning("resuming from %s (last.pth is missing or damaged)", path.name)
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with one clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        folder = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist either)"
        raise RunError(f"checkpoint not found: {path}{folder}")
    state = safe_load(path)
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path} is not a checkpoint of this template (no 'model' entry)")
    return state


def safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain data only, so a file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file, refused object
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if refused:
            raise RunError(
                f"{path} was refused: it holds a Python object ({refused.group(1)}), not only tensors and "
                "plain data, and loading it could run code; load checkpoints written by this template"
            ) from None
        raise RunError(
            f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(err).__name__}); "
            "use another checkpoint (previous.pth, best.pth) or rerun"
        ) from None


def remove_partial_writes(folder: Path) -> None:
    """Delete what a save cut short left behind (its temporary file, staged links, a DCP folder not
    yet renamed); never a checkpoint."""
    for path in [*folder.glob(".tmp-*.pth"), *folder.glob(".*.pth.*.link"), *folder.glob(".dcp_step_*.tmp")]:
        log.warning("removing %s, left by a checkpoint write that did not finish", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def newest_valid_checkpoint(
    folder: Path, problems: list[str] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The most recent checkpoint in `folder` that loads; damaged newer ones are skipped with a warning.

    `problems`: given, the warnings wait until one loads (and go into the list either way), so a
    caller that refuses a folder where none loads says it in its one line.
    """
    if not folder.is_dir():
        return None
    files = [p for p in folder.glob("*.pth") if not p.name.startswith(".")]
    order = {"last.pth": 0, "previous.pth": 1}
    files.sort(key=lambda p: (-_progress_key(p), order.get(p.name, 2), p.name))
    failed: list[str] = []
    for path in files:
        try:
            state = load_checkpoint(path)
        except RunError as err:
            failed.append(str(err))
            if problems is None:
                log.warning("%s; trying an older checkpoint", err)
            continue
        if "progress" in state:
            if problems is not None:
                for text in failed:
                    log.warning("%s; trying an older checkpoint", text)
            return path, state
        failed.append(f"{path} holds weights only")
    if problems is not None:
        problems.extend(failed)
    return None


def _progress_key(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def describe_mismatch(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 5) -> str:
    """A short summary of keys and shapes that differ between a model and a state dict."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
