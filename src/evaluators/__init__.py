"""Evaluators: `update(outputs, targets)`, `compute() -> dict[str, float]`, `reset()`, correct across ranks.

Importing this package registers the built-in `classification_evaluator`. A custom one subclasses
BaseEvaluator and registers itself with `@EVALUATOR_REGISTRY.register("my_evaluator")`.

May import config, registry and errors only.
"""

from src.evaluators.base import BaseEvaluator
from src.evaluators.build import build_evaluator
from src.evaluators.classification import ClassificationEvaluator, classification_report
from src.registry import EVALUATOR_REGISTRY

__all__ = [
    "EVALUATOR_REGISTRY",
    "BaseEvaluator",
    "ClassificationEvaluator",
    "build_evaluator",
    "classification_report",
]
