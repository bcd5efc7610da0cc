"""LR schedulers, an optional linear warm-up in front of any of them, and the one object the trainer steps."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler as sched

from src.arguments import check_types
from src.config.sections import section_args
from src.errors import ConfigError, did_you_mean
from src.optim.optimizers import lookup
from src.registry import LR_SCHEDULER_REGISTRY

for _name in (
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "ReduceLROnPlateau",
    "LinearLR",
    "OneCycleLR",
    "PolynomialLR",
    "ConstantLR",
):
    LR_SCHEDULER_REGISTRY.add(_name, getattr(sched, _name))

log = logging.getLogger("template")

INTERVALS = ("auto", "epoch", "step")
WARMUP_START_FACTOR = 1e-3

# Schedulers whose length defaults to the run's: the argument filled in, and the attributes that
# depend on it (kept from the fresh build on resume, so `epoch=200` stretches the schedule).
RUN_LENGTH_ARGS: dict[type, tuple[str, tuple[str, ...]]] = {
    sched.CosineAnnealingLR: ("T_max", ("T_max",)),
    sched.PolynomialLR: ("total_iters", ("total_iters",)),
    sched.OneCycleLR: ("total_steps", ("total_steps", "_schedule_phases")),
}


@LR_SCHEDULER_REGISTRY.register()
class CosineAnnealingWarmupReduceRestarts(sched.LRScheduler):
    """Cosine restarts where every cycle opens with a linear warm-up and peaks lower than the last.

    Cycle i lasts `T_0 * T_mult**i` intervals. Inside it the LR climbs linearly from `eta_min` to
    `base_lr * gamma**i` over `T_up` intervals, then follows a half cosine back towards `eta_min`.
    The LR is a closed-form function of `last_epoch`, so a restored state resumes the exact curve.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
        T_up: int = 0,
        gamma: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(T_0, int) or T_0 < 1:
            raise ValueError(f"T_0 must be a positive integer, got {T_0!r}")
        if not isinstance(T_mult, int) or T_mult < 1:
            raise ValueError(f"T_mult must be an integer >= 1, got {T_mult!r}")
        if not isinstance(T_up, int) or not 0 <= T_up < T_0:
            raise ValueError(f"T_up must be an integer in [0, T_0={T_0}), got {T_up!r}")
        if eta_min < 0 or gamma <= 0:
            raise ValueError(f"need eta_min >= 0 and gamma > 0, got eta_min={eta_min}, gamma={gamma}")
        self.T_0, self.T_mult, self.eta_min, self.T_up, self.gamma = T_0, T_mult, eta_min, T_up, gamma
        super().__init__(optimizer, last_epoch)

    def cycle_position(self, t: int) -> tuple[int, int, int]:
        """(cycle index, interval inside the cycle, cycle length) of interval `t`."""
        if self.T_mult == 1:
            cycle, inside = divmod(t, self.T_0)
            return cycle, inside, self.T_0
        cycle, length = 0, self.T_0
        while t >= length:
            t -= length
            length *= self.T_mult
            cycle += 1
        return cycle, t, length

    def get_lr(self) -> list[float]:
        cycle, inside, length = self.cycle_position(max(self.last_epoch, 0))
        if inside < self.T_up:
            frac = inside / self.T_up
        else:
            frac = (1 + math.cos(math.pi * (inside - self.T_up) / (length - self.T_up))) / 2
        return [self.eta_min + (base * self.gamma**cycle - self.eta_min) * frac for base in self.base_lrs]

    _get_closed_form_lr = get_lr


# What a scheduler writes into optimizer groups; a re-planned schedule copies these, nothing else
# (schedule-free optimizers keep state of their own in the groups).
SCHEDULE_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum", "betas")


class LRSchedule:
    """A scheduler plus when to step it; the trainer needs nothing else to drive any scheduler.

    `interval` is "epoch" or "step" (one optimizer step); `needs_metric` marks ReduceLROnPlateau,
    which `step` feeds the monitored metric and skips when there is none.
    """

    def __init__(
        self,
        scheduler: sched.LRScheduler,
        interval: str,
        main: sched.LRScheduler | None = None,
        run_length_attrs: tuple[str, ...] = (),
    ) -> None:
        self.scheduler = scheduler
        self.interval = interval
        self.needs_metric = isinstance(scheduler, sched.ReduceLROnPlateau)
        self._main = main if main is not None else scheduler
        self._run_length_attrs = run_length_attrs

    def step(self, metric: float | None = None) -> None:
        if self.needs_metric:
            if metric is not None:
                self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    @property
    def name(self) -> str:
        return type(self._main).__name__

    def can_replan(self) -> bool:
        """Built-in schedulers can be planned afresh for a new run length; a user's may keep hidden state."""
        return not self.needs_metric and type(self._main) in BUILT_IN

    def fast_forward(self, intervals: int) -> dict[int, dict[str, Any]]:
        """Step this freshly built schedule `intervals` times, as a fresh run would have, before any
        training; returns the optimizer-group values it set (lr, and momentum for OneCycleLR).

        Call it before the optimizer's saved state is loaded: the recursive torch formulas then start
        from the configured lr, so the values are exactly those of a fresh run planned for this length.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(intervals):
                self.scheduler.step()
        groups = self.scheduler.optimizer.param_groups
        return {i: {k: g[k] for k in SCHEDULE_KEYS if k in g} for i, g in enumerate(groups)}

    def apply_plan(self, plan: dict[int, dict[str, Any]]) -> tuple[float, float]:
        """Put the fast-forwarded values into the (now loaded) optimizer; (lr before, lr after)."""
        groups = self.scheduler.optimizer.param_groups
        before = float(groups[0]["lr"])
        for i, values in plan.items():
            groups[i].update(values)
        return before, float(groups[0]["lr"])

    def replan_line(self, old_epochs: int, new_epochs: int, before: float, after: float) -> str:
        """The log's one line for a re-plan: the lr training goes on at, or that nothing changed.

        The old plan's value at this point is not shown: at the end of a cosine it is 0, which reads
        as if the run had trained at 0 when its last epoch's lr was larger."""
        if math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
            return (
                f"epoch {old_epochs} -> {new_epochs}: {self.name} does not depend on the run length, its "
                f"learning rate goes on unchanged (lr {after:.6g})"
            )
        return f"schedule re-planned: {old_epochs} -> {new_epochs} epochs ({self.name}): training goes on at lr {after:.6g}"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position; a length derived from the run keeps this run's value (train longer)."""
        keep = {a: getattr(self._main, a) for a in self._run_length_attrs}
        self.scheduler.load_state_dict(dict(state))
        for attr, value in keep.items():
            setattr(self._main, attr, value)

    def last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.scheduler.optimizer.param_groups]

    def __repr__(self) -> str:
        return f"LRSchedule({type(self._main).__name__}, interval={self.interval!r})"


def replan(
    schedule: LRSchedule, saved: Mapping[str, Any] | None, old_epochs: int, new_epochs: int
) -> dict[int, dict[str, Any]] | None:
    """On a resume whose `epoch` changed, the optimizer-group values a fresh run planned for
    `new_epochs` has at the saved position (apply them with `apply_plan` once the optimizer's state is
    loaded); None when the saved schedule simply continues. `schedule` must be freshly built and the
    optimizer still hold its configured lr.
    """
    if saved is None or not old_epochs or old_epochs == new_epochs or schedule.needs_metric:
        return None  # (ReduceLROnPlateau does not depend on the run length)
    if not schedule.can_replan():
        log.warning(
            "lr_scheduler %s is not a built-in scheduler and cannot be re-planned for %d epochs: it goes on "
            "with the curve it had for %d; give it its length in its own settings instead",
            schedule.name, new_epochs, old_epochs,
        )  # fmt: skip
        return None
    return schedule.fast_forward(int(saved.get("last_epoch", 0)))


def build_scheduler(
    section: Mapping[str, Any] | str | None,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
) -> LRSchedule | None:
    """Build the `lr_scheduler` section, or None when it names no scheduler and asks for no warm-up.

    Template keys: `interval` ("auto": per step for OneCycleLR, per epoch otherwise) and `warmup`
    (intervals of linear ramp from 1e-3*lr before the scheduler starts). `steps_per_epoch` counts
    optimizer steps. Run-length arguments left out (or null) are filled from the run.
    """
    kwargs = section_args(section, "lr_scheduler")
    interval = kwargs.pop("interval", None) or "auto"
    warmup = kwargs.pop("warmup", None) or 0
    if interval not in INTERVALS:
        raise ConfigError(
            f"lr_scheduler.interval must be one of {', '.join(INTERVALS)}, got {interval!r}"
            f"{did_you_mean(str(interval), INTERVALS)}"
        )
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"lr_scheduler.warmup must be a whole number of intervals >= 0, got {warmup!r}")

    name = kwargs.get("name")
    if not name:
        if not warmup:
            return None
        ramp = sched.LinearLR(optimizer, WARMUP_START_FACTOR, 1.0, total_iters=warmup)
        return LRSchedule(ramp, "step" if interval == "step" else "epoch")
    cls = lookup(LR_SCHEDULER_REGISTRY, name)
    if interval == "auto":
        interval = "step" if _is(cls, sched.OneCycleLR) else "epoch"
    if warmup and _is(cls, sched.ReduceLROnPlateau):
        raise ConfigError(
            "lr_scheduler.warmup cannot precede ReduceLROnPlateau (it steps on a metric); "
            "set warmup: 0 or pick another scheduler"
        )

    length = epochs * (steps_per_epoch if interval == "step" else 1) - warmup
    run_length_attrs: tuple[str, ...] = ()
    for base, (key, attrs) in RUN_LENGTH_ARGS.items():
        if not _is(cls, base) or kwargs.get(key) is not None:
            continue
        if base is sched.OneCycleLR and kwargs.get("epochs") is not None:
            continue  # the user chose OneCycleLR's own epochs/steps_per_epoch form
        if length < 1:
            raise ConfigError(
                f"lr_scheduler.warmup={warmup} leaves no room for {name} in a run of "
                f"{length + warmup} {interval}(s); lower warmup or give {key} explicitly"
            )
        kwargs[key] = length
        run_length_attrs = attrs
    if _is(cls, sched.OneCycleLR) and kwargs.get("max_lr") is None:
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        kwargs["max_lr"] = lrs[0] if len(set(lrs)) == 1 else lrs

    check_types(cls, {k: v for k, v in kwargs.items() if k != "name"}, where=f"lr_scheduler '{name}'")
    main = LR_SCHEDULER_REGISTRY.build(kwargs, optimizer=optimizer)
    scheduler = main
    if warmup:
        ramp = sched.LinearLR(optimizer, WARMUP_START_FACTOR, 1.0, total_iters=warmup)
        scheduler = sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
    return LRSchedule(scheduler, interval, main=main, run_length_attrs=run_length_attrs)


# Schedulers whose lr is a pure function of their step count: re-planned on a length change.
BUILT_IN = {
    *(getattr(sched, n) for n in ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
                                  "CosineAnnealingWarmRestarts", "LinearLR", "OneCycleLR", "PolynomialLR",
                                  "ConstantLR")),
    CosineAnnealingWarmupReduceRestarts,
}  # fmt: skip


def _is(obj: Any, base: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, base)
