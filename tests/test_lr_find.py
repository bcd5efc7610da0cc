"""LR range test: the suggestion rule on a known curve, and script/lr_find.py end to end."""

from __future__ import annotations

import csv
import itertools
import math

from src.workflows.lr_find import suggest
from tests.helpers import explain, run_script


def test_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = [1e-6 * 10 ** (i / 10) for i in range(61)]  # 1e-6 .. 1
    # falls fastest around lr = 1e-3 (log10 = -3), bottoms out near 1e-1, then rises steeply
    smoothed = [2 - math.tanh(2 * (math.log10(lr) + 3)) + max(0.0, math.log10(lr) + 1) ** 2 * 5 for lr in lrs]
    got = suggest(lrs, smoothed)
    assert got is not None and 5e-4 < got < 2e-3, got
    assert suggest(lrs[:4], smoothed[:4]) is None  # too few points to say


def test_lr_find_script_sweeps_stops_on_divergence_and_prints_the_override(tmp_path):
    proc = run_script(
        "script/lr_find.py", "config/dummy.yaml", f"output={tmp_path}", "dataset.train_size=128", "batch=16",
        "--start", "1e-5", "--end", "100", "--steps", "30",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    (folder,) = tmp_path.glob("SyntheticClassification/*_lrfind_SimpleCNN")
    with open(folder / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 1e-5 and 5 < len(rows) < 30  # stopped once the loss diverged, before lr 100
    ratios = {round(b / a, 6) for a, b in itertools.pairwise(lrs)}
    assert len(ratios) == 1  # exponential steps
    assert (folder / "lr_find.png").stat().st_size > 10_000
    assert "stopped early" in proc.stdout
    suggested = float(proc.stdout.split("suggested lr: ")[1].split()[0])
    assert lrs[0] < suggested < lrs[-1]
    assert f"optimizer.lr={suggested:.3g}" in proc.stdout.splitlines()[-1]

    bad = run_script("script/lr_find.py", "config/dummy.yaml", f"output={tmp_path / 'bad'}", "--start", "0")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --start and --end"), explain(bad)
    assert not (tmp_path / "bad").exists()


def test_the_plot_shows_the_suggestion_to_3_digits_and_no_loss_axis_below_zero():
    from src.workflows.lr_find import LRFindResult, plot

    lrs = [1e-5 * 1.5**i for i in range(30)]
    losses = [2.3 * 0.8**i for i in range(30)]  # falls to 0.0035: autoscale's margin went below 0
    fig = plot(LRFindResult(lrs, losses, losses, 0.0012345, False), "test")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "suggested lr 0.00123"
    assert ax.get_ylim()[0] == 0.0
