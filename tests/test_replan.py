"""Changing `epoch` on a resume re-plans the schedule: from the resume point on, the lr is the one a
fresh run planned for the new length has there, for every registered scheduler."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from src.optim import build_scheduler
from src.optim.schedulers import LRSchedule, replan
from src.registry import LR_SCHEDULER_REGISTRY

# Settings that make each registered scheduler valid; run-length arguments are left to the template.
SCHEDULERS = {
    "StepLR": {"step_size": 2, "gamma": 0.5},
    "MultiStepLR": {"milestones": [2, 5], "gamma": 0.5},
    "ExponentialLR": {"gamma": 0.8},
    "CosineAnnealingLR": {},
    "CosineAnnealingWarmRestarts": {"T_0": 3},
    "ReduceLROnPlateau": {"patience": 0, "factor": 0.5},
    "LinearLR": {"start_factor": 0.2, "total_iters": 6},
    "OneCycleLR": {},
    "PolynomialLR": {"power": 2.0},
    "ConstantLR": {"factor": 0.5, "total_iters": 3},
    "CosineAnnealingWarmupReduceRestarts": {"T_0": 3, "T_up": 1, "gamma": 0.5},
}
CASES = [
    (name, warmup) for name in SCHEDULERS for warmup in (0, 2) if not (warmup and name == "ReduceLROnPlateau")
]
STEPS_PER_EPOCH, OLD, NEW = 3, 4, 9


def test_every_registered_scheduler_is_covered():
    built_in = {
        n
        for n in LR_SCHEDULER_REGISTRY.names()
        if LR_SCHEDULER_REGISTRY.get(n).__module__.startswith(("torch.", "src.optim"))
    }
    assert built_in == set(SCHEDULERS)


def _run(section: dict, epochs: int, state: tuple | None = None, until: int | None = None):
    """Build the schedule for `epochs` (resuming `state` as the trainer does), step it to `until`
    intervals (default: the end) and return (lr after each interval by position, optimizer, schedule)."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = build_scheduler(section, optimizer, steps_per_epoch=STEPS_PER_EPOCH, epochs=epochs)
    assert schedule is not None
    per_step = schedule.interval == "step"
    total = epochs * (STEPS_PER_EPOCH if per_step else 1)
    start, lrs = 0, {}
    if state is not None:
        opt_state, sched_state, planned = state
        plan = replan(schedule, sched_state, planned, epochs)
        optimizer.load_state_dict(opt_state)
        if plan is None:
            schedule.load_state_dict(sched_state)
        else:
            schedule.apply_plan(plan)
        start = sched_state["last_epoch"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(start, total if until is None else until):
            schedule.step(1.0 if schedule.needs_metric else None)  # a metric that never improves
            lrs[t + 1] = [g["lr"] for g in optimizer.param_groups]
    return lrs, optimizer, schedule


@pytest.mark.parametrize(("name", "warmup"), CASES, ids=[f"{n}-warmup{w}" for n, w in CASES])
@pytest.mark.parametrize("where", ["finished", "mid-run"])
def test_extension_follows_a_fresh_run_planned_for_the_new_length(name, warmup, where):
    section = {"name": name, "warmup": warmup, **SCHEDULERS[name]}
    _, optimizer, schedule = _run(section, OLD, until=None if where == "finished" else 5)
    saved = (optimizer.state_dict(), schedule.state_dict(), OLD)
    resumed, *_ = _run(section, NEW, state=saved)
    fresh, *_ = _run(section, NEW)
    assert resumed, "the extension trained nothing"
    assert resumed == {t: fresh[t] for t in resumed}
    if name in ("CosineAnnealingLR", "PolynomialLR", "OneCycleLR"):  # those that used to train at lr 0
        assert min(v[0] for t, v in resumed.items() if t < max(resumed)) > 0


def test_a_users_scheduler_is_named_in_a_warning(caplog):
    class MyDecay(sched.LambdaLR):
        pass

    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = LRSchedule(MyDecay(optimizer, lambda t: 0.5**t), "epoch")
    with caplog.at_level(logging.WARNING, logger="template"):
        assert replan(schedule, schedule.state_dict(), OLD, NEW) is None
    assert "MyDecay" in caplog.text and "cannot be re-planned" in caplog.text


@pytest.mark.parametrize("name", ["StepLR", "CosineAnnealingLR"])
def test_the_replan_line_names_the_lr_training_goes_on_at_or_that_nothing_changed(name):
    """A finished cosine's next lr is 0: the line shows where training goes on, not that 0."""
    section = {"name": name, **SCHEDULERS[name]}
    _, optimizer, schedule = _run(section, OLD)
    saved_opt, saved_sched = optimizer.state_dict(), schedule.state_dict()
    _, optimizer, schedule = _run(section, NEW, until=0)  # freshly built for the new length
    plan = replan(schedule, saved_sched, OLD, NEW)
    optimizer.load_state_dict(saved_opt)
    line = schedule.replan_line(OLD, NEW, *schedule.apply_plan(plan))
    lr = optimizer.param_groups[0]["lr"]
    if name == "StepLR":  # halves every 2 epochs whatever the length: the same lr before and after
        assert line == f"epoch {OLD} -> {NEW}: StepLR does not depend on the run length, its learning rate " \
            f"goes on unchanged (lr {lr:.6g})"  # fmt: skip
    else:
        assert lr > 0.01
        want = (
            f"schedule re-planned: {OLD} -> {NEW} epochs (CosineAnnealingLR): training goes on at lr {lr:.6g}"
        )
        assert line == want
        assert " 0 " not in line
