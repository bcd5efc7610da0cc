"""Optimizers by the names PyTorch users know, and `build_optimizer` that turns a config section into one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import schedulefree
import torch
from lion_pytorch import Lion
from torch import nn

from src.arguments import check_types
from src.config.sections import section_args
from src.errors import ConfigError
from src.registry import OPTIMIZER_REGISTRY, Registry

for _name in ("SGD", "Adam", "AdamW", "RAdam", "NAdam", "RMSprop", "Adagrad", "Adadelta", "Adamax"):
    OPTIMIZER_REGISTRY.add(_name, getattr(torch.optim, _name))
OPTIMIZER_REGISTRY.add("Lion", Lion)
for _name in ("AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"):
    OPTIMIZER_REGISTRY.add(_name, getattr(schedulefree, _name))

# Every parameter of these layers is a scale or a shift; decaying them towards zero only hurts.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def build_optimizer(section: Mapping[str, Any] | str, model: nn.Module) -> torch.optim.Optimizer:
    """Build `section['name']` over the model's trainable parameters.

    `no_decay_bias_norm: true` moves biases, normalization parameters and every 1-D parameter into a
    second group with `weight_decay=0`, the usual recipe for transformers and modern CNNs.
    """
    kwargs = section_args(section, "optimizer")
    no_decay = kwargs.pop("no_decay_bias_norm", False)
    group_specs = kwargs.pop("param_groups", None) or []
    if not isinstance(no_decay, bool):
        raise ConfigError(f"optimizer.no_decay_bias_norm must be true or false, got {no_decay!r}")
    name = kwargs.get("name")
    if not name:
        raise ConfigError("the optimizer section needs a 'name', e.g. `optimizer: {name: AdamW, lr: 0.001}`")
    check_types(lookup(OPTIMIZER_REGISTRY, name), kwargs, where=f"optimizer '{name}'")

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters for the optimizer; unfreeze some layers")
    groups: list[dict[str, Any]] = []
    if group_specs:  # optimizer.param_groups: layer-wise settings; the rest keep the top-level ones
        from src.optim.param_groups import split_groups

        opt_cls = lookup(OPTIMIZER_REGISTRY, name)
        groups, named = split_groups(named, group_specs, lambda s, where: _check_group(opt_cls, s, where))
    if not named:
        params: list[Any] = groups
    elif no_decay:
        skip = set(_no_decay_ids(model))
        decay = [p for n, p in named if id(p) not in skip and not n.endswith("bias") and p.ndim > 1]
        kept = {id(p) for p in decay}
        plain = [p for _, p in named if id(p) not in kept]
        params = [{"params": decay, "name": "default"}] if decay else []
        if plain:
            params.append({"params": plain, "weight_decay": 0.0, "name": "no_decay"})
        params += groups
    else:
        params = (
            [{"params": [p for _, p in named], "name": "default"}, *groups]
            if groups
            else [p for _, p in named]
        )
    try:
        return OPTIMIZER_REGISTRY.build(kwargs, params=params)
    except AssertionError as err:  # lion-pytorch validates with assert
        given = {k: v for k, v in kwargs.items() if k != "name"}
        raise ConfigError(
            f"optimizer '{name}' rejected {given}: {str(err) or 'a value is out of range'}"
        ) from err


def _check_group(opt_cls: Callable[..., Any], settings: dict[str, Any], where: str) -> None:
    """A group may set what the optimizer's constructor takes (lr, weight_decay, betas, ...), nothing else."""
    try:
        accepted = [k for k in inspect.signature(opt_cls).parameters if k != "params"]
    except (TypeError, ValueError):
        return
    for key in settings:
        if key not in accepted:
            from src.errors import did_you_mean

            raise ConfigError(
                f"{where}: '{key}' is not a setting of the optimizer{did_you_mean(key, accepted)}; "
                f"a group takes 'params' and any of {', '.join(accepted)}"
            )
    check_types(opt_cls, settings, where=where)


def _no_decay_ids(model: nn.Module) -> Iterator[int]:
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            for p in module.parameters(recurse=False):
                yield id(p)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and expose train()/eval() to swap them."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def set_optimizer_mode(optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Put a schedule-free optimizer's weights in train or eval form; other optimizers have no modes."""
    if is_schedule_free(optimizer):
        if train:
            optimizer.train()
        else:
            optimizer.eval()


def lookup(registry: Registry, name: str) -> Callable[..., Any]:
    """`registry.get`, but a name that differs only in case is pointed at ("Adamw" -> "AdamW")."""
    if name not in registry:
        same = [n for n in registry.names() if n.lower() == str(name).lower()]
        if same:
            raise ConfigError(
                f"unknown {registry.name} '{name}' (did you mean '{same[0]}'?); names are case-sensitive"
            )
    return registry.get(name)
