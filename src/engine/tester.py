"""Evaluate a run's best (or given) checkpoint on the test split and write the `test/` folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from src.checkpoint.checkpointer import describe_mismatch, load_checkpoint
from src.data.transforms import split_transforms
from src.distributed import process_group as dist_utils
from src.distributed.process_group import DistContext
from src.engine.build import build_split, model_for, num_classes_of, require_num_classes
from src.engine.evaluate import evaluate
from src.engine.precision import resolve_precision
from src.errors import RunError
from src.evaluators.build import build_evaluator
from src.models.losses import build_loss
from src.results.atomic_files import write_folder

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
    cfg: DictConfig,
    ctx: DistContext,
    run_dir: Path,
    checkpoint: Path | None,
    trackers: Any,
    out: Path | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Test `checkpoint` (default: the run's best) and write the results to `out` (default: <run>/test).

    `stop` (train.py's final test): asked before each batch; a stop request raises `Stopped` and
    nothing is written.
    """
    path = checkpoint or pick_checkpoint(run_dir)
    state = load_checkpoint(path)
    precision = resolve_precision(cfg.gpu, ctx.device)
    split = build_split(cfg, "test", ctx, shuffle=False, transforms=split_transforms(cfg.get("transform")))
    num_classes = num_classes_of(cfg, split.dataset)
    require_num_classes(cfg, num_classes)
    model = model_for(cfg, num_classes)
    weights = test_weights(state)
    mismatch = describe_mismatch(model, weights)
    if mismatch:
        raise RunError(f"{path} does not fit model '{cfg.model.name}': {mismatch}")
    model.load_state_dict(weights)
    model.to(ctx.device)
    evaluator = build_evaluator(cfg.evaluator, num_classes, cfg.evaluation.metrics)
    collected: list | None = [] if cfg.evaluation.save_predictions else None
    log.info("testing %s on the test split (%d samples)", path.name, len(split.dataset))
    metrics = evaluate(
        model, split.loader, split.sampler.num_valid, build_loss(cfg.loss), evaluator, precision, ctx.device, "test",
        bool(cfg.model.get("channels_last", False)), max_batches=1 if cfg.debug else None, collect=collected,
        stop=stop,
    )  # fmt: skip
    confusion = evaluator.confusion_matrix() if hasattr(evaluator, "confusion_matrix") else None
    classes = list(getattr(split.dataset, "classes", []) or [])
    report = evaluator.report(classes or None) if hasattr(evaluator, "report") else None
    gathered = dist_utils.all_gather_object(collected) if collected is not None else None
    if ctx.is_main:
        run_name = run_dir.name if out is None else str(path)
        out = out or run_dir / "test"
        files = {"metrics.json": (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()}
        if report:
            files["classification_report.txt"] = (report + "\n").encode()
        if confusion is not None:
            accuracy = metrics.get("test_accuracy")
            title = f"{run_name}: test split" + (f", accuracy {accuracy:.4f}" if accuracy is not None else "")
            files["confusion_matrix.png"] = png(confusion_figure(confusion, classes, title))
            files["confusion_matrix_normalized.png"] = png(
                confusion_figure(confusion, classes, title + " (rows normalised)", normalize=True)
            )
        if gathered is not None:
            files["predictions.csv"] = predictions_csv(gathered).encode()
        write_folder(out, files)  # all of test/ or none of it: a full disk leaves no half-written folder
        log.info("test (%s): %s", path.name, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if trackers is not None:
            step = int(state.get("progress", {}).get("global_step", 0))
            trackers.log_metrics(metrics, step=step, epoch=int(state.get("progress", {}).get("epoch", 0)))
            trackers.log_artifact(out)  # the whole folder, as test/ beside config.yaml
            if "confusion_matrix.png" in files:
                trackers.log_image("confusion_matrix", files["confusion_matrix.png"], step=step)
            trackers.commit()
    return metrics


def png(figure: Any) -> bytes:
    """A figure as PNG bytes (laid out tight already: one draw), and the figure closed."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def confusion_figure(
    matrix: torch.Tensor, classes: list[str], title: str = "", normalize: bool = False
) -> Any:
    """The confusion matrix as a picture: counts (or row shares) readable on light and dark cells alike.

    Rows are the true classes; `normalize` divides each row by its total, so a rare class reads as
    clearly as a common one. Cell text is white on dark cells and black on light ones; labels shrink,
    and beyond 40 classes only every k-th is shown, so they never overlap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.cpu().double().numpy()
    if normalize:
        totals = m.sum(axis=1, keepdims=True)
        m = m / totals.clip(min=1)
    n = m.shape[0]
    size = min(5 + n * 0.4, 22)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vmax = 1.0 if normalize else max(float(m.max()), 1.0)
    image = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(
        image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "count"
    )
    labels = classes if len(classes) == n else [str(i) for i in range(n)]
    step = max(1, -(-n // 40))  # at most 40 labels per axis
    fontsize = 10 if n <= 10 else 8 if n <= 30 else 6
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 30:
        cmap = image.get_cmap()
        for i in range(n):
            for j in range(n):
                r, g, b, _ = cmap(m[i, j] / vmax)
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived brightness of the cell
                text = f"{m[i, j]:.2f}" if normalize else str(int(m[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize - 1,
                        color="white" if dark else "black")  # fmt: skip
    fig.tight_layout()
    return fig


def predictions_csv(gathered: list[list]) -> str:
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
    return "\n".join(rows) + "\n"
