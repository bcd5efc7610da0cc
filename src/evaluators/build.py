"""Build the config's evaluator, with the class count and the metrics the run asks for."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from src.arguments import accepts
from src.config.sections import component_args
from src.errors import ConfigError
from src.registry import EVALUATOR_REGISTRY


def build_evaluator(cfg: DictConfig, num_classes: int | None) -> Any:
    """`cfg.evaluator` built; the classification evaluator needs the class count, from the data or the config."""
    args = component_args(cfg.evaluator, "evaluator")
    if args.get("name") == "classification_evaluator" and "num_classes" not in args:
        if num_classes is None:
            raise ConfigError(
                "evaluator.num_classes is needed: the dataset does not say how many classes it has"
            )
        args["num_classes"] = num_classes
    if accepts(EVALUATOR_REGISTRY.get(args["name"]), "metrics"):
        return EVALUATOR_REGISTRY.build(args, metrics=list(cfg.evaluation.metrics))
    return EVALUATOR_REGISTRY.build(args)
