"""Evaluators against hand-computed numbers, their errors, and their cross-rank sync over gloo."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.errors import ConfigError, RunError
from src.evaluators import EVALUATOR_REGISTRY, BaseEvaluator, ClassificationEvaluator
from src.registry import Registry

# Six samples, three classes. Predictions (argmax): 0 1 | 1 1 | 2 0; the last sample's true class 2
# is not even in its top 2, every other sample has its true class in its top 2.
LOGITS = torch.tensor(
    [[3.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 3.0, 1.0], [1.0, 3.0, 0.0], [0.0, 1.0, 3.0], [3.0, 2.0, 0.0]]
)
TARGETS = torch.tensor([0, 0, 1, 1, 2, 2])
# rows = true class, columns = predicted class
CONFMAT = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
PRECISION = [1 / 2, 2 / 3, 1 / 1]  # diagonal / column sums
RECALL = [1 / 2, 2 / 2, 1 / 2]  # diagonal / row sums
F1 = [2 * p * r / (p + r) for p, r in zip(PRECISION, RECALL, strict=True)]
ALL = ["accuracy", "f1_score", "precision", "recall", "top_k"]


def _evaluator(**kwargs) -> ClassificationEvaluator:
    metrics = kwargs.pop("metrics", ALL)
    return EVALUATOR_REGISTRY.build(
        {"name": "classification_evaluator", "num_classes": 3, **kwargs}, metrics=metrics
    )


def test_macro_metrics_match_hand_computation() -> None:
    ev = _evaluator(top_k=2)
    ev.update(LOGITS[:4], TARGETS[:4])  # two batches give the same as one
    ev.update(LOGITS[4:], TARGETS[4:])
    got = ev.compute()
    assert set(got) == {"accuracy", "f1_score", "precision", "recall", "top2_accuracy"}
    assert all(isinstance(v, float) for v in got.values())
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["precision"] == pytest.approx(sum(PRECISION) / 3)
    assert got["recall"] == pytest.approx(sum(RECALL) / 3)
    assert got["f1_score"] == pytest.approx(sum(F1) / 3)
    assert got["top2_accuracy"] == pytest.approx(5 / 6)
    assert ev.confusion_matrix().tolist() == CONFMAT


def test_weighted_and_micro_averages() -> None:
    # Drop sample 0 so supports differ: class 0 has 1 sample, classes 1 and 2 have 2.
    logits, targets = LOGITS[1:], TARGETS[1:]
    precision, recall = [0 / 1, 2 / 3, 1 / 1], [0 / 1, 2 / 2, 1 / 2]
    f1 = [0.0, 0.8, 2 / 3]
    weights = [1 / 5, 2 / 5, 2 / 5]
    weighted = _evaluator(average="weighted")
    weighted.update(logits, targets)
    got = weighted.compute()
    assert got["precision"] == pytest.approx(sum(w * p for w, p in zip(weights, precision, strict=True)))
    assert got["recall"] == pytest.approx(sum(w * r for w, r in zip(weights, recall, strict=True)))
    assert got["f1_score"] == pytest.approx(sum(w * f for w, f in zip(weights, f1, strict=True)))

    micro = _evaluator(average="micro")
    micro.update(logits, targets)
    got = micro.compute()
    assert got["precision"] == got["recall"] == got["f1_score"] == pytest.approx(3 / 5)
    assert got["accuracy"] == pytest.approx(3 / 5)


def test_top_k_at_or_above_num_classes_is_one() -> None:
    ev = _evaluator(metrics=["top_k"], top_k=5)
    ev.update(LOGITS, TARGETS)
    assert ev.compute() == {"top5_accuracy": 1.0}


def test_accuracy_stays_plain_under_macro_average() -> None:
    # Class 0 has 3 samples (all right), class 1 has 1 (wrong): plain 3/4, a macro mean would be 1/2.
    ev = _evaluator(metrics=["accuracy"])
    ev.update(torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]]), torch.tensor([0, 0, 0, 1]))
    assert ev.compute() == {"accuracy": pytest.approx(3 / 4)}


def test_reset_forgets_everything() -> None:
    ev = _evaluator()
    ev.update(LOGITS, TARGETS)
    ev.reset()
    ev.update(LOGITS[:2], TARGETS[:2])
    assert ev.compute()["accuracy"] == pytest.approx(1 / 2)
    assert ev.confusion_matrix().tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_report_lists_each_class_and_the_overall_accuracy() -> None:
    ev = _evaluator()
    ev.update(LOGITS, TARGETS)
    text = ev.report(["cat", "dog", "bird"])
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    for name, p, r, f in zip(["cat", "dog", "bird"], PRECISION, RECALL, F1, strict=True):
        assert [float(v) for v in rows[name]] == [pytest.approx(p, abs=1e-4), pytest.approx(r, abs=1e-4),
                                                  pytest.approx(f, abs=1e-4), 2]  # fmt: skip
    assert [float(v) for v in rows["accuracy"]] == [pytest.approx(4 / 6, abs=1e-4), 6]
    assert "macro avg" in text and "weighted avg" in text
    assert "0" in ev.report().split()  # default names are the class ids
    with pytest.raises(RunError, match="2 class names"):
        ev.report(["cat", "dog"])


def test_unknown_metric_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="f1_score"):
        _evaluator(metrics=["accuracy", "f1score"])


def test_bad_average_and_num_classes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="macro"):
        _evaluator(average="macr")
    with pytest.raises(ConfigError, match="num_classes"):
        EVALUATOR_REGISTRY.build({"name": "classification_evaluator", "num_classes": 1}, metrics=["accuracy"])


def test_wrong_shapes_and_labels_are_named() -> None:
    with pytest.raises(RunError, match=r"\(N, 3\)"):
        _evaluator().update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RunError, match=r"\[0, 3\)"):
        _evaluator().update(torch.randn(2, 3), torch.tensor([1, 3]))


class _MeanAbsError(BaseEvaluator):
    """The guide's style of custom evaluator: only `evaluate` is written."""

    def evaluate(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"mae": (predictions - targets).abs().mean(), "count": len(targets)}


def test_base_evaluator_collects_batches_for_evaluate() -> None:
    registry = Registry("evaluator")
    registry.add("mae", _MeanAbsError)
    ev = registry.build({"name": "mae"}, metrics=["mae"])
    assert ev.metrics == ["mae"]
    ev.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    ev.update(torch.tensor([3.0]), torch.tensor([0.0]))
    assert ev.compute() == {"mae": 2.0, "count": 3.0}
    ev.reset()
    ev.update(torch.tensor([5.0]), torch.tensor([1.0]))
    assert ev.compute() == {"mae": 4.0, "count": 1.0}
    with pytest.raises(NotImplementedError, match="evaluate"):
        BaseEvaluator().compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Uneven halves on purpose: rank 0 sees 4 samples, rank 1 sees 2.
        part = slice(0, 4) if rank == 0 else slice(4, 6)
        ev = _evaluator(top_k=2)
        ev.update(LOGITS[part], TARGETS[part])
        mae = _MeanAbsError()
        mae.update(LOGITS[part].argmax(1).float(), TARGETS[part].float())
        result = (ev.compute(), ev.confusion_matrix().tolist(), ev.report(), mae.compute())
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_all_data(tmp_path) -> None:
    single = _evaluator(top_k=2)
    single.update(LOGITS, TARGETS)
    expected_mae = {"mae": (1 + 2) / 6, "count": 6.0}  # sample 1 is off by one class, sample 5 by two
    # fork: the children inherit the imports instead of paying seconds for them again
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        metrics, confmat, report, mae = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert metrics == pytest.approx(single.compute())
        assert confmat == CONFMAT
        assert report == single.report()
        assert mae == pytest.approx(expected_mae)


def test_plain_torch_metrics_equal_torchmetrics_with_absent_classes() -> None:
    """The evaluator derives everything from a confusion matrix; torchmetrics is the reference it replaced."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 7, generator=gen)
    logits[:, 6] -= 10  # class 6 is never predicted
    targets = torch.randint(0, 5, (200,), generator=gen)  # classes 5 and 6 never present
    logits[:20, 5] += 10  # class 5 is predicted but never present
    for average in AVERAGES_UNDER_TEST:
        ev = EVALUATOR_REGISTRY.build(
            {"name": "classification_evaluator", "num_classes": 7, "average": average, "top_k": 3},
            metrics=ALL,
        )
        for part in (slice(0, 64), slice(64, 200)):
            ev.update(logits[part], targets[part])
        got = ev.compute()
        reference = {
            "accuracy": MulticlassAccuracy(7, average="micro"),
            "f1_score": MulticlassF1Score(7, average=average),
            "precision": MulticlassPrecision(7, average=average),
            "recall": MulticlassRecall(7, average=average),
            "top3_accuracy": MulticlassAccuracy(7, average="micro", top_k=3),
        }
        for key, metric in reference.items():
            assert got[key] == pytest.approx(float(metric(logits, targets)), abs=1e-6), (average, key)


AVERAGES_UNDER_TEST = ("macro", "weighted", "micro")
