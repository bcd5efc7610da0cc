"""One small registry class: names to constructors, with checked keyword arguments."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from src.arguments import check_arguments
from src.config.sections import to_plain
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
        kwargs = to_plain(section)
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


MODEL_REGISTRY = Registry("model")
DATASET_REGISTRY = Registry("dataset")
TRANSFORM_REGISTRY = Registry("transform")
OPTIMIZER_REGISTRY = Registry("optimizer")
LR_SCHEDULER_REGISTRY = Registry("lr_scheduler")
EVALUATOR_REGISTRY = Registry("evaluator")
LOSS_REGISTRY = Registry("loss")
