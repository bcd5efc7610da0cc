"""The built-in `classification_evaluator`: torchmetrics multiclass metrics plus a confusion matrix.

Every metric is a torchmetrics object, so `compute()` and `confusion_matrix()` sum the states of
all ranks when a process group is running; call them on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from src.errors import ConfigError, RunError, did_you_mean
from src.evaluators.base import BaseEvaluator
from src.registry import EVALUATOR_REGISTRY

METRICS = ("accuracy", "f1_score", "precision", "recall", "top_k")
AVERAGES = ("macro", "micro", "weighted")


@EVALUATOR_REGISTRY.register("classification_evaluator")
class ClassificationEvaluator(BaseEvaluator):
    """Accuracy, F1, precision, recall and top-k accuracy of logits (N, C) against class ids (N,).

    `average` applies to f1_score, precision and recall; accuracy is always the plain fraction of
    correct predictions. "top_k" is reported as "top{k}_accuracy".
    """

    def __init__(
        self,
        num_classes: int,
        average: str = "macro",
        metrics: Sequence[str] = ("accuracy",),
        top_k: int = 5,
    ) -> None:
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        if isinstance(metrics, str):
            metrics = [metrics]
        super().__init__(list(dict.fromkeys(metrics)))
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"evaluator.num_classes must be an integer >= 2, got {num_classes!r}")
        if average not in AVERAGES:
            raise ConfigError(
                f"evaluator.average '{average}' is not supported{did_you_mean(str(average), AVERAGES)}; "
                f"use one of {', '.join(AVERAGES)}"
            )
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"evaluator.top_k must be a positive integer, got {top_k!r}")
        for name in self.metrics:
            if name not in METRICS:
                raise ConfigError(
                    f"classification_evaluator has no metric '{name}'{did_you_mean(name, METRICS)} "
                    f"(evaluation.metrics); it knows: {', '.join(METRICS)}"
                )
        self.num_classes = num_classes
        self.average = average
        self.top_k = top_k
        # Argument checks inside torchmetrics sync with the device on every batch; update() checks once.
        common = {"num_classes": num_classes, "validate_args": False}
        classes = {
            "accuracy": MulticlassAccuracy,
            "f1_score": MulticlassF1Score,
            "precision": MulticlassPrecision,
            "recall": MulticlassRecall,
        }
        self._metrics: dict[str, torch.nn.Module] = {}
        for name in self.metrics:
            if name == "top_k":  # torchmetrics refuses k > num_classes; any k >= num_classes is always right
                k = min(top_k, num_classes)
                self._metrics[f"top{top_k}_accuracy"] = MulticlassAccuracy(average="micro", top_k=k, **common)
            else:
                mode = "micro" if name == "accuracy" else average
                self._metrics[name] = classes[name](average=mode, **common)
        self._confmat = MulticlassConfusionMatrix(**common)
        self._device: torch.device | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise RunError(
                f"classification_evaluator expects logits of shape (N, {self.num_classes}) but got "
                f"{tuple(outputs.shape)}; check evaluator.num_classes and the model's num_classes"
            )
        if self._device is None:
            _check_targets(targets, self.num_classes)
        if outputs.device != self._device:
            for metric in self._all():
                metric.to(outputs.device)
            self._device = outputs.device
        outputs, targets = outputs.detach(), targets.detach()
        for metric in self._all():
            metric.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        # Rounded to float32's 7 significant digits: a perfect f1 reads 1.0, not 1.0000001 (float32 noise).
        return {key: float(f"{float(metric.compute()):.7g}") for key, metric in self._metrics.items()}

    def reset(self) -> None:
        for metric in self._all():
            metric.reset()

    def confusion_matrix(self) -> torch.Tensor:
        """Counts (num_classes x num_classes) on the CPU: row = true class, column = predicted class."""
        return self._confmat.compute().cpu()

    def report(self, class_names: Sequence[str] | None = None) -> str:
        """A plain-text per-class precision/recall/f1/support table with accuracy and averages."""
        return classification_report(self.confusion_matrix(), class_names)

    def _all(self) -> list[torch.nn.Module]:
        return [*self._metrics.values(), self._confmat]


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """Once per evaluator: class ids outside [0, num_classes) would otherwise fail obscurely later."""
    if targets.ndim != 1 or targets.is_floating_point():
        raise RunError(
            f"classification_evaluator expects integer class ids of shape (N,), got {targets.dtype} "
            f"of shape {tuple(targets.shape)}"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise RunError(
            f"class ids must lie in [0, {num_classes}) but range over [{int(targets.min())}, "
            f"{int(targets.max())}]; check evaluator.num_classes and the dataset's labels"
        )


def classification_report(confmat: torch.Tensor, class_names: Sequence[str] | None = None) -> str:
    """Per-class precision, recall, f1 and support from a confusion matrix (rows = true class)."""
    cm = confmat.double()
    n = cm.shape[0]
    names = [str(i) for i in range(n)] if class_names is None else [str(c) for c in class_names]
    if len(names) != n:
        raise RunError(f"report() got {len(names)} class names for a {n}-class confusion matrix")
    tp = cm.diag()
    support = cm.sum(1)
    precision = _ratio(tp, cm.sum(0))
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    total = support.sum()
    accuracy = float(tp.sum() / total) if total > 0 else 0.0

    width = max(12, *(len(s) for s in names))
    lines = [f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    for i, name in enumerate(names):
        lines.append(
            f"{name:>{width}} {precision[i]:9.4f} {recall[i]:9.4f} {f1[i]:9.4f} {int(support[i]):9d}"
        )
    weights = support / total if total > 0 else torch.zeros_like(support)
    # Like torchmetrics' macro average: classes never present nor predicted do not count.
    seen = (support + cm.sum(0)) > 0
    macro = [float(v[seen].mean()) if seen.any() else 0.0 for v in (precision, recall, f1)]
    lines += [
        "",
        f"{'accuracy':>{width}} {'':>9} {'':>9} {accuracy:9.4f} {int(total):9d}",
        f"{'macro avg':>{width}} {macro[0]:9.4f} {macro[1]:9.4f} {macro[2]:9.4f} {int(total):9d}",
        f"{'weighted avg':>{width}} {(precision * weights).sum():9.4f} {(recall * weights).sum():9.4f} "
        f"{(f1 * weights).sum():9.4f} {int(total):9d}",
    ]
    return "\n".join(lines) + "\n"


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den is 0 (a class never predicted or never present)."""
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))
