"""Evaluate a run's best (or given) checkpoint on the test split and write the `test/` folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from src.engine import distributed as dist_utils
from src.engine.build import (
    build_evaluator,
    build_loss,
    build_model,
    build_split,
    build_transforms,
    num_classes_of,
)
from src.engine.checkpoint import describe_mismatch, load_checkpoint
from src.engine.distributed import DistContext
from src.engine.evaluate import evaluate
from src.engine.precision import resolve_precision
from src.errors import RunError

log = logging.getLogger("template")


def pick_checkpoint(run_dir: Path) -> Path:
    for name in ("best.pth", "last.pth"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    raise RunError(f"no checkpoint to test in {run_dir / 'checkpoints'} (looked for best.pth and last.pth)")


def test_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights the run reports: "model" (the EMA average when the run kept one; checkpoints from
    before "raw_model" existed kept the raw weights there and the average under "ema")."""
    if "raw_model" in state:
        return state["model"]
    ema = state.get("ema")
    if ema:
        return {k[len("module.") :]: v for k, v in ema.items() if k.startswith("module.")}
    return state["model"]


def run_test(
    cfg: DictConfig, ctx: DistContext, run_dir: Path, checkpoint: Path | None, trackers: Any
) -> dict[str, float]:
    path = checkpoint or pick_checkpoint(run_dir)
    state = load_checkpoint(path)
    precision = resolve_precision(cfg.gpu, ctx.device)
    split = build_split(cfg, "test", ctx, shuffle=False, transforms=build_transforms(cfg))
    num_classes = num_classes_of(cfg, split.dataset)
    model = build_model(cfg, num_classes)
    weights = test_weights(state)
    mismatch = describe_mismatch(model, weights)
    if mismatch:
        raise RunError(f"{path} does not fit model '{cfg.model.name}': {mismatch}")
    model.load_state_dict(weights)
    model.to(ctx.device)
    evaluator = build_evaluator(cfg, num_classes)
    collected: list | None = [] if cfg.evaluation.save_predictions else None
    metrics = evaluate(
        model, split.loader, split.sampler.num_valid, build_loss(cfg), evaluator, precision, ctx.device, "test",
        bool(cfg.model.get("channels_last", False)), max_batches=1 if cfg.debug else None, collect=collected,
    )  # fmt: skip
    confusion = evaluator.confusion_matrix() if hasattr(evaluator, "confusion_matrix") else None
    classes = list(getattr(split.dataset, "classes", []) or [])
    report = evaluator.report(classes or None) if hasattr(evaluator, "report") else None
    gathered = dist_utils.all_gather_object(collected) if collected is not None else None
    if ctx.is_main:
        out = run_dir / "test"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if report:
            (out / "classification_report.txt").write_text(report + "\n")
        figure = None
        if confusion is not None:
            figure = confusion_figure(confusion, classes)
            figure.savefig(out / "confusion_matrix.png", dpi=100, bbox_inches="tight")
        if gathered is not None:
            write_predictions(out / "predictions.csv", gathered)
        log.info("test (%s): %s", path.name, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if trackers is not None:
            step = int(state.get("progress", {}).get("global_step", 0))
            trackers.log_metrics(metrics, step=step, epoch=int(state.get("progress", {}).get("epoch", 0)))
            trackers.log_artifact(out)  # the whole folder, as test/ beside config.yaml
            if figure is not None:
                trackers.log_figure("confusion_matrix", figure, step=step)
            trackers.commit()
        if figure is not None:
            import matplotlib.pyplot as plt

            plt.close(figure)
    return metrics


def confusion_figure(matrix: torch.Tensor, classes: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.cpu().numpy()
    n = m.shape[0]
    size = min(4 + n * 0.4, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    labels = classes if len(classes) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def write_predictions(path: Path, gathered: list[list]) -> None:
    rows = ["rank,index,target,prediction"]
    for rank, batches in enumerate(gathered):
        index = 0
        for outputs, targets in batches:
            preds = (
                outputs.argmax(dim=1) if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 else outputs
            )
            for t, p in zip(targets.tolist(), preds.tolist(), strict=False):
                rows.append(f"{rank},{index},{t},{p}")
                index += 1
    path.write_text("\n".join(rows) + "\n")
