"""The one checker of config values against Python annotations, for constructors and the schema alike.

A YAML value is None, a bool, a number, a string, a list or a mapping; `conform` says whether it
fits an annotation (`int`, `float | None`, `tuple[float, float]`, `Literal[...]`, ...) in one of
three ways:

- "strict" (optimizers, schedulers): the type must match; `amsgrad: "false"` or `lr: true` is refused.
- "loose" (every other registered constructor): only plain mistakes are refused (text for a number,
  a list for a flag); anything the check cannot judge is left to the constructor.
- "coerce" (the config schema): the value is made to fit where that loses nothing (1 -> 1.0,
  16 -> "16", "a,b" -> ["a", "b"]).

Nothing here imports torch or OmegaConf, so registries and the config loader can both use it.
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from src.errors import ConfigError, did_you_mean

Mode = Literal["strict", "loose", "coerce"]
NO_FIT = object()  # what `conform` returns for a value that cannot be of the type

_SIMPLE = (bool, int, float, str)
_SEQUENCES = (
    list,
    tuple,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Iterable,
)


def conform(value: Any, tp: Any, mode: Mode) -> Any:
    """`value` as it fits the annotation `tp` (changed only in "coerce" mode), or NO_FIT."""
    if tp is Any:
        return value
    if mode == "loose" and (value is None or _simple_kinds(tp) is None):
        return value  # a None, or an annotation richer than plain scalars: the constructor judges
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            fixed = conform(value, arg, mode)
            if fixed is not NO_FIT:
                return fixed
        return NO_FIT
    if origin is typing.Literal:
        return value if value in args else NO_FIT
    if tp is None or tp is type(None):
        return value if value is None else NO_FIT
    if tp in _SIMPLE:
        return _scalar(value, tp, mode)
    if _is_tensor(tp):
        return value if isinstance(value, tp) else NO_FIT
    if (origin or tp) in _SEQUENCES:
        return _sequence(value, origin, args, mode)
    if origin is dict and mode == "coerce":
        return value if isinstance(value, dict) else NO_FIT
    return value  # a type this check cannot read is trusted to the constructor


def _scalar(value: Any, tp: type, mode: Mode) -> Any:
    is_bool = isinstance(value, bool)
    is_number = isinstance(value, (int, float)) and not is_bool
    if mode == "loose":  # flags and numbers go anywhere a plain value does; text only where text does
        return value if is_bool or is_number or (isinstance(value, str) and tp is str) else NO_FIT
    if tp is bool:
        return value if is_bool else NO_FIT
    if tp is int:
        return value if isinstance(value, int) and not is_bool else NO_FIT
    if tp is float:
        if not is_number:
            return NO_FIT
        return float(value) if mode == "coerce" else value
    if mode == "coerce":  # str
        return str(value) if isinstance(value, str) or is_number else NO_FIT
    return value if isinstance(value, str) else NO_FIT


def _sequence(value: Any, origin: Any, args: tuple, mode: Mode) -> Any:
    if mode == "coerce":  # the schema's lists: `imports=mypkg` or `evaluation.metrics=accuracy,f1`
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return NO_FIT
    if not isinstance(value, (list, tuple)):
        return NO_FIT
    if origin is tuple and args and args[-1] is not Ellipsis:
        fits = len(value) == len(args) and all(
            conform(v, a, mode) is not NO_FIT for v, a in zip(value, args, strict=True)
        )
    else:
        fits = not args or all(conform(v, args[0], mode) is not NO_FIT for v in value)
    return value if fits else NO_FIT


def _simple_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (int, `float | None`, ...), or None when it is anything richer."""
    if annotation in _SIMPLE:
        return (annotation,)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(annotation)
    if all(a in _SIMPLE or a is type(None) for a in args):
        return tuple(a for a in args if a is not type(None))
    return None


def _is_tensor(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "Tensor" and tp.__module__.startswith("torch")


def check_arguments(obj: Callable, kwargs: Mapping[str, Any], context: Mapping[str, Any], where: str) -> None:
    """Refuse unknown, missing and plainly mistyped keyword arguments before calling `obj`."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # some builtins have no signature: let the call speak
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not takes_any:
        for key in kwargs:
            if key not in named:
                accepted = sorted(named - set(context))
                raise ConfigError(
                    f"{where} has no argument '{key}'{did_you_mean(str(key), accepted)}; "
                    f"it accepts: {', '.join(accepted) or 'nothing'}"
                )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in kwargs
        and n not in context
    ]
    if missing:
        raise ConfigError(
            f"{where} needs the argument(s) {', '.join(missing)}; add them to its config section"
        )
    check_types(obj, kwargs, where, mode="loose")


def check_types(
    obj: Callable[..., Any], kwargs: Mapping[str, Any], where: str, mode: Mode = "strict"
) -> None:
    """Refuse a value that cannot match the constructor's annotation, naming the key.

    Without this a YAML string such as `amsgrad: "false"` is truthy and silently turns the option on.
    Annotations this check cannot read are trusted to the constructor.
    """
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    for key, value in kwargs.items():
        param = params.get(key)
        if param is None or param.annotation is param.empty:
            continue
        annotation = _resolve(obj, param.annotation)
        if annotation is NO_FIT or conform(value, annotation, mode) is not NO_FIT:
            continue
        if mode == "loose":
            names = " or ".join(k.__name__ for k in _simple_kinds(annotation) or ())
            raise ConfigError(f"{where} rejected its arguments: '{key}' must be {names}, got {value!r}")
        wanted = (
            param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(annotation)
        )
        raise ConfigError(f"{where}: {key}={value!r} is a {type(value).__name__}, but it must be {wanted}")


def _resolve(obj: Callable[..., Any], annotation: Any) -> Any:
    """A `from __future__ import annotations` string evaluated where `obj` was defined, or NO_FIT."""
    if not isinstance(annotation, str):
        return annotation
    func = obj.__init__ if isinstance(obj, type) else obj
    namespace = {**vars(typing), **vars(collections.abc)}
    torch = sys.modules.get("torch")  # loaded whenever a torch constructor is checked
    if torch is not None:
        namespace.update(torch=torch, Tensor=torch.Tensor)
    namespace.update(getattr(func, "__globals__", {}))
    try:
        return eval(annotation, namespace)
    except Exception:
        return NO_FIT


def accepts(obj: Any, name: str) -> bool:
    """Whether a constructor takes the keyword `name` (or any keyword)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
