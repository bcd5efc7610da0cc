"""One small registry class: names to constructors, with checked keyword arguments."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from src.errors import ConfigError, did_you_mean


class Registry:
    """Maps names to classes or functions; `build` calls one with the keys of a config section."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable], Callable]:
        """Decorator: `@REG.register()` uses the object's own name, `@REG.register("x")` uses x."""
        if callable(name) and not isinstance(name, str):
            raise TypeError(f"use @{self.name}.register() with parentheses")

        def decorator(obj: Callable) -> Callable:
            self.add(name or obj.__name__, obj)
            return obj

        return decorator

    def add(self, name: str, obj: Callable[..., Any]) -> None:
        if name in self._items and self._items[name] is not obj:
            raise KeyError(f"{self.name}: the name '{name}' is already registered by {self._items[name]!r}")
        self._items[name] = obj

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.name} '{name}'{did_you_mean(str(name), self._items)}; "
                f"see `python script/show_registers.py` for every registered name"
            )
        return self._items[name]

    def build(self, section: Mapping[str, Any] | str, **context: Any) -> Any:
        """Call the registered `section['name']` with the section's other keys plus `context`.

        The section's keys are checked against the constructor's signature first, so a typo is
        reported by name instead of as a TypeError deep inside the constructor.
        """
        kwargs = _plain(section)
        if isinstance(kwargs, str):
            kwargs = {"name": kwargs}
        if not isinstance(kwargs, dict) or not kwargs.get("name"):
            raise ConfigError(f"{self.name}: the section needs a 'name' key, got {kwargs!r}")
        name = kwargs.pop("name")
        obj = self.get(name)
        check_arguments(obj, kwargs, context, where=f"{self.name} '{name}'")
        try:
            return obj(**kwargs, **context)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.name} '{name}' rejected its arguments {kwargs}: {err}") from err

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self)} entries)"


def check_arguments(obj: Callable, kwargs: Mapping[str, Any], context: Mapping[str, Any], where: str) -> None:
    """Refuse unknown, missing and plainly mistyped keyword arguments before calling `obj`."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: let the call speak
        return
    with contextlib.suppress(Exception):  # resolve `from __future__ import annotations` strings
        sig = inspect.signature(obj, eval_str=True)
    params = sig.parameters
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
    for key, value in kwargs.items():
        expected = _simple_kinds(params[key].annotation) if key in params else None
        if expected and value is not None and not _fits(value, expected):
            names = " or ".join(k.__name__ for k in expected)
            raise ConfigError(f"{where} rejected its arguments: '{key}' must be {names}, got {value!r}")


def accepts(obj: Any, name: str) -> bool:
    """Whether a constructor takes the keyword `name` (or any keyword)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


_SIMPLE = (bool, int, float, str)


def _simple_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (int, `float | None`, ...), or None when it is anything richer."""
    import types
    import typing

    if annotation in _SIMPLE:
        return (annotation,)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(annotation)
    if all(a in _SIMPLE or a is type(None) for a in args):
        return tuple(a for a in args if a is not type(None))
    return None


def _fits(value: Any, kinds: tuple[type, ...]) -> bool:
    """Only plain mistakes count (text for a number, a list for a flag): anything else is left to the call."""
    if isinstance(value, bool):
        return True  # flags given to numbers stay the constructor's business
    if isinstance(value, (int, float)):
        return any(k in (int, float, bool) for k in kinds) or str in kinds
    if isinstance(value, str):
        return str in kinds
    return False  # a list or mapping where a plain value belongs


def _plain(section: Any) -> Any:
    """A plain dict/str from an OmegaConf node or a mapping, without importing OmegaConf eagerly."""
    if hasattr(section, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(section, resolve=True)
    if isinstance(section, Mapping):
        return dict(section)
    return section


MODEL_REGISTRY = Registry("model")
DATASET_REGISTRY = Registry("dataset")
TRANSFORM_REGISTRY = Registry("transform")
OPTIMIZER_REGISTRY = Registry("optimizer")
LR_SCHEDULER_REGISTRY = Registry("lr_scheduler")
EVALUATOR_REGISTRY = Registry("evaluator")
LOSS_REGISTRY = Registry("loss")
