"""Train every fold of a config as ordinary result directories, then summarise them side by side.

The summary directory <output>/<dataset>/<ts>_cv_<hash>_<model>[_<tag>]/ holds cv_summary.csv and .md
(each fold's validation metrics at its best checkpoint and its test metrics, then their mean and
sample standard deviation, ddof=1) and cv.json; with MLflow on, one parent run holds the folds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.errors import ConfigError, RunError
from src.workflows import runs


def default_folds(cfg: Any) -> list[int]:
    """Every fold listed in <dataset.root>/splits/info.json."""
    root = cfg.dataset.get("root")
    if not root:
        raise ConfigError(
            "cross-validation needs --folds, or dataset.root with a splits/ folder (make_splits.py)"
        )
    from src.data.cv_splits import read_info

    try:
        return list(range(int(read_info(Path(str(root)).expanduser() / "splits")["folds"])))
    except RunError as err:
        raise ConfigError(str(err)) from None


def parse_folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        folds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--folds takes fold numbers separated by commas, e.g. --folds 0,1,2; got {text!r}"
        ) from None
    if not folds or any(k < 0 for k in folds) or len(set(folds)) != len(folds):
        raise ConfigError(f"--folds takes distinct fold numbers >= 0, e.g. --folds 0,1,2; got {text!r}")
    return folds


def cross_validate(config: str, overrides: list[str], folds: list[int] | None, gpus: list[str]) -> int:
    """Run (or finish) every fold and write the summary; 0 when every fold finished."""
    base = runs.load(config, overrides)
    folds = folds if folds is not None else default_folds(base)
    jobs = []
    for k in folds:
        fold_overrides = [*overrides, f"dataset.fold={k}"]
        job = runs.Job(
            f"fold {k}", fold_overrides, runs.load(config, fold_overrides), extra={"config": config}
        )
        job.extra["fold"] = k
        jobs.append(job)
    runs.check(jobs)
    key = runs.digest(runs.fingerprint(base, drop=("dataset.fold",)))
    cv_dir = runs.summary_dir(base, "cv", key)
    state = runs.read_state(cv_dir, "cv")
    print(f"cross-validation of folds {folds}: summary in {cv_dir}", flush=True)
    parent = runs.open_parent_run(
        base,
        cv_dir.name,
        {"workflow": "cross_validation", "cv_dir": str(cv_dir.resolve())},
        state.get("mlflow_run_id"),
    )
    state.update(config=str(config), overrides=list(overrides), folds=folds)
    env = runs.record_parent(cv_dir, "cv", state, parent)
    runs.run_then_summarise(
        jobs,
        gpus,
        env,
        cv_dir,
        "cv",
        state,
        parent,
        label=lambda j: str(j.extra["fold"]),
        summarise=lambda done: write_summary(cv_dir, done),
    )
    print(f"wrote {cv_dir / 'cv_summary.md'}", flush=True)
    print((cv_dir / "cv_summary.md").read_text(), flush=True)
    return 0


def write_summary(cv_dir: Path, jobs: list[runs.Job]) -> dict[str, float]:
    """cv_summary.csv and .md; returns {metric_mean, metric_std} for the parent run."""
    per_fold = [(j.extra["fold"], j.run_dir, runs.run_metrics(j.run_dir)) for j in jobs]
    metrics = runs.metric_columns([m for _, _, m in per_fold])
    header = ["fold", "run", *metrics]
    rows: list[list[Any]] = [[k, str(d), *[m.get(c, "") for c in metrics]] for k, d, m in per_fold]
    stats = {c: runs.mean_std([m[c] for _, _, m in per_fold if c in m]) for c in metrics}
    mean_row = ["mean", "", *[stats[c][0] for c in metrics]]
    std_row = ["std", "", *[stats[c][1] for c in metrics]]
    runs.write_table(cv_dir / "cv_summary.csv", header, [*rows, mean_row, std_row])
    short = [[k, Path(d).name, *[m.get(c, "") for c in metrics]] for k, d, m in per_fold]
    text = (
        f"# Cross-validation: {len(per_fold)} folds\n\n"
        + runs.markdown(header, [*short, mean_row, std_row])
        + "\nValidation metrics are those of each fold's best checkpoint, the one its test metrics evaluate;"
        " std is the sample standard deviation (ddof=1) over the folds.\n\n"
        + "\n".join(f"- {c}: {stats[c][0]:.4f} ± {stats[c][1]:.4f}" for c in metrics)
        + "\n"
    )
    runs.write_text(cv_dir / "cv_summary.md", text)
    out = {f"{c}_mean": stats[c][0] for c in metrics}
    out.update({f"{c}_std": stats[c][1] for c in metrics if stats[c][1] == stats[c][1]})
    return out
