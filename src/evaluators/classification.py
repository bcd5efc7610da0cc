"""The built-in `classification_evaluator`: multiclass metrics from one confusion matrix.

Accuracy, F1, precision and recall all follow from the confusion matrix (plus a count of top-k
hits), so the evaluator keeps just those two tensors on the outputs' device: `update` adds one
bincount per batch, `reset` zeroes them, `compute` sums them over ranks (one all-reduce) and
derives every metric, with torchmetrics' conventions (a class never present nor predicted does not
count in a macro average; 0 where a ratio's denominator is 0). Plain torch, so building it imports
nothing heavy and a validation's fixed cost is a handful of small tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

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
        self._confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._top_hits = torch.zeros((), dtype=torch.int64)
        self._checked = False

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
            raise RunError(
                f"classification_evaluator expects logits of shape (N, {self.num_classes}) but got "
                f"{tuple(outputs.shape)}; check evaluator.num_classes and the model's num_classes"
            )
        if not self._checked:  # once: reading the targets' range syncs with the device
            _check_targets(targets, self.num_classes)
            self._checked = True
        outputs, targets = outputs.detach(), targets.detach().long()
        if self._confmat.device != outputs.device:
            self._confmat = self._confmat.to(outputs.device)
            self._top_hits = self._top_hits.to(outputs.device)
        n = self.num_classes
        cells = targets * n + outputs.argmax(1)
        self._confmat += torch.bincount(cells, minlength=n * n).view(n, n)
        if "top_k" in self.metrics and self.top_k < n:
            top = outputs.topk(self.top_k, dim=1).indices
            self._top_hits += (top == targets[:, None]).any(1).sum()

    def compute(self) -> dict[str, float]:
        cm, top_hits = self._reduced()
        cm = cm.double()
        tp = cm.diag()
        predicted, support = cm.sum(0), cm.sum(1)
        total = support.sum()
        # Rounded to float32's 7 significant digits: a perfect f1 reads 1.0, not 1.0000001 (float noise).
        results: dict[str, float] = {}
        for name in self.metrics:
            if name == "accuracy":
                results[name] = float(_ratio(tp.sum(), total))
            elif name == "top_k":
                hits = total if self.top_k >= self.num_classes else top_hits.double()
                results[f"top{self.top_k}_accuracy"] = float(_ratio(hits, total))
            else:
                results[name] = float(self._averaged(name, tp, predicted, support))
        return {key: float(f"{value:.7g}") for key, value in results.items()}

    def reset(self) -> None:
        self._confmat.zero_()
        self._top_hits.zero_()

    def confusion_matrix(self) -> torch.Tensor:
        """Counts (num_classes x num_classes) on the CPU: row = true class, column = predicted class."""
        return self._reduced()[0].cpu()

    def report(self, class_names: Sequence[str] | None = None) -> str:
        """A plain-text per-class precision/recall/f1/support table with accuracy and averages."""
        return classification_report(self.confusion_matrix(), class_names)

    def _reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts summed over every rank (a copy: the local counts stay this rank's own)."""
        flat = torch.cat([self._confmat.flatten(), self._top_hits.view(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and not flat.is_cuda:
                flat = flat.cuda()
            flat = flat.clone()
            dist.all_reduce(flat)
        n = self.num_classes
        return flat[: n * n].view(n, n), flat[n * n]

    def _averaged(
        self, name: str, tp: torch.Tensor, predicted: torch.Tensor, support: torch.Tensor
    ) -> torch.Tensor:
        if self.average == "micro":  # single-label: micro precision = recall = f1 = accuracy
            return _ratio(tp.sum(), support.sum())
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        score = {"precision": precision, "recall": recall, "f1_score": _ratio(2 * tp, predicted + support)}[
            name
        ]
        if self.average == "weighted":
            return (score * support).sum() / support.sum().clamp(min=1)
        seen = (predicted + support) > 0  # macro: classes never present nor predicted do not count
        return score[seen].mean() if bool(seen.any()) else torch.zeros((), dtype=score.dtype)


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
