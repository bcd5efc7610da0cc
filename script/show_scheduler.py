"""Plot the learning rate a config gives at every optimizer step of its run, before spending GPU hours on it.

    python script/show_scheduler.py CONFIG [key=value ...] [--out lr.png] [--csv lr.csv]

The schedule is built with the trainer's own builder (src.optim.build_scheduler) and stepped the way the
trainer steps it: after every optimizer step for per-step schedules, after every epoch for per-epoch
ones. Steps per epoch come from the train split's size, `batch`, the process count and
`training.accumulate_grad_batches`; pass --steps-per-epoch to skip loading the dataset.
ReduceLROnPlateau follows validation metrics, which a dry run does not have: it is drawn flat.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def steps_per_epoch(cfg, world_size: int) -> int:
    """Optimizer steps in one epoch on each process, counted exactly as the trainer counts them."""
    from src.data import ResumableSampler, build_dataset
    from src.errors import ConfigError

    accumulate = int(cfg.training.accumulate_grad_batches)
    if cfg.debug:
        return 1  # debug trains one batch per epoch
    try:
        dataset = build_dataset(cfg.dataset, split="train", transform=None)
    except Exception as err:
        raise ConfigError(
            f"could not load dataset '{cfg.dataset.name}' to count its batches ({type(err).__name__}: {err}); "
            "pass --steps-per-epoch N"
        ) from None
    samples = len(ResumableSampler(len(dataset), shuffle=False, rank=0, world_size=world_size))
    batch = int(cfg.batch)
    batches = samples // batch + (1 if samples % batch and not cfg.dataloader.drop_last else 0)
    return math.ceil(batches / accumulate)


def lr_curve(cfg, steps: int) -> tuple[list[tuple[int, int, float]], str]:
    """[(optimizer step from 1, epoch from 1, LR used by that step)] over the whole run, and a description."""
    import torch
    from torch import nn

    from src.optim import build_optimizer, build_scheduler, set_optimizer_mode

    epochs = 2 if cfg.debug else int(cfg.epoch)
    # The LR does not depend on the model: a tiny stand-in with a weight, a bias and a norm layer.
    stand_in = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    optimizer = build_optimizer(cfg.optimizer, stand_in)
    schedule = build_scheduler(cfg.lr_scheduler, optimizer, steps_per_epoch=steps, epochs=epochs)
    set_optimizer_mode(optimizer, True)
    rows: list[tuple[int, int, float]] = []
    step = 0
    for epoch in range(epochs):
        for _ in range(steps):
            step += 1
            rows.append((step, epoch + 1, float(optimizer.param_groups[0]["lr"])))
            with torch.no_grad():
                optimizer.step()  # no gradients: the weights stay, but the scheduler sees a real step
            if schedule is not None and schedule.interval == "step":
                schedule.step()
        if schedule is not None and schedule.interval == "epoch":
            schedule.step(None)  # ReduceLROnPlateau has no metric here and stays put
    what = repr(schedule) if schedule is not None else "no scheduler (constant LR)"
    return rows, f"{cfg.optimizer.name}, {what}"


def plot(rows: list[tuple[int, int, float]], steps: int, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r[0] for r in rows], [r[2] for r in rows], linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    top = ax.secondary_xaxis("top", functions=(lambda s: s / steps, lambda e: e * steps))
    top.set_xlabel("epoch")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as for train.py")
    parser.add_argument("--out", type=Path, default=Path("lr_schedule.png"), help="the PNG to write")
    parser.add_argument("--csv", type=Path, help="also write step,epoch,lr rows to this CSV file")
    parser.add_argument("--steps-per-epoch", type=int, help="skip loading the dataset and use this count")
    parser.add_argument("--world-size", type=int, default=1, help="processes the run will use (torchrun)")
    args = parser.parse_intermixed_args()

    import src  # noqa: F401  (registers the built-in components)
    from src.config import load_config
    from src.errors import TemplateError
    from src.user_modules import import_user_modules

    try:
        cfg = load_config(args.config, args.overrides)
        import_user_modules(list(cfg.imports))
        steps = args.steps_per_epoch or steps_per_epoch(cfg, max(1, args.world_size))
        rows, title = lr_curve(cfg, steps)
    except TemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    plot(rows, steps, f"{title}\n{steps} steps/epoch", args.out)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "lr"])
            writer.writerows([step, epoch, repr(lr)] for step, epoch, lr in rows)
    lrs = [r[2] for r in rows]
    print(f"{title}: {len(rows)} optimizer steps ({steps}/epoch), lr from {lrs[0]:.4g} (min {min(lrs):.4g}, "
          f"max {max(lrs):.4g}) to {lrs[-1]:.4g}")  # fmt: skip
    print(f"wrote {args.out}" + (f" and {args.csv}" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
