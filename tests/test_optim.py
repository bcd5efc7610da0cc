"""Optimizers and LR schedulers built from config sections, as the trainer and the guide use them."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from src.errors import ConfigError
from src.optim import (
    LR_SCHEDULER_REGISTRY,
    OPTIMIZER_REGISTRY,
    build_optimizer,
    build_scheduler,
    is_schedule_free,
    set_optimizer_mode,
)
from tests.guide_blocks import (
    COMMON_SCHEDULERS,
    OPTIMIZER_SELECTION,
    SCHEDULE_FREE,
    WARMUP_SCHEDULE,
)
from tests.guide_blocks import alternatives as guide_alternatives

ROOT = Path(__file__).resolve().parents[1]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def lr_curve(schedule, optimizer: torch.optim.Optimizer, n: int) -> list[float]:
    """The LR in force at each of n intervals, stepping the optimizer first as training does."""
    lrs = []
    for _ in range(n):
        lrs.append(schedule.last_lr()[0])
        optimizer.step()
        schedule.step()
    return lrs


def sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return build_optimizer({"name": "SGD", "lr": lr, "momentum": 0.9}, nn.Linear(2, 1))


# ---------------------------------------------------------------- optimizers

OPTIMIZER_SECTIONS = {
    "SGD": {"lr": 0.05, "momentum": 0.9},
    "Adam": {"lr": 0.01},
    "AdamW": {"lr": 0.01, "weight_decay": 0.01},
    "RAdam": {"lr": 0.01},
    "NAdam": {"lr": 0.01},
    "RMSprop": {"lr": 0.005},
    "Adagrad": {"lr": 0.1},
    "Adadelta": {"lr": 1.0},
    "Adamax": {"lr": 0.01},
    "Lion": {"lr": 0.003},
    "AdamWScheduleFree": {"lr": 0.01},
    "SGDScheduleFree": {"lr": 0.05},
    "RAdamScheduleFree": {"lr": 0.03},
}


def test_every_required_optimizer_is_registered():
    assert set(OPTIMIZER_SECTIONS) <= set(OPTIMIZER_REGISTRY.names())


@pytest.mark.parametrize("name", sorted(OPTIMIZER_SECTIONS))
def test_optimizer_builds_and_reduces_the_loss(name):
    model = tiny_model()
    x, y = regression_data()
    optimizer = build_optimizer({"name": name, **OPTIMIZER_SECTIONS[name]}, model)
    assert type(optimizer) is OPTIMIZER_REGISTRY.get(name)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    with torch.no_grad():
        before = loss().item()
    set_optimizer_mode(optimizer, train=True)
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    set_optimizer_mode(optimizer, train=False)  # schedule-free: evaluate the averaged weights
    with torch.no_grad():
        after = loss().item()
    assert after < 0.95 * before, f"{name}: loss {before:.4f} -> {after:.4f}"


def test_only_trainable_parameters_are_optimized():
    model = tiny_model()
    model[0].requires_grad_(False)
    optimizer = build_optimizer({"name": "Adam"}, model)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model[0].weight) not in optimized


def test_no_decay_bias_norm_splits_the_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.LayerNorm(8),
        nn.GroupNorm(2, 8),
        nn.Linear(8, 2, bias=False),
    )
    model.register_parameter("scale", nn.Parameter(torch.ones(8)))  # a bare 1-D parameter
    model[6].weight.requires_grad_(False)
    section = OmegaConf.create(
        {"name": "AdamW", "lr": 0.01, "weight_decay": 0.05, "no_decay_bias_norm": True}
    )
    optimizer = build_optimizer(section, model)

    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    expected = [model[0].bias, model[3].bias, model.scale]
    expected += [p for i in (1, 4, 5) for p in model[i].parameters()]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0


def test_without_no_decay_bias_norm_there_is_one_group():
    model = tiny_model()
    optimizer = build_optimizer({"name": "AdamW", "weight_decay": 0.05}, model)
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_schedule_free_modes():
    model = tiny_model()
    free = build_optimizer({"name": "AdamWScheduleFree", "lr": 0.01}, model)
    plain = build_optimizer({"name": "AdamW"}, model)
    assert is_schedule_free(free)
    assert not is_schedule_free(plain)
    set_optimizer_mode(free, train=True)
    assert all(g["train_mode"] for g in free.param_groups)
    set_optimizer_mode(free, train=False)
    assert not any(g["train_mode"] for g in free.param_groups)
    set_optimizer_mode(plain, train=True)  # no modes: nothing to do, nothing raised
    set_optimizer_mode(plain, train=False)


def test_unknown_optimizer_name_suggests_the_close_one():
    with pytest.raises(ConfigError, match="'AdamW'"):
        build_optimizer({"name": "Adamw", "lr": 0.001}, tiny_model())


def test_unknown_optimizer_key_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"weight_dacay.*did you mean 'weight_decay'"):
        build_optimizer({"name": "AdamW", "weight_dacay": 0.01}, tiny_model())


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"name": "AdamW", "lr": "fast"}, "lr"),
        ({"name": "Adam", "amsgrad": "false"}, "amsgrad"),
        ({"name": "Adam", "betas": [0.9]}, "betas"),
        ({"name": "SGD", "lr": 0.1, "nesterov": 1}, "nesterov"),
        ({"name": "AdamW", "no_decay_bias_norm": "yes"}, "no_decay_bias_norm"),
        ({"name": "Lion", "lr": True}, "lr"),
    ],
)
def test_wrong_typed_optimizer_values_are_refused(section, key):
    with pytest.raises(ConfigError, match=key):
        build_optimizer(section, tiny_model())


def test_out_of_range_lion_lr_is_a_config_error():
    with pytest.raises(ConfigError, match="Lion"):
        build_optimizer({"name": "Lion", "lr": 0.0}, tiny_model())


# ---------------------------------------------------------------- schedulers

SCHEDULER_SECTIONS = {
    "StepLR": {"step_size": 2, "gamma": 0.5},
    "MultiStepLR": {"milestones": [1, 3]},
    "ExponentialLR": {"gamma": 0.9},
    "CosineAnnealingLR": {},
    "CosineAnnealingWarmRestarts": {"T_0": 3},
    "LinearLR": {"start_factor": 0.5, "total_iters": 4},
    "OneCycleLR": {},
    "PolynomialLR": {"power": 2.0},
    "ConstantLR": {"factor": 0.5, "total_iters": 2},
    "CosineAnnealingWarmupReduceRestarts": {"T_0": 3, "T_up": 1, "gamma": 0.5},
}


@pytest.mark.parametrize("name", sorted(SCHEDULER_SECTIONS))
def test_scheduler_builds_and_changes_the_lr(name):
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler(
        {"name": name, **SCHEDULER_SECTIONS[name]}, optimizer, steps_per_epoch=2, epochs=6
    )
    assert isinstance(schedule.scheduler, LR_SCHEDULER_REGISTRY.get(name))
    assert schedule.interval == ("step" if name == "OneCycleLR" else "epoch")
    assert not schedule.needs_metric
    lrs = lr_curve(schedule, optimizer, 6)
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)
    assert len(set(lrs)) > 1, f"{name} never changed the lr: {lrs}"
    assert schedule.last_lr() == [g["lr"] for g in optimizer.param_groups]


def test_reduce_on_plateau_steps_on_the_metric_only():
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler(
        {"name": "ReduceLROnPlateau", "factor": 0.5, "patience": 0}, optimizer, steps_per_epoch=5, epochs=10
    )
    assert schedule.needs_metric
    assert schedule.interval == "epoch"
    schedule.step()  # no metric this epoch (no validation): skipped
    schedule.step(None)
    assert schedule.last_lr() == [1.0]
    schedule.step(1.0)  # first value becomes the best
    schedule.step(1.0)  # no improvement with patience 0: cut
    assert schedule.last_lr() == [0.5]


def test_no_scheduler_name_gives_none():
    optimizer = sgd()
    assert build_scheduler(None, optimizer, 10, 5) is None
    assert build_scheduler({"name": None}, optimizer, 10, 5) is None
    assert (
        build_scheduler(OmegaConf.create({"name": "", "interval": "auto", "warmup": 0}), optimizer, 10, 5)
        is None
    )


def test_one_cycle_defaults_fill_from_the_run():
    optimizer = build_optimizer({"name": "SGD", "lr": 0.4, "momentum": 0.9}, nn.Linear(2, 1))
    schedule = build_scheduler({"name": "OneCycleLR"}, optimizer, steps_per_epoch=5, epochs=4)
    assert schedule.interval == "step"
    assert schedule.scheduler.total_steps == 20
    assert [g["max_lr"] for g in optimizer.param_groups] == [0.4]
    lrs = lr_curve(schedule, optimizer, 20)  # one step per optimizer step for the whole run: no error
    assert max(lrs) == pytest.approx(0.4)
    assert lrs[0] == pytest.approx(0.4 / 25)


def test_explicit_values_are_not_overridden():
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler({"name": "OneCycleLR", "max_lr": 2.0, "total_steps": 50}, optimizer, 7, 3)
    assert schedule.scheduler.total_steps == 50
    assert optimizer.param_groups[0]["max_lr"] == 2.0
    schedule = build_scheduler({"name": "CosineAnnealingLR", "T_max": 4}, sgd(), 7, 30)
    assert schedule.scheduler.T_max == 4


def test_interval_can_be_forced():
    schedule = build_scheduler({"name": "CosineAnnealingLR", "interval": "step", "warmup": 5}, sgd(), 10, 3)
    assert schedule.interval == "step"
    assert schedule.scheduler._schedulers[1].T_max == 10 * 3 - 5


def linear_warmup(lr: float, t: int, warmup: int) -> float:
    start = 1e-3
    return lr * (start + (1 - start) * t / warmup)


def test_warmup_is_linear_then_follows_the_cosine():
    optimizer = sgd(lr=0.5)
    schedule = build_scheduler({"name": "CosineAnnealingLR", "eta_min": 0.01, "warmup": 4}, optimizer, 3, 12)
    lrs = lr_curve(schedule, optimizer, 12)
    assert lrs[:4] == pytest.approx([linear_warmup(0.5, t, 4) for t in range(4)])
    cosine = [0.01 + (0.5 - 0.01) * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(9)]
    assert lrs[4:] == pytest.approx(cosine[:8])


def test_warmup_then_step_lr_matches_the_plain_step_lr_shifted():
    section = {"name": "StepLR", "step_size": 2, "gamma": 0.5, "interval": "step"}
    warmed_opt, plain_opt = sgd(lr=0.2), sgd(lr=0.2)
    warmed = build_scheduler({**section, "warmup": 3}, warmed_opt, 5, 2)
    plain = build_scheduler(section, plain_opt, 5, 2)
    assert warmed.interval == "step"
    warmed_lrs = lr_curve(warmed, warmed_opt, 10)
    assert warmed_lrs[:3] == pytest.approx([linear_warmup(0.2, t, 3) for t in range(3)])
    assert warmed_lrs[3:] == pytest.approx(lr_curve(plain, plain_opt, 7))


def test_warmup_without_a_scheduler_ramps_then_holds():
    optimizer = sgd(lr=0.3)
    schedule = build_scheduler({"name": None, "warmup": 2}, optimizer, 4, 5)
    assert lr_curve(schedule, optimizer, 5) == pytest.approx(
        [linear_warmup(0.3, 0, 2), 0.15015, 0.3, 0.3, 0.3]
    )


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"name": "ReduceLROnPlateau", "warmup": 2}, "warmup"),
        ({"name": "CosineAnnealingLR", "warmup": 5}, "warmup"),
        ({"name": "StepLR", "step_size": 2, "interval": "epochs"}, "did you mean 'epoch'"),
        ({"name": "StepLR", "step_size": 2, "warmup": 1.5}, "warmup"),
        ({"name": "StepLR", "step_size": 2, "gama": 0.1}, "gama"),
        ({"name": "StepLR", "step_size": "2"}, "step_size"),
        ({"name": "CosineAnnealingWarmRestarts", "T_0": 2.5}, "T_0"),
        ({"name": "MultiStepLR", "milestones": 3}, "milestones"),
        ({"name": "ReduceLROnPlateau", "mode": "minimum"}, "mode"),
        ({"name": "CosineAnnealingWarmupReduceRestarts", "T_0": 4, "T_up": 4}, "T_up"),
        ({"name": "steplr", "step_size": 2}, "'StepLR'"),
    ],
)
def test_bad_scheduler_sections_are_config_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        build_scheduler(section, sgd(), steps_per_epoch=10, epochs=5)


# ------------------------------------------- CosineAnnealingWarmupReduceRestarts


def test_warmup_reduce_restarts_matches_a_hand_computed_curve():
    optimizer = sgd(lr=1.0)
    section = {"name": "CosineAnnealingWarmupReduceRestarts", "T_0": 4, "T_mult": 2}
    section |= {"eta_min": 0.1, "T_up": 1, "gamma": 0.5}
    lrs = lr_curve(build_scheduler(section, optimizer, 1, 14), optimizer, 14)
    # cycle 0: 4 long, peak 1.0; cosine over 3 intervals: (1 + cos(k*pi/3)) / 2 = 1, 0.75, 0.25
    assert lrs[:4] == pytest.approx([0.1, 1.0, 0.775, 0.325])
    # cycle 1: 8 long, peak 0.5; cosine over 7 intervals: 0.1 + 0.4 * (1 + cos(k*pi/7)) / 2
    cycle1 = [0.1, 0.5, 0.480194, 0.424698, 0.344504, 0.255496, 0.175302, 0.119806]
    assert lrs[4:12] == pytest.approx(cycle1, abs=1e-6)
    # cycle 2: 16 long, peak 0.25
    assert lrs[12:] == pytest.approx([0.1, 0.25])


def test_warmup_reduce_restarts_without_warmup_starts_at_the_peak():
    optimizer = sgd(lr=2.0)
    section = {"name": "CosineAnnealingWarmupReduceRestarts", "T_0": 2, "gamma": 0.5}
    lrs = lr_curve(build_scheduler(section, optimizer, 1, 6), optimizer, 6)
    assert lrs == pytest.approx([2.0, 1.0, 1.0, 0.5, 0.5, 0.25])


def resumed_matches_uninterrupted(
    section: dict, steps_per_epoch: int, epochs: int, cut: int, total: int
) -> None:
    """Stop at `cut`, rebuild from config, load both states: the rest of the curve must be identical."""
    model = nn.Linear(2, 1)
    opt_section = {"name": "AdamW", "lr": 0.01, "no_decay_bias_norm": True}
    optimizer = build_optimizer(opt_section, model)
    schedule = build_scheduler(section, optimizer, steps_per_epoch, epochs)
    full = lr_curve(schedule, optimizer, cut)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict()}
    full += lr_curve(schedule, optimizer, total - cut)

    optimizer = build_optimizer(OmegaConf.create(opt_section), model)
    schedule = build_scheduler(OmegaConf.create(section), optimizer, steps_per_epoch, epochs)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    assert lr_curve(schedule, optimizer, total - cut) == full[cut:]


@pytest.mark.parametrize("cut", [1, 3, 7, 12])
def test_warmup_reduce_restarts_resumes_the_exact_curve(cut):
    section = {"name": "CosineAnnealingWarmupReduceRestarts", "T_0": 3, "T_mult": 2, "T_up": 1, "gamma": 0.7}
    resumed_matches_uninterrupted(section, steps_per_epoch=1, epochs=20, cut=cut, total=20)


@pytest.mark.parametrize("cut", [2, 5])
def test_warmup_sequence_resumes_the_exact_curve(cut):
    section = {"name": "CosineAnnealingLR", "warmup": 3, "eta_min": 1e-4}
    resumed_matches_uninterrupted(section, steps_per_epoch=4, epochs=10, cut=cut, total=10)


def test_resuming_with_more_epochs_stretches_a_run_length_schedule():
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler({"name": "CosineAnnealingLR"}, optimizer, 1, 10)
    lr_curve(schedule, optimizer, 5)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict()}

    optimizer = sgd(lr=1.0)
    schedule = build_scheduler({"name": "CosineAnnealingLR"}, optimizer, 1, 20)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    assert schedule.scheduler.T_max == 20
    assert schedule.scheduler.last_epoch == 5
    lrs = lr_curve(schedule, optimizer, 16)
    assert lrs[0] == pytest.approx(0.5)  # continues from where the first run stopped
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # and now reaches eta_min at epoch 20


def test_resuming_one_cycle_with_more_epochs_does_not_overrun():
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler({"name": "OneCycleLR"}, optimizer, 2, 2)
    lr_curve(schedule, optimizer, 4)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict()}
    optimizer = sgd(lr=1.0)
    schedule = build_scheduler({"name": "OneCycleLR"}, optimizer, 2, 4)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    assert schedule.scheduler.total_steps == 8
    lr_curve(schedule, optimizer, 4)  # past the first run's 4 steps


# ------------------------------------------------------- the guide's YAML blocks


def alternatives(block: str) -> list:
    """Each alternative of a guide block that lists several, as a config."""
    return [OmegaConf.create(part) for part in guide_alternatives(block)]


def test_guide_optimizer_blocks_build():
    blocks = alternatives(OPTIMIZER_SELECTION) + alternatives(SCHEDULE_FREE)
    built = [build_optimizer(cfg.optimizer, tiny_model()) for cfg in blocks]
    assert [type(o).__name__ for o in built] == ["AdamW", "SGD", "Lion", "AdamWScheduleFree"]
    assert built[1].param_groups[0]["weight_decay"] == 1e-4
    assert built[2].param_groups[0]["betas"] == [0.9, 0.99]
    assert built[3].param_groups[0]["warmup_steps"] == 1000


def test_guide_scheduler_blocks_build():
    blocks = alternatives(COMMON_SCHEDULERS) + alternatives(WARMUP_SCHEDULE)
    names = []
    for cfg in blocks:
        optimizer = sgd(lr=0.1)
        schedule = build_scheduler(cfg.lr_scheduler, optimizer, steps_per_epoch=10, epochs=100)
        names.append(type(schedule.scheduler).__name__)
        lr_curve(schedule, optimizer, 3)
    assert names == [
        "CosineAnnealingWarmRestarts",
        "StepLR",
        "ReduceLROnPlateau",
        "CosineAnnealingWarmupReduceRestarts",
    ]


# ------------------------------------------------------------- shipped defaults


@pytest.mark.parametrize(
    "path", sorted((ROOT / "config/__base__/optimizer").glob("*.yaml")), ids=lambda p: p.stem
)
def test_base_optimizer_files_build(path):
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"optimizer"}
    assert cfg.optimizer.name == path.stem
    assert type(build_optimizer(cfg.optimizer, tiny_model())).__name__ == path.stem


@pytest.mark.parametrize(
    "path", sorted((ROOT / "config/__base__/lr_scheduler").glob("*.yaml")), ids=lambda p: p.stem
)
def test_base_scheduler_files_build(path):
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"lr_scheduler"}
    assert cfg.lr_scheduler.name == path.stem
    optimizer = sgd(lr=0.1)
    schedule = build_scheduler(cfg.lr_scheduler, optimizer, steps_per_epoch=10, epochs=100)
    assert type(schedule.scheduler).__name__ == path.stem
    lr_curve(schedule, optimizer, 3)
