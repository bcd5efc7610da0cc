"""The template's code. `from src import MODEL_REGISTRY` (or any registry) registers every built-in component.

The registries load on first access, so `import src` alone stays cheap: `--help` and configuration
errors answer before torch is imported.
"""

from typing import Any

REGISTRIES = (
    "DATASET_REGISTRY",
    "EVALUATOR_REGISTRY",
    "LOSS_REGISTRY",
    "LR_SCHEDULER_REGISTRY",
    "MODEL_REGISTRY",
    "OPTIMIZER_REGISTRY",
    "TRANSFORM_REGISTRY",
)

__all__ = [*REGISTRIES, "Registry", "register_builtins"]


def register_builtins() -> None:
    """Import every package that registers components."""
    from src import data, evaluators, models, optim  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in REGISTRIES or name == "Registry":
        register_builtins()
        from src import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'src' has no attribute {name!r}")
