"""Optimizers by the names PyTorch users know, and `build_optimizer` that turns a config section into one."""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import schedulefree
import torch
from lion_pytorch import Lion
from torch import nn

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
    kwargs = section_dict(section, "optimizer")
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
        params = [{"params": decay}] if decay else []
        if plain:
            params.append({"params": plain, "weight_decay": 0.0})
        params += groups
    else:
        params = [{"params": [p for _, p in named]}, *groups] if groups else [p for _, p in named]
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


def section_dict(section: Any, what: str) -> dict[str, Any]:
    """A fresh plain dict from a DictConfig, a mapping, a bare name or None."""
    if section is None:
        return {}
    if isinstance(section, str):
        return {"name": section}
    if hasattr(section, "_metadata"):  # OmegaConf DictConfig, imported lazily
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, Mapping):
        raise ConfigError(f"the {what} section must be a mapping with a 'name', got {section!r}")
    return dict(section)


def check_types(obj: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse a value that cannot match the constructor's annotation, naming the key.

    Without this a YAML string such as `amsgrad: "false"` is truthy and silently turns the option on.
    Annotations this check cannot read are trusted to the constructor.
    """
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    func = obj.__init__ if isinstance(obj, type) else obj
    namespace = {
        **vars(typing),
        **vars(collections.abc),
        "torch": torch,
        "Tensor": torch.Tensor,
        **getattr(func, "__globals__", {}),
    }
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or param.annotation is param.empty:
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)
            except Exception:
                continue
        if not _accepts(value, annotation):
            wanted = (
                param.annotation
                if isinstance(param.annotation, str)
                else inspect.formatannotation(annotation)
            )
            raise ConfigError(
                f"{where}: {key}={value!r} is a {type(value).__name__}, but it must be {wanted}"
            )


_SEQUENCES = (
    list,
    tuple,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Iterable,
)


def _accepts(value: Any, tp: Any) -> bool:
    """Whether a config value (None, bool, number, str, list) can be of type `tp`; unknown types pass."""
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is None or tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is torch.Tensor:
        return isinstance(value, torch.Tensor)
    if (origin or tp) in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_accepts, value, args))
        return not args or all(_accepts(v, args[0]) for v in value)
    return True
