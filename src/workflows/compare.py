"""Is model B really better than model A? A paired t-test over the folds both were trained on.

Each side is a cross-validation directory (or its cv_summary.csv), or a comma-separated list of run
directories whose config.yaml names their `dataset.fold`. Folds are paired by number; for every
metric both sides have, the mean difference (B - A) and the two-sided p-value of
scipy.stats.ttest_rel. The folds share training data, so the test is somewhat optimistic; treat a
p-value near the threshold with care.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

from src.errors import ConfigError
from src.workflows import runs

LOWER_IS_BETTER = ("loss", "error")


def read_side(text: str) -> dict[int, dict[str, float]]:
    """{fold: {metric: value}} of a CV directory, a cv_summary.csv, or run directories a,b,c."""
    path = Path(text)
    if path.is_dir() and (path / "cv_summary.csv").is_file():
        path = path / "cv_summary.csv"
    if path.is_file() and path.suffix == ".csv":
        folds: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not str(row.get("fold", "")).isdigit():
                    continue  # the mean and std rows
                folds[int(row["fold"])] = {
                    k: float(v)
                    for k, v in row.items()
                    if k.startswith(("val_", "test_")) and v not in ("", None)
                }
        if not folds:
            raise ConfigError(
                f"{path} holds no fold rows; pass a cross-validation directory or its cv_summary.csv"
            )
        return folds
    folds = {}
    for i, item in enumerate(p for p in text.split(",") if p):
        run = Path(item)
        if not (run / "test" / "metrics.json").is_file() or not (run / "config.yaml").is_file():
            raise ConfigError(
                f"'{item}' is neither a cross-validation directory (cv_summary.csv) nor a finished run "
                "(config.yaml and test/metrics.json)"
            )
        fold = OmegaConf.load(run / "config.yaml").dataset.get("fold")
        folds[int(fold) if fold is not None else i] = runs.run_metrics(run)
    if not folds:
        raise ConfigError(f"no runs in '{text}'")
    return folds


# <YYYYMMDD_HHMMSS>_ at the start of a directory name, then a workflow's kind and settings digest
STAMP = re.compile(r"^\d{8}_\d{6}_(?:(cv|sweep)_[0-9a-f]{6}_)?")


def pick_sides(paths: list[str], latest: bool) -> tuple[str, str]:
    """A and B from the command line, where a shell glob may have matched several directories.

    The matches of one pattern share their name without the stamp (and the workflow digest); the
    shell lists A's before B's. More than one per side is an error naming them, unless `latest`
    takes the newest of each (stamps sort by time)."""
    if len(paths) == 2:
        return paths[0], paths[1]
    if len(paths) < 2:
        raise ConfigError(
            "compare.py needs two sides, A and B (a CV directory, a cv_summary.csv or runs r1,r2,...)"
        )
    groups: list[list[str]] = []
    for path in paths:
        if groups and _pattern(groups[-1][0]) == _pattern(path):
            groups[-1].append(path)
        else:
            groups.append([path])
    if len(groups) != 2:
        raise ConfigError(
            f"{len(paths)} paths given and they do not split into A and B: {', '.join(paths)}; "
            "pass exactly two (quote a list of runs as r1,r2,...)"
        )
    if latest:
        return max(groups[0], key=_newest), max(groups[1], key=_newest)
    many = [(side, g) for side, g in zip("AB", groups, strict=True) if len(g) > 1]
    said = "; ".join(f"{side} matches {len(g)}: {', '.join(g)}" for side, g in many)
    raise ConfigError(f"{said}; name one directory per side, or add --latest to take the newest of each")


def _newest(path: str) -> str:
    return Path(path.rstrip("/")).name


def _pattern(path: str) -> str:
    """What the matches of one shell pattern have in common: the name without stamp and digest."""
    return STAMP.sub(lambda m: f"{m.group(1)}_" if m.group(1) else "", _newest(path))


def compare(a: str, b: str, metric: str | None = None, alpha: float = 0.05) -> tuple[list[dict], str]:
    """(one row per metric, the verdict line) for B against A."""
    from scipy.stats import ttest_rel

    side_a, side_b = read_side(a), read_side(b)
    folds = sorted(set(side_a) & set(side_b))
    if len(folds) < 2:
        raise ConfigError(
            f"A and B share {len(folds)} fold(s) ({folds}); a paired test needs at least 2 folds trained on both"
        )
    names = sorted(set.intersection(*[set(side_a[k]) & set(side_b[k]) for k in folds]))
    if not names:
        raise ConfigError("A and B have no metric in common")
    rows = []
    for name in names:
        xa = [side_a[k][name] for k in folds]
        xb = [side_b[k][name] for k in folds]
        diffs = [y - x for x, y in zip(xa, xb, strict=True)]
        t = p = None  # undefined when every fold differs by the same amount (no spread)
        if max(diffs) != min(diffs):
            result = ttest_rel(xb, xa)
            t, p = float(result.statistic), float(result.pvalue)
        mean_a, mean_b = sum(xa) / len(xa), sum(xb) / len(xb)
        rows.append({"metric": name, "mean_a": mean_a, "mean_b": mean_b, "diff": mean_b - mean_a, "t": t,
                     "p_value": p, "diffs": dict(zip(folds, diffs, strict=True))})  # fmt: skip
    metric = metric or next((n for n in ("test_accuracy", "test_loss") if n in names), names[0])
    chosen = next((r for r in rows if r["metric"] == metric), None)
    if chosen is None:
        raise ConfigError(f"metric '{metric}' is not in both sides; choose one of: {', '.join(names)}")
    return rows, verdict(chosen, len(folds), alpha)


# Fewer pairs than this leave a t-test with one degree of freedom: any verdict would be noise.
MIN_PAIRS = 3


def verdict(row: dict, n: int, alpha: float) -> str:
    """The last line: which side is better, or why the test cannot say (too few folds, no spread)."""
    per_fold = ", ".join(f"fold {k} {d:+.4f}" for k, d in row["diffs"].items())
    diff = f"{row['metric']}: B - A = {row['diff']:+.4f} ({per_fold})"
    if row["t"] is None:
        same = "the same on every fold" if row["diff"] == 0 else "the same difference on every fold"
        return f"no verdict on {diff}: {same}, so the paired t-test is undefined (zero variance)"
    where = f"{diff}, t = {row['t']:.3f}, p = {row['p_value']:.4g} (paired t-test over {n} folds)"
    if n < MIN_PAIRS:
        return f"no verdict on {where}: a paired t-test needs at least {MIN_PAIRS} folds"
    lower = any(w in row["metric"] for w in LOWER_IS_BETTER)
    better = "B" if (row["diff"] < 0) == lower else "A"
    if math.isnan(row["p_value"]) or row["p_value"] >= alpha:
        return f"no significant difference at alpha={alpha:g} on {where}"
    return f"{better} is better at alpha={alpha:g} on {where}"


def table(rows: list[dict]) -> str:
    def number(v: float | None) -> float | str:
        return "undefined" if v is None else v

    body = [
        [r["metric"], r["mean_a"], r["mean_b"], r["diff"], number(r["t"]), number(r["p_value"])] for r in rows
    ]
    return runs.markdown(["metric", "mean A", "mean B", "B - A", "t", "p (paired t)"], body)


def to_json(rows: list[dict], line: str) -> str:
    return json.dumps({"metrics": rows, "verdict": line}, indent=2)
