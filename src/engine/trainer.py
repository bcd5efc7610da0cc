"""The training loop. Read `Trainer.fit` top to bottom: set-up, resume, then per epoch: train one
epoch, validate, step the schedule, checkpoint, stop?

Per step (`_train_step`, `_optimizer_step`): batch to device, autocast forward, loss scaled by the
accumulation window's share of samples, backward (gradient sync only on the window's last
micro-batch), unscale + clip, optimizer and scheduler step. Losses stay on the device in the
LogWindow, read every `logging.log_frequency` steps (the only host syncs); the Checkpointer writes
in the background.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from src.checkpoint.checkpointer import Checkpointer, load_pretrained_weights
from src.checkpoint.rng import seed_everything, seed_per_rank
from src.checkpoint.train_state import EarlyStopping, TrainState
from src.data.batch import batch_size, rank_batch_sizes, split_batch, to_device, total_loss
from src.data.transforms import split_transforms
from src.data.workers import DataWaitWatch
from src.distributed import process_group as dist_utils
from src.distributed.parallel import grad_sync, prepare_model
from src.distributed.process_group import DistContext
from src.engine.build import build_privacy, build_split, model_for, num_classes_of, require_num_classes
from src.engine.evaluate import evaluate
from src.engine.flops import peak_flops, train_flops_per_sample
from src.engine.log_window import LogWindow
from src.engine.loop_setup import fused_on_cuda, in_background, step_lr
from src.engine.precision import configure_backends, resolve_precision
from src.engine.signals import StopRequest
from src.errors import ConfigError
from src.evaluators import build_evaluator
from src.models import build_loss, check_output_size
from src.models.freezing import plan_unfreezing
from src.optim import build_optimizer, build_scheduler, is_schedule_free, set_optimizer_mode
from src.optim.param_groups import describe as describe_groups
from src.optim.param_groups import mark_base_lrs, unfreeze_due
from src.optim.schedule_free import evaluation_weights
from src.results.run_dir import resume_command
from src.techniques.batchnorm import (
    RECOMPUTE_BATCHES,
    batchnorm_layers,
    recompute_batchnorm,
    recompute_loader,
)
from src.techniques.distillation import build_distiller
from src.techniques.ema import build_ema
from src.tracking.console import plural
from src.tracking.profiler import start_profiler
from src.tracking.start import activate_mlflow, prestart_mlflow, start_trackers

log = logging.getLogger("template")


class Trainer:
    def __init__(
        self, cfg: DictConfig, ctx: DistContext, run_dir: Path, resume: dict[str, Any] | None
    ) -> None:
        self.cfg, self.ctx, self.run_dir, self.resume_state = cfg, ctx, run_dir, resume
        self.state = TrainState()  # shared with the Checkpointer, the LogWindow and early stopping
        self.stop = StopRequest()
        self.trackers: Any = None
        # Read once: a config lookup costs microseconds, and the loop runs per batch.
        self.debug = bool(cfg.debug)
        self.epochs = 2 if self.debug else int(cfg.epoch)
        self.accumulate = int(cfg.training.accumulate_grad_batches)
        self.clip = float(cfg.training.gradient_clip_norm)
        self.nan_skip = cfg.training.nan_policy == "skip"
        self.save_every = int(cfg.checkpoint.save_every_n_steps)
        self.log_every = int(cfg.logging.log_frequency)
        self.channels_last = bool(cfg.model.get("channels_last", False))
        # Built by `_build` (data, model, loss, optimizer) and `_start` (trackers, window, profiler).
        self.precision: Any = None
        self.train: Any = None  # the train split: dataset, sampler, loader, generator
        self.val: Any = None  # the val split, None without validation
        self.num_classes = 0
        self.model: Any = None  # what runs forward: DDP/FSDP-wrapped or compiled
        self.raw_model: Any = None  # the plain nn.Module whose state dict is saved
        self.loss_fn: Any = None
        self.distiller: Any = None  # None without a teacher
        self.privacy: Any = None  # training.privacy (src/techniques/privacy.py): Poisson batches, DP-SGD
        self.optimizer: Any = None
        self.schedule: Any = None  # None without lr_scheduler.name
        self.scaler: Any = None  # GradScaler, enabled for fp16 only
        self.ema: Any = None  # WeightEMA, None without model.ema
        self.params: list[nn.Parameter] = []  # what clipping sees: the trainable parameters
        self.stages: list[Any] = []  # training.unfreeze stages still to come
        self.bn_loader: Any = None  # schedule-free with BatchNorm: batches to recompute statistics on
        self.checkpointer: Any = None
        self.early_stopping: Any = None
        self.window: Any = None
        self.evaluator_job: concurrent.futures.Future | None = None  # started with the first batch
        self.profiler: Any = None
        self.step_lr: Any = None  # each group's lr at the last optimizer step, as logged
        self.grad_norm: torch.Tensor | None = None
        self.on_epoch_end: Any = None  # (epoch, metrics) -> None on every rank: Ray Train's report

    def fit(self) -> TrainState:
        self._build()
        end, restored = self.checkpointer.resume(self.resume_state)
        seed_per_rank(int(self.cfg.seed), self.ctx.rank, resumed=restored)
        self._start()
        st = self.state
        with self._writes_finished():
            for epoch in range(st.epoch, end):
                st.epoch = epoch
                metrics = self.train_one_epoch(epoch)
                if metrics is None:  # a stop signal: saved mid-epoch
                    return self._preempted()
                metrics.update(st.epoch_train_loss())
                self._recompute_batchnorm()
                metrics.update(self.validate(epoch))
                if self.privacy is not None:  # the epsilon spent so far
                    metrics.update(self.privacy.end_epoch(epoch))
                if self.schedule is not None and self.schedule.interval == "epoch":
                    monitor = metrics.get(str(self.cfg.checkpoint.monitor))
                    self.schedule.step(monitor if self.schedule.needs_metric else None)
                self.window.log(metrics, None, self.state)
                st.end_epoch(epoch)
                names = self.checkpointer.epoch_names(epoch, metrics)
                st.early_stopped = self.early_stopping.should_stop(metrics)
                final = st.early_stopped or epoch + 1 == end or self.stop.requested
                self.checkpointer.save(names, f"epoch {epoch + 1}", final)
                if self.on_epoch_end is not None:  # a launcher's report: the checkpoint is written first
                    self.checkpointer.wait()
                    self.on_epoch_end(epoch, metrics)
                if st.early_stopped:
                    log.info("early stopping: %s did not improve for %d validation(s)",
                             self.early_stopping.monitor, st.stale_epochs)  # fmt: skip
                    break
                if dist_utils.any_rank(self.stop.requested, self.ctx.device):
                    return self._preempted()
        if self.profiler is not None:
            self.profiler.stop()
        activate_mlflow(self.trackers)  # user code may call mlflow.log_metric: the test's evaluator runs next
        st.finished = True
        return st

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """Train from `batches_done` to the epoch's end: the last partial window's metrics, None if stopped."""
        cfg, ctx, st, train = self.cfg, self.ctx, self.state, self.train
        batch, accumulate = int(cfg.batch), self.accumulate
        if self.stages:
            self.params = unfreeze_due(self.stages, self.raw_model, self.optimizer, self.schedule, epoch)
        train.sampler.set_epoch(epoch)
        # min(): a state saved after an epoch's short last batch (older versions) is still resumable.
        train.sampler.set_start(min(st.batches_done * batch * ctx.world_size, train.sampler.total))
        if train.generator is not None:
            train.generator.manual_seed(int(cfg.seed) + epoch)
        self.model.train()
        set_optimizer_mode(self.optimizer, True)
        sizes = rank_batch_sizes(
            len(train.sampler) + st.batches_done * batch, batch, cfg.dataloader.drop_last
        )
        n_batches = 1 if self.debug else len(sizes)
        self.window.begin_epoch(st)  # a resumed run continues the window its checkpoint was saved in
        self.grad_norm = None
        bar = self.window.progress(n_batches - st.batches_done, f"epoch {epoch + 1}/{self.epochs}")
        batches = self._batches()
        i = st.batches_done
        while i < n_batches:
            t0 = time.perf_counter()
            try:
                data = next(batches)
            except StopIteration:
                break
            self.window.data_wait += time.perf_counter() - t0
            first = (i // accumulate) * accumulate  # this accumulation window: batches first..last-1
            last = min(first + accumulate, n_batches)
            self._train_step(data, sum(sizes[first:last]), sync=i + 1 == last)
            i += 1
            bar.update(1)
            if i < last:
                continue
            taken = self._optimizer_step()
            st.batches_done = i
            if not taken:
                continue
            st.global_step += 1
            if self.profiler is not None:
                self.profiler.step()
            if self._log_and_agree_on_stop(bar) and i < n_batches:
                self.window.store(st)  # keep the unlogged losses so the resumed log window is whole
                self.checkpointer.save([], f"{self.stop.signal_name or 'stop request'}", final=True)
                bar.close()
                return None
            if self.save_every and st.global_step % self.save_every == 0 and i < n_batches:
                self.window.store(st)
                self.checkpointer.save([], f"step {st.global_step}")
        bar.close()
        return self._flush_window(None, short_ok=False) if self.window.samples else {}

    def _train_step(self, batch: Any, window_total: int, sync: bool) -> None:
        """Forward and backward of one micro-batch, its loss scaled by its share of the window's samples."""
        inputs, targets = split_batch(batch)
        inputs = to_device(inputs, self.ctx.device, self.channels_last)
        targets = to_device(targets, self.ctx.device)
        n = batch_size(targets)
        if self.privacy is not None:  # Opacus scales per-sample gradients by the plain mean loss
            window_total = n
        with grad_sync(self.model, sync), self.precision.autocast():
            outputs = self.model(inputs)
            if self.distiller is None:
                value = self.loss_fn(outputs, targets)
            else:  # the teacher runs on the same inputs under the same autocast
                value = self.distiller(inputs, outputs, targets)
            loss = total_loss(value)
        # Normalise by the samples in the whole window, so a short last window counts right.
        self.scaler.scale(loss if n == window_total else loss * (n / window_total)).backward()
        self.window.add_batch(loss, value, n)

    def _optimizer_step(self) -> bool:
        """End of an accumulation window: clip, step, EMA, schedule. False: nan_policy=skip dropped it."""
        optimizer = self.optimizer
        # A sync, only with nan_policy=skip; the whole window (every micro-batch) on every rank decides.
        if self.nan_skip and not self.window.step_finite():
            return self._skip_step("loss")
        if self.clip > 0:
            self.scaler.unscale_(optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # fp16's GradScaler skips non-finite gradients itself; otherwise skip checks them too.
        if self.nan_skip and not self.scaler.is_enabled() and not self._grads_finite():
            return self._skip_step("gradient")
        self.window.end_step(taken=True)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.raw_model)
        self.step_lr = step_lr(optimizer)  # read before the schedule moves it on
        if self.schedule is not None and self.schedule.interval == "step":
            self.schedule.step()
        return True

    def _grads_finite(self) -> bool:
        """nan_policy=skip: whether this window's gradients are finite on every rank (the clipping norm when
        there is one, else a max-norm pass over the gradients; a sync per step, as skip's loss check)."""
        norm = self.grad_norm if self.clip > 0 else torch.nn.utils.get_total_norm(
            [p.grad for p in self.params if p.grad is not None], norm_type=math.inf
        )  # fmt: skip
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return not dist_utils.any_rank(not bool(torch.isfinite(norm)), self.ctx.device)

    def _skip_step(self, what: str) -> bool:
        """nan_policy=skip drops the window's gradients and losses; weights already NaN/inf end the run."""
        if not self.checkpointer.weights_finite():  # no later step can train them back
            raise self.checkpointer.non_finite_weights()
        st = self.state
        log.warning("non-finite %s at epoch %d step %d: step skipped", what, st.epoch + 1, st.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        self.window.end_step(taken=False)
        return False

    def _log_and_agree_on_stop(self, bar: Any) -> bool:
        """Log at log steps (the only host-device sync of a step); whether every rank should stop now."""
        if self.state.global_step % self.log_every == 0:
            self._flush_window(bar, short_ok=True)
            if self.evaluator_job is not None and self.evaluator_job.done():
                self.evaluator_job.result()  # a bad evaluator setting stops the run now, not at validation
            return dist_utils.any_rank(self.stop.requested, self.ctx.device)
        # Distributed ranks agree at log steps only, so no collective on other steps.
        return False if self.ctx.distributed else self.stop.requested

    def _flush_window(self, bar: Any, short_ok: bool) -> dict[str, float]:
        metrics = self.window.flush(self.state, self.step_lr, self.grad_norm, short_ok)
        if not math.isfinite(metrics["train_loss"]):
            raise self.checkpointer.non_finite(metrics["train_loss"])
        if bar is not None:
            self.window.log(metrics, bar, self.state)
        return metrics

    def validate(self, epoch: int) -> dict[str, float]:
        """`val_*` metrics when this epoch validates (every evaluation.frequency epochs, and the last)."""
        freq = int(self.cfg.evaluation.frequency)
        if self.val is None or not freq or ((epoch + 1) % freq and epoch + 1 != self.epochs):
            return {}
        assert self.evaluator_job is not None
        evaluator = self.evaluator_job.result()
        # A user's evaluator may call mlflow.log_metric from here on; the built-in one never does.
        activate_mlflow(self.trackers, wait=not type(evaluator).__module__.startswith("src."))
        batches = 1 if self.debug else len(self.val.loader)
        bar = self.window.progress(batches, f"val {epoch + 1}/{self.epochs}")
        with evaluation_weights(self.optimizer):
            eval_model = self.ema.module if self.ema is not None else self.model
            metrics = evaluate(eval_model, self.val.loader, self.val.sampler.num_valid, self.loss_fn, evaluator,
                               self.precision, self.ctx.device, "val", self.channels_last,
                               max_batches=1 if self.debug else None, bar=bar)  # fmt: skip
        bar.close()
        return metrics

    def _build(self) -> None:
        """Data, model, loss, optimizer, schedule: the same seed on every rank gives identical initial weights."""
        cfg, ctx = self.cfg, self.ctx
        seed_everything(int(cfg.seed))
        configure_backends(cfg.gpu)
        self.precision = resolve_precision(cfg.gpu, ctx.device)
        transforms = split_transforms(cfg.get("transform"))
        self.train = build_split(cfg, "train", ctx, shuffle=True, transforms=transforms)
        if cfg.evaluation.frequency:
            self.val = build_split(cfg, "val", ctx, shuffle=False, transforms=transforms)
        self.num_classes = num_classes_of(cfg, self.train.dataset)
        require_num_classes(cfg, self.num_classes)
        if ctx.is_main:  # MLflow's store opens while the model is built
            prestart_mlflow(cfg)
        self.privacy = build_privacy(cfg, len(self.train.dataset), self.precision.name)
        if self.privacy is not None:
            self.train = self.privacy.poisson_split(self.train)
        model = model_for(cfg, self.num_classes)
        if self.privacy is not None:  # refuse layers Opacus cannot train (BatchNorm)
            self.privacy.check_model(model)
        model.to(ctx.device)
        check_output_size(
            model, self.train.dataset, self.num_classes, ctx.device, cfg.model.name, cfg.dataset.name
        )
        if cfg.model.get("pretrained_weight"):
            load_pretrained_weights(model, cfg.model.pretrained_weight)
        self.stages = plan_unfreezing(model, cfg.training)  # freezes what unfreezes later
        if self.stages and ctx.strategy in ("ddp", "fsdp"):
            raise ConfigError(
                f"training.unfreeze / freeze_backbone_epochs cannot add parameters to a {ctx.strategy} model "
                "mid-run; train on one process, or freeze with model.freeze only"
            )
        self.model, self.raw_model = prepare_model(model, cfg.model, cfg.distributed, cfg.gpu, ctx)
        if self.privacy is not None:  # per-sample gradients; raw_model stays the plain model
            self.model = self.privacy.wrap_model(self.model)
        self.loss_fn = build_loss(cfg.loss)
        self.distiller = build_distiller(cfg.get("distillation"), self.loss_fn, self.num_classes, ctx.device)
        self.optimizer = build_optimizer(fused_on_cuda(cfg.optimizer, ctx.device), self.raw_model)
        steps_per_epoch = math.ceil((1 if self.debug else len(self.train.loader)) / self.accumulate)
        self.schedule = build_scheduler(
            cfg.lr_scheduler, self.optimizer, steps_per_epoch=steps_per_epoch, epochs=self.epochs
        )
        if self.privacy is not None:  # clip per sample, add noise, count steps for the accountant
            self.optimizer = self.privacy.wrap_optimizer(self.optimizer)
        self.scaler = self.precision.grad_scaler()
        self.ema = build_ema(cfg.model, ctx.strategy, self.raw_model)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # Schedule-free with BatchNorm: statistics are recomputed for the evaluated weights each epoch.
        if self.ema is None and is_schedule_free(self.optimizer) and batchnorm_layers(self.raw_model):
            self.bn_loader = recompute_loader(
                self.train.dataset, cfg.dataloader, int(cfg.batch), int(cfg.seed), ctx
            )
            log.info(
                "schedule-free optimizer with BatchNorm: the statistics are recomputed for the evaluated "
                "weights on up to %d train batches before each validation and epoch checkpoint",
                1 if self.debug else RECOMPUTE_BATCHES,
            )
        if self.stages:  # a resumed run re-adds the groups it had, so the optimizer state fits them
            mark_base_lrs(self.optimizer)
            progress = (self.resume_state or {}).get("progress") or {}
            self.params = unfreeze_due(
                self.stages, self.raw_model, self.optimizer, self.schedule, int(progress.get("epoch", 0))
            )
        for line in describe_groups(
            self.raw_model, self.optimizer, cfg.model.get("freeze") or [], self.stages
        ):
            log.info(line)
        parts = {"raw_model": self.raw_model, "optimizer": self.optimizer, "schedule": self.schedule,
                 "scaler": self.scaler, "ema": self.ema, "privacy": self.privacy}  # fmt: skip
        self.checkpointer = Checkpointer(
            cfg.checkpoint, ctx, self.run_dir, parts, self.state, self.epochs, batch=int(cfg.batch),
            model_name=str(cfg.model.name), timeout_minutes=int(cfg.distributed.timeout_minutes),
        )  # fmt: skip
        self.early_stopping = EarlyStopping(cfg.training.early_stopping, self.state)

    def _start(self) -> None:
        """Trackers, stop signals, the logging window (with MFU's FLOP count) and the profiler."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            resumed = self.checkpointer.tracking_state
            self.trackers = start_trackers(cfg, self.run_dir, resumed, self.state.global_step)
        self.checkpointer.trackers = self.trackers
        self.stop.install(cfg.training.stop_signals)
        log.info(
            "training %s on %s: %d process(es), %s precision, batch %d per process, %d global (x%d accumulation), "
            "%s per epoch, %s",
            cfg.model.name, ctx.device, ctx.world_size, self.precision.label, cfg.batch,
            int(cfg.batch) * ctx.world_size * self.accumulate, self.accumulate,
            plural(math.ceil((1 if self.debug else len(self.train.loader)) / self.accumulate), "step"),
            plural(self.epochs, "epoch"),
        )  # fmt: skip
        # MFU on a GPU whose peak is known: the FLOPs of a training step are counted once, here.
        peak = peak_flops(ctx.device)
        build = lambda: model_for(cfg, self.num_classes)  # noqa: E731
        sample = self.train.dataset[0] if peak else None
        flops = train_flops_per_sample(build, sample, int(cfg.batch), self.loss_fn) if peak else None
        self.window = LogWindow(ctx, self.log_every, flops, peak, bool(cfg.logging.progress_bar))
        self.window.trackers = self.trackers
        self.window.data_wait_watch = DataWaitWatch(cfg.dataloader.num_workers, self.train.loader.num_workers)
        self.profiler = start_profiler(cfg.profiling, ctx, self.run_dir)
        self.step_lr = step_lr(self.optimizer)
        gc.freeze()  # set-up's objects (modules, imports) leave the collector's view: no long pauses later

    @contextlib.contextmanager
    def _writes_finished(self) -> Iterator[None]:
        """Every way out of the loop waits for the checkpoint write in flight; another error wins over its."""
        try:
            yield
        except BaseException:
            self.checkpointer.finish(failed=True)
            raise
        self.checkpointer.finish()

    def _batches(self) -> Iterator[Any]:
        """The epoch's batches; the first epoch also starts building the evaluator beside its steps."""
        if self.evaluator_job is not None and self.train.loader.num_workers:
            self.evaluator_job.result()  # never fork loader workers while another thread imports
        batches = iter(self.train.loader)
        if self.evaluator_job is None and self.val is not None:
            # torchmetrics takes seconds to import: build the evaluator beside the first steps
            # (but not inside a profile, where a traced import would swamp the trace).
            self.evaluator_job = in_background(
                build_evaluator, self.cfg.evaluator, self.num_classes, self.cfg.evaluation.metrics
            )
            if self.profiler is not None:
                self.evaluator_job.result()
        return batches

    def _recompute_batchnorm(self) -> None:
        """Schedule-free with BatchNorm: statistics for the weights about to be validated and saved."""
        if self.bn_loader is None:
            return
        if self.evaluator_job is not None and self.bn_loader.num_workers:
            self.evaluator_job.result()  # never fork loader workers while another thread imports
        with evaluation_weights(self.optimizer):
            recompute_batchnorm(self.raw_model, self.bn_loader, 1 if self.debug else RECOMPUTE_BATCHES,
                                self.ctx.device, self.precision, self.channels_last, self.ctx.world_size)  # fmt: skip

    def _preempted(self) -> TrainState:
        self.state.finished = False
        log.warning("stopped by %s after step %d; resume with: %s",
                    self.stop.signal_name or "another rank's stop request", self.state.global_step,
                    resume_command(self.run_dir))  # fmt: skip
        return self.state
