"""The training loop. Read `Trainer.fit` top to bottom: set-up, resume, epochs of steps, validation, saving.

Per step: batch to device, autocast forward, loss scaled by the window's share of samples, backward
(gradient sync only on the window's last micro-batch), unscale + clip, optimizer and scheduler step.
The loss stays on the device; it is read every `logging.log_frequency` steps, the only host syncs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.swa_utils import AveragedModel

from src.data.workers import DataWaitWatch
from src.engine import distributed as dist_utils
from src.engine.batchnorm import RECOMPUTE_BATCHES, batchnorm_layers, recompute_batchnorm, recompute_loader
from src.engine.build import (
    build_evaluator,
    build_loss,
    build_model,
    build_split,
    build_transforms,
    check_output_size,
    num_classes_of,
    require_num_classes,
)
from src.engine.checkpoint import (
    NoRoomError,
    atomic_save,
    capture_rng,
    describe_mismatch,
    load_checkpoint,
    newest_valid_checkpoint,
    publish,
    remove_partial_writes,
    restore_rng,
    safe_load,
)
from src.engine.distillation import build_distiller
from src.engine.distributed import DistContext
from src.engine.evaluate import batch_size, evaluate, split_batch, to_device, total_loss
from src.engine.loss_parts import add_parts, part_metrics, summed_parts
from src.engine.parallel import prepare_model
from src.engine.precision import configure_backends, peak_flops, resolve_precision, train_flops_per_sample
from src.engine.privacy import build_privacy
from src.engine.run_dir import resume_command, save_config
from src.engine.signals import StopRequest
from src.engine.throughput import RateWindow
from src.errors import ConfigError, RunError
from src.models.freezing import UnfreezeStage, plan_unfreezing
from src.optim import build_optimizer, build_scheduler, is_schedule_free, set_optimizer_mode
from src.optim.param_groups import add_group, mark_base_lrs
from src.optim.schedulers import replan
from src.tracking.console import plural

log = logging.getLogger("template")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a resume continues from exactly here."""

    epoch: int = 0  # the epoch in progress, counted from 0
    batches_done: int = 0  # batches of that epoch already trained (always a whole accumulation window)
    global_step: int = 0  # optimizer steps so far
    epoch_loss_sum: float = 0.0  # this epoch's summed train loss over the batches done
    epoch_samples: int = 0
    window_loss_sum: float = 0.0  # the unlogged part of the current logging window, summed over ranks
    window_samples: int = 0
    window_parts: dict[str, float] = field(default_factory=dict)  # a dict loss's parts in that window
    best_value: float | None = None
    best_epoch: int = 0
    top_k: list[list[Any]] = field(default_factory=list)  # [value, file name], best first
    stale_epochs: int = 0  # early stopping: validations without improvement
    stale_best: float | None = None
    finished: bool = False
    planned_epochs: int = 0  # the `epoch` the schedule was planned for (a change re-plans it on resume)
    early_stopped: bool = False  # early stopping ended the run: a re-run trains on only if `epoch` grows


class Trainer:
    def __init__(
        self, cfg: DictConfig, ctx: DistContext, run_dir: Path, resume: dict[str, Any] | None
    ) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.resume_state = resume
        self.state = TrainState()
        self.stop = StopRequest()
        self.trackers: Any = None
        self.tracking_active = False
        self.window_parts: dict[str, torch.Tensor] = {}
        self.data_wait = DataWaitWatch()  # warns when the loop keeps waiting for batches
        self.privacy: Any = None  # training.privacy (src/engine/privacy.py), set in fit

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        cfg, ctx = self.cfg, self.ctx
        debug = bool(cfg.debug)
        epochs = 2 if debug else int(cfg.epoch)
        accumulate = int(cfg.training.accumulate_grad_batches)
        clip = float(cfg.training.gradient_clip_norm)
        log_every = int(cfg.logging.log_frequency)
        channels_last = bool(cfg.model.get("channels_last", False))
        # Read once: a config lookup costs microseconds, and the loop below runs per batch.
        nan_skip = cfg.training.nan_policy == "skip"
        save_every = int(cfg.checkpoint.save_every_n_steps)
        distributed = ctx.distributed

        # --- data, model, loss, optimizer, schedule (same seed on every rank: identical initial weights)
        seed_everything(int(cfg.seed))
        configure_backends(cfg.gpu)
        precision = resolve_precision(cfg.gpu, ctx.device)
        transforms = build_transforms(cfg)
        train = build_split(cfg, "train", ctx, shuffle=True, transforms=transforms)
        val = (
            build_split(cfg, "val", ctx, shuffle=False, transforms=transforms)
            if cfg.evaluation.frequency
            else None
        )
        num_classes = num_classes_of(cfg, train.dataset)
        require_num_classes(cfg, num_classes)
        privacy = self.privacy = build_privacy(cfg, len(train.dataset), precision.name)  # privacy hook
        if privacy is not None:  # privacy hook: Poisson batches
            train = privacy.poisson_split(train)
        model = build_model(cfg, num_classes)
        if privacy is not None:  # privacy hook: refuse layers Opacus cannot train (BatchNorm)
            privacy.check_model(model)
        model.to(ctx.device)
        check_output_size(cfg, model, train.dataset, num_classes, ctx.device)
        self._warm_start(model)
        stages = plan_unfreezing(model, cfg.training)  # freezes what unfreezes later
        if stages and ctx.strategy in ("ddp", "fsdp"):
            raise ConfigError(
                f"training.unfreeze / freeze_backbone_epochs cannot add parameters to a {ctx.strategy} model "
                "mid-run; train on one process, or freeze with model.freeze only"
            )
        model, raw = prepare_model(model, cfg, ctx)
        if privacy is not None:  # privacy hook: per-sample gradients (raw stays the plain model)
            model = privacy.wrap_model(model)
        self.model, self.raw = model, raw
        loss_fn = build_loss(cfg)
        distiller = build_distiller(cfg, loss_fn, num_classes, ctx.device)  # None without a teacher
        evaluator_job: concurrent.futures.Future | None = None  # started with the first batch, see below
        optimizer = build_optimizer(fused_on_cuda(cfg.optimizer, ctx.device), raw)
        batches_per_epoch = 1 if debug else len(train.loader)
        steps_per_epoch = math.ceil(batches_per_epoch / accumulate)
        schedule = build_scheduler(
            cfg.lr_scheduler, optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs
        )
        if privacy is not None:  # privacy hook: clip per sample, add noise, count steps
            optimizer = privacy.wrap_optimizer(optimizer)
        scaler = precision.grad_scaler()
        ema = self._build_ema(raw)
        self.optimizer, self.schedule, self.scaler, self.ema = optimizer, schedule, scaler, ema
        self.epochs = epochs
        params = [p for p in raw.parameters() if p.requires_grad]
        # Schedule-free with BatchNorm: statistics are recomputed for the evaluated weights each epoch.
        bn_loader = None
        if ema is None and is_schedule_free(optimizer) and batchnorm_layers(raw):
            bn_loader = recompute_loader(train.dataset, cfg, ctx)
            log.info(
                "schedule-free optimizer with BatchNorm: the statistics are recomputed for the evaluated "
                "weights on up to %d train batches before each validation and epoch checkpoint",
                1 if debug else RECOMPUTE_BATCHES,
            )
        if stages:  # a resumed run re-adds the groups it had, so the optimizer state fits them
            mark_base_lrs(optimizer)
            progress = (self.resume_state or {}).get("progress") or {}
            params = self._unfreeze(stages, int(progress.get("epoch", 0)))

        # --- resume: weights, optimizer, schedule, scaler, EMA, position, RNG of every rank
        if self.resume_state is not None:
            self._load_state(self.resume_state)
        restored = self.resume_state is not None and not self.resume_state.get("weights_only")
        st, end = self.state, epochs
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
        seed_per_rank(int(cfg.seed), ctx.rank, resumed=restored)
        self.trackers = self._start_trackers()
        self.stop.install(cfg.training.stop_signals)
        global_batch = int(cfg.batch) * ctx.world_size * accumulate
        log.info(
            "training %s on %s: %d process(es), %s precision, batch %d per process, %d global (x%d accumulation), "
            "%s per epoch, %s",
            cfg.model.name, ctx.device, ctx.world_size, precision.label, cfg.batch, global_batch, accumulate,
            plural(steps_per_epoch, "step"), plural(epochs, "epoch"),
        )  # fmt: skip
        # MFU on a GPU whose peak is known: the FLOPs of a training step are counted once, here.
        self.peak_flops = peak_flops(ctx.device)
        self.flops_per_sample = (
            train_flops_per_sample(
                lambda: build_model(cfg, num_classes), train.dataset[0], int(cfg.batch), loss_fn
            )
            if self.peak_flops
            else None
        )
        profiler = self._start_profiler()
        self.step_lr = step_lr(optimizer)  # the lr of the last optimizer step, as logged
        rates = RateWindow(log_every)  # an epoch's short last window is timed together with the next

        for epoch in range(st.epoch, end):
            st.epoch = epoch
            if stages:
                params = self._unfreeze(stages, epoch)
            train.sampler.set_epoch(epoch)
            # min(): a state saved after an epoch's short last batch (older versions) is still resumable.
            train.sampler.set_start(
                min(st.batches_done * int(cfg.batch) * ctx.world_size, train.sampler.total)
            )
            if train.generator is not None:
                train.generator.manual_seed(int(cfg.seed) + epoch)
            model.train()
            set_optimizer_mode(optimizer, True)
            sizes = rank_batch_sizes(
                len(train.sampler) + st.batches_done * int(cfg.batch),
                int(cfg.batch),
                cfg.dataloader.drop_last,
            )
            n_batches = 1 if debug else len(sizes)
            # A resumed run continues the logging window the checkpoint was saved in (rank 0 holds the sum).
            carried = ctx.is_main and st.batches_done > 0
            window_loss = torch.full(
                (), st.window_loss_sum if carried else 0.0, device=ctx.device, dtype=torch.float64
            )
            window_samples = st.window_samples if carried else 0
            parts = self.window_parts = {  # a dict loss's named parts, summed like window_loss
                k: torch.tensor(v, device=ctx.device, dtype=torch.float64) for k, v in st.window_parts.items()
            } if carried else {}  # fmt: skip
            # The current accumulation window's losses, added to the logging window once its step is taken
            # (nan_policy=skip drops this step's losses only, not the logging window's good steps).
            step_loss = torch.zeros_like(window_loss)
            step_samples = 0
            step_parts: dict[str, torch.Tensor] = {}
            self.carried_samples = window_samples  # trained by the process that saved: not timed here
            window_steps, window_start = 0, time.perf_counter()
            data_wait = 0.0
            grad_norm: torch.Tensor | None = None
            bar = self._progress(n_batches - st.batches_done, f"epoch {epoch + 1}/{epochs}")
            if evaluator_job is not None and train.loader.num_workers:
                evaluator_job.result()  # never fork loader workers while another thread imports
            batches = iter(train.loader)
            if evaluator_job is None and val is not None:
                # torchmetrics takes seconds to import: build the evaluator beside the first steps
                # (but not inside a profile, where a traced import would swamp the trace).
                evaluator_job = in_background(build_evaluator, cfg, num_classes)
                if profiler is not None:
                    evaluator_job.result()
            i = st.batches_done
            while i < n_batches:
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                data_wait += time.perf_counter() - t0
                inputs, targets = split_batch(batch)
                inputs = to_device(inputs, ctx.device, channels_last)
                targets = to_device(targets, ctx.device)
                n = batch_size(targets)
                first = (i // accumulate) * accumulate
                last = min(first + accumulate, n_batches)
                window_total = n if privacy is not None else sum(sizes[first:last])  # privacy hook: mean loss
                sync = i + 1 == last
                with self._grad_sync(sync), precision.autocast():
                    outputs = model(inputs)
                    if distiller is None:
                        value = loss_fn(outputs, targets)
                    else:  # the teacher runs on the same inputs under the same autocast
                        value = distiller(inputs, outputs, targets)
                    loss = total_loss(value)
                # Normalise by the samples in the whole window, so a short last window counts right.
                scaler.scale(loss if n == window_total else loss * (n / window_total)).backward()
                step_loss.add_(loss.detach(), alpha=n)
                if isinstance(value, dict):
                    add_parts(step_parts, value, n)
                step_samples += n
                i += 1
                bar.update(1)
                if not sync:
                    continue

                # --- optimizer step (end of an accumulation window)
                # A sync, only with nan_policy=skip; the whole window (every micro-batch) on every rank decides.
                if nan_skip and dist_utils.any_rank(not bool(torch.isfinite(step_loss)), ctx.device):
                    log.warning(
                        "non-finite loss at epoch %d step %d: step skipped", epoch + 1, st.global_step
                    )
                    optimizer.zero_grad(set_to_none=True)
                    step_loss.zero_()
                    step_parts.clear()
                    step_samples = 0
                    st.batches_done = i
                    continue
                window_loss.add_(step_loss)
                window_samples += step_samples
                for name, part in step_parts.items():
                    parts[name] = parts[name] + part if name in parts else part
                step_loss.zero_()
                step_samples = 0
                step_parts = {}
                if clip > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(raw)
                self.step_lr = step_lr(optimizer)  # read before the schedule moves it on
                if schedule is not None and schedule.interval == "step":
                    schedule.step()
                st.global_step += 1
                st.batches_done = i
                window_steps += 1
                if profiler is not None:
                    profiler.step()

                # --- log (the only host-device sync of a training step), agree on stopping
                if st.global_step % log_every == 0:
                    metrics = self._window_metrics(
                        window_loss, window_samples, window_steps, window_start, data_wait, grad_norm
                    )
                    metrics = rates.settle(metrics, window_steps, short_ok=True)
                    self._log(metrics, bar)
                    if evaluator_job is not None and evaluator_job.done():
                        evaluator_job.result()  # a bad evaluator setting stops the run now, not at validation
                    window_loss = torch.zeros_like(window_loss)
                    parts.clear()
                    window_samples, window_steps, window_start, data_wait = 0, 0, time.perf_counter(), 0.0
                    stop = dist_utils.any_rank(self.stop.requested, ctx.device)
                elif distributed:
                    stop = False  # ranks agree at log steps only, so no collective on other steps
                else:
                    stop = self.stop.requested
                if stop and i < n_batches:
                    self._save(
                        [], f"{self.stop.signal_name or 'stop request'}", (window_loss, window_samples)
                    )
                    bar.close()
                    return self._preempted()
                if save_every and st.global_step % save_every == 0 and i < n_batches:
                    self._save([], f"step {st.global_step}", (window_loss, window_samples))
            bar.close()
            if window_samples:  # the epoch's last, partial logging window
                metrics = self._window_metrics(
                    window_loss, window_samples, window_steps, window_start, data_wait, grad_norm
                )
                metrics = rates.settle(metrics, window_steps, short_ok=False)
            else:
                metrics = {}

            # --- validation, schedule, best model, early stopping, checkpoints
            metrics.update(self._epoch_train_loss())
            if bn_loader is not None:
                if evaluator_job is not None and bn_loader.num_workers:
                    evaluator_job.result()  # never fork loader workers while another thread imports
                kept = self._eval_weights()
                recompute_batchnorm(raw, bn_loader, 1 if debug else RECOMPUTE_BATCHES, ctx.device, precision,
                                    channels_last, ctx.world_size)  # fmt: skip
                self._train_weights(kept)
            freq = int(cfg.evaluation.frequency)
            if val is not None and freq and ((epoch + 1) % freq == 0 or epoch + 1 == epochs):
                kept = self._eval_weights()
                eval_model = ema.module if ema is not None else model
                assert evaluator_job is not None
                evaluator = evaluator_job.result()
                self._activate_user_tracking()
                val_bar = self._progress(1 if debug else len(val.loader), f"val {epoch + 1}/{epochs}")
                metrics.update(
                    evaluate(eval_model, val.loader, val.sampler.num_valid, loss_fn, evaluator, precision, ctx.device,
                             "val", channels_last, max_batches=1 if debug else None, bar=val_bar)
                )  # fmt: skip
                val_bar.close()
                self._train_weights(kept)
            if schedule is not None and schedule.interval == "epoch":
                schedule.step(metrics.get(str(cfg.checkpoint.monitor)) if schedule.needs_metric else None)
            if privacy is not None:  # privacy hook: epsilon spent so far
                metrics.update(privacy.end_epoch(epoch))
            self._log(metrics, None)
            st.epoch, st.batches_done = epoch + 1, 0
            st.epoch_loss_sum, st.epoch_samples = 0.0, 0
            names = self._checkpoint_names(epoch, metrics)
            stop_early = self._early_stopping(metrics)
            st.early_stopped = stop_early
            self._save(extra_names=names, reason=f"epoch {epoch + 1}")
            if stop_early:
                log.info(
                    "early stopping: %s did not improve for %d validation(s)",
                    cfg.training.early_stopping.monitor,
                    st.stale_epochs,
                )
                break
            if dist_utils.any_rank(self.stop.requested, ctx.device):
                return self._preempted()
        if profiler is not None:
            profiler.stop()
        self._activate_user_tracking()  # the test split's evaluator runs next
        st.finished = True
        return st

    # ------------------------------------------------------------------ steps in detail
    def _unfreeze(self, stages: list[UnfreezeStage], epoch: int) -> list[nn.Parameter]:
        """Let the stages due by `epoch` train, each as a new optimizer group; returns the trainable parameters."""
        named = dict(self.raw.named_parameters())
        for stage in stages:
            if stage.epoch <= epoch and not named[stage.names[0]].requires_grad:
                new = [named[n].requires_grad_(True) for n in stage.names]
                add_group(self.optimizer, self.schedule, new, stage.lr_scale)
                log.info("epoch %d: unfroze %d parameter tensors (%s ...) at lr x %g",
                         epoch + 1, len(new), stage.names[0], stage.lr_scale)  # fmt: skip
        return [p for p in self.raw.parameters() if p.requires_grad]

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on micro-batches that are not the last of their window."""
        if sync:
            if hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def _window_metrics(
        self, loss_sum: torch.Tensor, samples: int, steps: int, start: float, data_wait: float, grad_norm: Any
    ) -> dict[str, float]:
        totals = torch.stack(
            [loss_sum, torch.tensor(float(samples), device=loss_sum.device, dtype=torch.float64)]
        )
        if self.ctx.distributed:
            totals = totals.to(self.ctx.device if self.ctx.device.type == "cuda" else "cpu")
            dist_utils.all_reduce_sum(totals)
        loss_total, sample_total = totals.tolist()
        self.state.epoch_loss_sum += loss_total
        self.state.epoch_samples += int(sample_total)
        elapsed = max(time.perf_counter() - start, 1e-9)
        carried, self.carried_samples = getattr(self, "carried_samples", 0), 0
        timed = sample_total - carried  # throughput counts only what this process trained in `elapsed`
        loss = loss_total / max(sample_total, 1)
        if not math.isfinite(loss):
            raise self._non_finite(loss)
        metrics = {
            "train_loss": loss,
            **part_metrics(self.window_parts, sample_total, "train"),
            "lr": self.step_lr,
            "samples_per_sec": timed / elapsed,
            "step_time": elapsed / max(steps, 1),
            "data_wait_share": min(1.0, data_wait / elapsed),
        }
        if grad_norm is not None:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            metrics["grad_norm"] = float(norm)
        if self.ctx.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
        if self.flops_per_sample and self.peak_flops:  # this rank's samples on this rank's GPU
            metrics["mfu"] = self.flops_per_sample * max(samples - carried, 0) / elapsed / self.peak_flops
        return metrics

    def _non_finite(self, loss: float) -> RunError:
        kept = (
            f"the last good checkpoint is kept in {self.ckpt_dir}"
            if (self.ckpt_dir / "last.pth").exists()
            else "no checkpoint had been saved yet"
        )
        return RunError(
            f"the training loss became {loss} at epoch {self.state.epoch + 1}, step {self.state.global_step}; "
            f"{kept}; lower optimizer.lr, set training.gradient_clip_norm, or training.nan_policy=skip"
        )

    def _epoch_train_loss(self) -> dict[str, float]:
        st = self.state
        return {"train_epoch_loss": st.epoch_loss_sum / st.epoch_samples} if st.epoch_samples else {}

    def _log(self, metrics: dict[str, float], bar: Any) -> None:
        if not metrics:
            return
        st = self.state
        if bar is not None and "train_loss" in metrics:
            shown = {
                "loss": metrics["train_loss"],
                "lr": metrics["lr"],
                "samples/s": metrics["samples_per_sec"],
            }
            bar.update(0, **shown)
        if self.trackers is not None:
            self.trackers.log_metrics(metrics, step=st.global_step, epoch=st.epoch + 1)
        if self.ctx.is_main:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("epoch %d step %d: %s", st.epoch + 1, st.global_step, shown)
            if advice := self.data_wait.observe(metrics):
                log.warning(advice)

    def _progress(self, total: int, desc: str) -> Any:
        from src.tracking import Progress

        # A bar on a terminal only: piped output and train.log get the plain log lines instead.
        enabled = self.ctx.is_main and bool(self.cfg.logging.progress_bar) and sys.stderr.isatty()
        return Progress(
            total=total, desc=desc, enabled=enabled, every=max(1, int(self.cfg.logging.log_frequency))
        )

    def _build_ema(self, raw: nn.Module) -> WeightEMA | None:
        value = self.cfg.model.get("ema", 0.0) or 0.0
        try:
            decay = float(value)
        except (TypeError, ValueError):
            decay = -1.0
        if not 0 <= decay < 1:
            raise ConfigError(f"model.ema must be a decay in [0, 1), e.g. 0.999 (0 = off), got {value!r}")
        if decay == 0:
            return None
        if self.ctx.strategy == "fsdp":
            raise ConfigError("model.ema is not supported with distributed.strategy=fsdp; set model.ema=0")
        return WeightEMA(raw, decay)

    def _start_profiler(self) -> Any:
        p = self.cfg.profiling
        if not p.enabled or not self.ctx.is_main:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if self.ctx.device.type == "cuda" else []
        )
        prof = profile(
            activities=activities,
            schedule=schedule(wait=int(p.wait), warmup=int(p.warmup), active=int(p.active), repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile")),
            profile_memory=bool(p.profile_memory),
            record_shapes=bool(p.record_shapes),
            with_stack=bool(p.with_stack),
        )
        prof.start()
        log.info(
            "profiling steps %d..%d into %s",
            p.wait + p.warmup,
            p.wait + p.warmup + p.active,
            self.run_dir / "profile",
        )
        return prof

    # ------------------------------------------------------------------ best model and early stopping
    def _improved(self, value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
        if best is None:
            return True
        return value < best - min_delta if mode == "min" else value > best + min_delta

    def _checkpoint_names(self, epoch: int, metrics: dict[str, float]) -> list[str]:
        """Extra names this epoch's checkpoint gets: best.pth, a top-k file, a periodic epoch file."""
        cfg, st = self.cfg.checkpoint, self.state
        names: list[str] = []
        freq = int(cfg.save_frequency)
        if freq and (epoch + 1) % freq == 0:
            names.append(f"epoch_{epoch + 1:04d}.pth")
        value = metrics.get(str(cfg.monitor))
        if value is None:
            if not self.state.best_epoch and cfg.save_best and int(self.cfg.evaluation.frequency) == 0:
                names.append("best.pth")  # never validated: the latest weights are the best we know
            return names
        if self._improved(value, st.best_value, cfg.mode):
            st.best_value, st.best_epoch = value, epoch + 1
            if cfg.save_best:
                names.append("best.pth")
        k = int(cfg.save_top_k)
        if k > 1:
            name = f"top_epoch_{epoch + 1:04d}.pth"
            ranked = sorted([*st.top_k, [value, name]], key=lambda t: t[0], reverse=cfg.mode == "max")
            st.top_k = ranked[:k]
            if [value, name] in st.top_k:
                names.append(name)
        return names

    def _early_stopping(self, metrics: dict[str, float]) -> bool:
        es, st = self.cfg.training.early_stopping, self.state
        value = metrics.get(str(es.monitor))
        if not es.patience or value is None:
            return False
        if self._improved(value, st.stale_best, es.mode, float(es.min_delta)):
            st.stale_best, st.stale_epochs = value, 0
            return False
        st.stale_epochs += 1
        return st.stale_epochs >= int(es.patience)

    # ------------------------------------------------------------------ checkpoints
    def _save(
        self, extra_names: list[str], reason: str, window: tuple[torch.Tensor, int] | None = None
    ) -> None:
        """Write last.pth (+ extra names) on rank 0; under FSDP also the sharded DCP folder."""
        cfg, ctx, st = self.cfg, self.ctx, self.state
        st.window_loss_sum, st.window_samples, st.window_parts = 0.0, 0, {}
        if window is not None:  # mid-epoch: keep the unlogged losses so the resumed log window is whole
            totals = torch.stack(
                [
                    window[0].double(),
                    torch.tensor(float(window[1]), dtype=torch.float64, device=window[0].device),
                ]
            )
            if ctx.distributed:
                totals = totals.to(ctx.device if ctx.device.type == "cuda" else "cpu")
                dist_utils.all_reduce_sum(totals)
            st.window_loss_sum, st.window_samples = totals[0].item(), int(totals[1].item())
            st.window_parts = summed_parts(self.window_parts)
            if not math.isfinite(st.window_loss_sum):  # weights a NaN touched never replace last.pth
                raise self._non_finite(st.window_loss_sum)
        kept = self._eval_weights()  # schedule-free: save the evaluation weights
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
            "batch": int(cfg.batch),
        }
        if self.privacy is not None:  # privacy hook: the accountant's history
            state["privacy"] = self.privacy.state_dict()
        if ctx.strategy == "fsdp":
            state["dcp"] = self._save_sharded()
        else:
            state["optimizer"] = self.optimizer.state_dict()
            if kept is not None:  # and the training weights, bit for bit, for an exact resume
                state["schedule_free_train"] = [t.detach().cpu() for t in kept]
        if self.ema is not None:  # "model" holds the weights the run reports; the trained ones resume
            state["raw_model"] = state["model"]
            state["model"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        if self.trackers is not None:
            state["tracking"] = self.trackers.state()
        if ctx.is_main:
            names = set(extra_names)
            if cfg.checkpoint.save_last or not names:
                last = self.ckpt_dir / "last.pth"
                if last.exists():  # keep the one before; last.pth itself never disappears
                    publish(last, self.ckpt_dir / "previous.pth")
                names.add("last.pth")
            try:
                atomic_save(state, [self.ckpt_dir / n for n in sorted(names)])
            except NoRoomError as err:
                raise NoRoomError(
                    f"{err}, then resume with: python train.py {self.run_dir / 'config.yaml'}"
                ) from None
            self._prune()
            if self.trackers is not None:
                self.trackers.commit()
            log.info("checkpoint saved (%s): %s", reason, ", ".join(sorted(names)))
        dist_utils.barrier()
        self._train_weights(kept)

    def _eval_weights(self) -> list[torch.Tensor] | None:
        """Schedule-free optimizers: switch to the evaluation weights, returning the training ones.

        Switching back recomputes the training weights in floating point, which is not exact; so
        `_train_weights` copies the kept ones back and evaluating or saving never changes training.
        """
        if not is_schedule_free(self.optimizer):
            return None
        kept = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
        set_optimizer_mode(self.optimizer, False)
        return kept

    def _train_weights(self, kept: list[torch.Tensor] | None) -> None:
        set_optimizer_mode(self.optimizer, True)
        if kept is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            with torch.no_grad():
                torch._foreach_copy_(params, [k.to(p.device) for p, k in zip(params, kept, strict=True)])

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}

    def _save_sharded(self) -> str:
        """Model and optimizer shards through torch.distributed.checkpoint, loadable at any world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"dcp_step_{self.state.global_step:08d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp"
        if self.ctx.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
        dist_utils.barrier()
        msd, osd = get_state_dict(self.raw, self.optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp))
        dist_utils.barrier()
        if self.ctx.is_main:
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
        dist_utils.barrier()
        return name

    def _prune(self) -> None:
        """Drop top-k files that fell out of the list and DCP folders no checkpoint points to."""
        keep = {name for _, name in self.state.top_k}
        for path in self.ckpt_dir.glob("top_epoch_*.pth"):
            if path.name not in keep:
                path.unlink()
        folders = list(self.ckpt_dir.glob("dcp_step_*"))
        if folders:
            import shutil

            used = set()
            for pth in self.ckpt_dir.glob("*.pth"):
                try:
                    used.add(torch.load(pth, map_location="cpu", weights_only=True, mmap=True).get("dcp"))
                except Exception:
                    continue
            for folder in folders:
                if folder.name not in used:
                    shutil.rmtree(folder, ignore_errors=True)

    def _load_state(self, state: dict[str, Any]) -> None:
        ctx = self.ctx
        if state.get("weights_only"):  # checkpoint.weights_only_resume: a new run from these weights
            self._load_model_weights(state["model"], strict=False)
            log.info("warm start from weights only: optimizer, schedule and progress start fresh")
            return
        plan = self._replan_schedule(state)  # before the optimizer's saved lr replaces the configured one
        if ctx.strategy == "fsdp" and state.get("dcp"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(self.raw, self.optimizer)
            sd = {"model": msd, "optimizer": osd}
            dcp.load(sd, checkpoint_id=str(self.ckpt_dir / state["dcp"]))
            set_state_dict(
                self.raw, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"]
            )
        else:
            if ctx.strategy == "fsdp":
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
            before, after = self.schedule.apply_plan(plan)
            log.info("schedule re-planned: %d -> %d epochs, lr %.6g -> %.6g (%s)",
                     state["progress"]["planned_epochs"], self.epochs, before, after, self.schedule.name)  # fmt: skip
        elif self.schedule is not None and state.get("scheduler") is not None:
            self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.privacy is not None:  # privacy hook: the accountant's history
            self.privacy.load_state_dict(state.get("privacy"))
        self.state = TrainState(**state["progress"])
        rng = state.get("rng") or []
        if ctx.rank < len(rng):
            restore_rng(rng[ctx.rank])
        self.tracking_state = state.get("tracking")
        self._train_weights(state.get("schedule_free_train"))
        log.info("resumed at epoch %d, step %d", self.state.epoch + 1, self.state.global_step)

    def _replan_schedule(self, state: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
        if self.schedule is None:
            return None
        old = int(state["progress"].get("planned_epochs") or 0)
        return replan(self.schedule, state.get("scheduler"), old, self.epochs)

    def _load_model_weights(self, weights: dict[str, torch.Tensor], strict: bool) -> None:
        mismatch = describe_mismatch(self.raw, weights)
        if mismatch and strict:
            raise RunError(f"the checkpoint does not fit model '{self.cfg.model.name}': {mismatch}")
        result = self.raw.load_state_dict(weights, strict=False)
        if mismatch:
            log.warning("loaded weights with differences: %s (missing=%d, unexpected=%d)", mismatch,
                        len(result.missing_keys), len(result.unexpected_keys))  # fmt: skip

    def _warm_start(self, model: nn.Module) -> None:
        """model.pretrained_weight: load only weights (a checkpoint or a plain state dict) before wrapping."""
        path = self.cfg.model.get("pretrained_weight")
        if not path:
            return
        state = load_checkpoint_or_weights(path)
        weights = state.get("model", state)
        own = model.state_dict()
        fitting = {k: v for k, v in weights.items() if k in own and getattr(v, "shape", None) == own[k].shape}
        mismatch = describe_mismatch(model, weights)
        model.load_state_dict(fitting, strict=False)
        (log.warning if mismatch else log.info)(
            "loaded %d/%d tensors from %s%s",
            len(fitting),
            len(own),
            path,
            f" ({mismatch})" if mismatch else "",
        )

    def _preempted(self) -> TrainState:
        self.state.finished = False
        log.warning("stopped by %s after step %d; resume with: %s",
                    self.stop.signal_name, self.state.global_step, resume_command(self.run_dir))  # fmt: skip
        return self.state

    # ------------------------------------------------------------------ tracking
    def _activate_user_tracking(self) -> None:
        """From here on user code may call mlflow.log_metric; the first call waits for the MLflow run."""
        if self.trackers is not None and not self.tracking_active:
            from src.engine.trackers import activate_mlflow

            activate_mlflow(self.trackers)
            self.tracking_active = True

    def _start_trackers(self) -> Any:
        if not self.ctx.is_main:
            return None
        from src.engine.trackers import start_trackers

        trackers = start_trackers(
            self.cfg, self.run_dir, getattr(self, "tracking_state", None), self.state.global_step
        )
        return trackers


class WeightEMA(AveragedModel):
    """Exponential moving average of the weights and float buffers, without host-device syncs.

    torch's AveragedModel reads its step counter on every update (a GPU sync per step); this one
    starts from the initial weights and each update is one fused lerp. Its state dict has
    AveragedModel's layout ("module.<name>", "n_averaged"), which the tester reads.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()],
                    strict=True)  # fmt: skip
        floats, counters = [], []
        for avg, new in pairs:
            (floats if avg.is_floating_point() else counters).append((avg, new.detach()))
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [n for _, n in floats], 1.0 - self.decay)
        for avg, new in counters:  # e.g. BatchNorm's num_batches_tracked: copied, not averaged
            avg.copy_(new)
        self.n_averaged += 1  # a CPU tensor: counting needs no sync


def fused_on_cuda(section: Any, device: torch.device) -> Any:
    """Adam, AdamW and SGD on CUDA use the fused kernel (one launch for all parameters, and fp16 loss
    scaling without a sync) unless the config chose an implementation itself."""
    if device.type != "cuda" or section.get("name") not in ("Adam", "AdamW", "SGD"):
        return section
    if any(key in section for key in ("fused", "foreach", "differentiable", "capturable")):
        return section
    log.info(
        "optimizer %s: fused CUDA kernel (set optimizer.fused=false to turn it off)", section.get("name")
    )
    return OmegaConf.merge(section, {"fused": True})


def in_background(fn: Any, *args: Any) -> concurrent.futures.Future:
    """Run `fn(*args)` on a worker thread; `.result()` waits for it and re-raises its error."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-build")
    job = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return job


def load_checkpoint_or_weights(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"weights file not found: {path}")
    return safe_load(path)


def step_lr(optimizer: torch.optim.Optimizer) -> Any:
    """The first group's lr now; a tensor lr (schedulers update those in place) is copied, without a sync."""
    lr = optimizer.param_groups[0]["lr"]
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr


def rank_batch_sizes(samples: int, batch: int, drop_last: bool) -> list[int]:
    """Sizes of the batches one rank sees in a whole epoch."""
    full, rest = divmod(samples, batch)
    return [batch] * full + ([rest] if rest and not drop_last else [])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_per_rank(seed: int, rank: int, resumed: bool) -> None:
    """After the identical model init, give each rank its own stream (dropout, augmentation)."""
    if not resumed and rank:
        seed_everything(seed + rank)


def find_resume_state(run_dir: Path, tidy: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint that loads; `tidy` (the resuming writer only) first drops unfinished writes."""
    if tidy and (run_dir / "checkpoints").is_dir():
        remove_partial_writes(run_dir / "checkpoints")
    found = newest_valid_checkpoint(run_dir / "checkpoints")
    if found is None:
        return None
    path, state = found
    if path.name != "last.pth":
        log.warning("resuming from %s (last.pth is missing or damaged)", path.name)
    return state


__all__ = ["TrainState", "Trainer", "find_resume_state", "load_checkpoint", "save_config"]
_ = OmegaConf
