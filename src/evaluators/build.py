"""Build the config's evaluator, with the class count and the metrics the run asks for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from src.arguments import accepts
from src.config.sections import component_args
from src.errors import ConfigError
from src.registry import EVALUATOR_REGISTRY


def build_evaluator(section: Any, num_classes: int | None, metrics: Sequence[str]) -> Any:
    """The `evaluator` section built; the classification evaluator needs the class count, from the data or
    the config. `metrics` (evaluation.metrics) go to an evaluator that takes them."""
    args = component_args(section, "evaluator")
    if args.get("name") == "classification_evaluator" and "num_classes" not in args:
        if num_classes is None:
            raise ConfigError(
                "evaluator.num_classes is needed: the dataset does not say how many classes it has"
            )
        args["num_classes"] = num_classes
    if accepts(EVALUATOR_REGISTRY.get(args["name"]), "metrics"):
        return EVALUATOR_REGISTRY.build(args, metrics=list(metrics))
    return EVALUATOR_REGISTRY.build(args)
