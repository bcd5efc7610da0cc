"""LR range test: train with an exponentially growing lr and watch where the loss falls fastest.

One process, the configured model, optimizer (param groups keep their ratios), precision,
accumulation and clipping; one optimizer step per lr value on the train split, for `steps` values
from `start` to `end`, stopping early once the smoothed loss has grown to `diverge` x its best.
The suggestion is the lr where the smoothed loss falls fastest (steepest slope against log lr)
before its minimum: large enough to learn fast, safely below where training blows up.
"""

from __future__ import annotations

import csv
import datetime
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.errors import ConfigError

log = logging.getLogger("template")

SMOOTHING = 0.9  # exponential moving average of the loss (bias-corrected)


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    stopped_early: bool


def lr_range_test(
    cfg: DictConfig, start: float, end: float, steps: int, diverge: float = 4.0
) -> LRFindResult:
    """Run the sweep on the config's train split; the model and optimizer are thrown away afterwards."""
    import torch

    from src.checkpoint.rng import seed_everything
    from src.data.batch import split_batch, to_device, total_loss
    from src.data.transforms import split_transforms
    from src.distributed import process_group as dist_utils
    from src.engine.build import build_split, model_for, num_classes_of
    from src.engine.precision import configure_backends, resolve_precision
    from src.models.losses import build_loss
    from src.optim import build_optimizer

    if not 0 < start < end:
        raise ConfigError(f"--start and --end must satisfy 0 < start < end, got start={start:g}, end={end:g}")
    if steps < 5:
        raise ConfigError(f"--steps must be at least 5, got {steps}")
    ids = str(cfg.gpu.use).split(",")
    cfg = OmegaConf.merge(cfg, {"distributed": {"strategy": "none"}, "gpu": {"use": ids[0].strip() or "0"}})
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    seed_everything(int(cfg.seed))
    configure_backends(cfg.gpu)
    precision = resolve_precision(cfg.gpu, ctx.device)
    train = build_split(cfg, "train", ctx, shuffle=True, transforms=split_transforms(cfg.get("transform")))
    num_classes = num_classes_of(cfg, train.dataset)
    model = model_for(cfg, num_classes).to(ctx.device)
    model.train()
    loss_fn = build_loss(cfg.loss)
    optimizer = build_optimizer(cfg.optimizer, model)
    scaler = precision.grad_scaler()
    top = float(optimizer.defaults["lr"])
    ratios = [float(g["lr"]) / top for g in optimizer.param_groups]  # layer-wise lrs keep their ratios
    accumulate = int(cfg.training.accumulate_grad_batches)
    clip = float(cfg.training.gradient_clip_norm)
    params = [p for p in model.parameters() if p.requires_grad]

    def batches() -> Any:
        epoch = 0
        while True:
            train.sampler.set_epoch(epoch)
            yield from train.loader
            epoch += 1

    data = batches()
    result = LRFindResult([], [], [], None, False)
    average, best = 0.0, math.inf
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        step_loss = 0.0
        for _ in range(accumulate):
            inputs, targets = split_batch(next(data))
            inputs, targets = to_device(inputs, ctx.device), to_device(targets, ctx.device)
            with precision.autocast():
                loss = total_loss(loss_fn(model(inputs), targets)) / accumulate
            scaler.scale(loss).backward()
            step_loss += float(loss.detach())
        if clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            result.stopped_early = True
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * step_loss
        smooth = average / (1 - SMOOTHING ** (i + 1))
        result.lrs.append(lr)
        result.losses.append(step_loss)
        result.smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > diverge * best:
            result.stopped_early = True
            break
    result.suggestion = suggest(result.lrs, result.smoothed)
    return result


def plot(result: LRFindResult, title: str) -> Any:
    """The loss against the lr (log scale) with the suggestion, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if result.suggestion is not None:  # 3 significant digits: the value to paste as optimizer.lr
        ax.axvline(
            result.suggestion, color="red", linestyle="--", label=f"suggested lr {result.suggestion:.3g}"
        )
    if result.smoothed:  # keep the diverging tail from flattening the interesting part
        lowest = result.smoothed.index(min(result.smoothed))
        ax.set_ylim(top=max(max(result.smoothed[: lowest + 1]), result.smoothed[lowest]) * 1.5)
    if result.losses and min(result.losses) >= 0:  # a loss that is never negative: no axis below 0
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 0.0))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The lr of the steepest fall of the smoothed loss (per unit of log lr) before its minimum."""
    if len(lrs) < 5:
        return None
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    skip = max(1, len(lrs) // 10)  # the first values are still dominated by the smoothing's start
    slopes = [
        ((smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1])), i)
        for i in range(skip, lowest)
        if i + 1 < len(lrs)
    ]
    if not slopes:
        return lrs[lowest] / 10
    return lrs[min(slopes)[1]]


def write_outputs(result: LRFindResult, cfg: DictConfig, stamp: str | None = None) -> Path:
    """`<output>/<dataset>/<ts>_lrfind_<model>/` with lr_find.csv and lr_find.png; returns the folder."""
    from src.results.run_dir import _slug

    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    parent = Path(cfg.output) / _slug(cfg.dataset.name)
    parent.mkdir(parents=True, exist_ok=True)
    name = f"{stamp}_lrfind_{_slug(cfg.model.name)}"
    folder = parent / name
    for i in range(1, 1000):
        if not folder.exists():
            break
        folder = parent / f"{name}_{i}"
    folder.mkdir()
    with open(folder / "lr_find.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(result.lrs, result.losses, result.smoothed, strict=True)):
            writer.writerow([i, *(f"{v:.8g}" for v in row)])
    fig = plot(result, f"LR range test: {cfg.model.name} on {cfg.dataset.name}")
    fig.savefig(folder / "lr_find.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    OmegaConf.save(cfg, folder / "lr_find_config.yaml")
    return folder
