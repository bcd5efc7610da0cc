"""Table every run under a result root: its settings and final metrics, as CSV and Markdown.

    python script/aggregate_results.py [--root result] [--sort test_accuracy] [--order auto|asc|desc]
                                       [--columns run,status,test_accuracy] [--csv PATH] [--md PATH]

One row per run directory (a folder with config.yaml and train.log). Columns: the run, how it ended,
the main settings (model, dataset, optimizer, lr, batch, epoch, tag, seed) plus every other setting
that differs between the runs, the last validation metrics in metrics.jsonl, and test/metrics.json.
Both tables, with every column, are written (by default to <root>/results.csv and .md); the
terminal gets a compact table of the most telling columns that fits 120 characters (`--columns`
picks them, comma-separated).
`--sort` puts the best run first: lowest first for losses and errors, highest first otherwise.
Smoke tests (`debug=true`, `<run>_debug/`) are left out unless `--include-debug`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAIN_SETTINGS = [
    "model.name",
    "dataset.name",
    "optimizer.name",
    "optimizer.lr",
    "batch",
    "epoch",
    "tag",
    "seed",
]
# Settings that differ between runs without saying anything about the experiment.
NOT_SETTINGS = ("run_dir", "output", "logging.")


# ---------------------------------------------------------------------- runs and how they ended
def find_runs(root: Path) -> list[Path]:
    """Run directories under `root`: config.yaml beside train.log (MLflow's artifact copies have no log)."""
    return sorted(p.parent for p in Path(root).rglob("config.yaml") if (p.parent / "train.log").is_file())


def run_status(run: Path) -> str:
    """finished, failed, stopped (a signal; resumable) or incomplete (killed outright, or still running).

    summary.txt is written when a run finishes and removed when it is resumed; otherwise the last
    attempt in train.log (from its last "result directory:" line) says how it ended.
    """
    if (run / "summary.txt").is_file():
        return "finished"
    log = (run / "train.log").read_text(errors="replace") if (run / "train.log").is_file() else ""
    last = log[log.rfind("| result directory: ") :] if "| result directory: " in log else log
    if "the run FAILED" in last:
        return "failed"
    if " after step " in last and "stopped by " in last:
        return "stopped"
    return "incomplete"


def checkpoints(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    return sorted([*folder.glob("*.pth"), *folder.glob("dcp_step_*")]) if folder.is_dir() else []


# ---------------------------------------------------------------------- one row per run
def flatten(node: Any) -> dict[str, Any]:
    """A run's settings as flat columns; lists become JSON text so they fit one cell."""
    from src.config.sections import flatten as flat_keys

    flat = flat_keys(node, keep_empty=False) if isinstance(node, dict) else {"": node}
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}


def settings(run: Path) -> dict[str, Any]:
    import yaml

    return flatten(yaml.safe_load((run / "config.yaml").read_text()) or {})


def final_metrics(run: Path) -> dict[str, float]:
    """The last logged value of every val_ metric, then the test metrics."""
    out: dict[str, float] = {}
    history = run / "metrics.jsonl"
    if history.is_file():
        for line in history.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            for key, value in event.items():
                if key.startswith("val_"):
                    out[key] = value
            # An epoch is done when its end-of-epoch line is logged; the test line carries the epoch of
            # the checkpoint it tested (the best one), not the epochs trained.
            if "train_epoch_loss" in event and "epoch" in event:
                out["epochs_done"] = max(int(event["epoch"]), int(out.get("epochs_done", 0)))
    test = run / "test" / "metrics.json"
    if test.is_file():
        out.update(json.loads(test.read_text()))
    return out


def table(root: Path, include_debug: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    runs = find_runs(root)
    configs = {run: settings(run) for run in runs}
    if not include_debug:
        runs = [run for run in runs if not configs[run].get("debug")]
    keys: list[str] = []
    for run in runs:
        keys += [k for k in configs[run] if k not in keys]
    varying = [
        k for k in keys
        if k not in MAIN_SETTINGS and not k.startswith(NOT_SETTINGS)
        and len({json.dumps(configs[r].get(k), sort_keys=True, default=str) for r in runs}) > 1
    ]  # fmt: skip
    rows, metric_names = [], []
    for run in runs:
        metrics = final_metrics(run)
        metric_names += [k for k in metrics if k not in metric_names]
        row = {"run": str(run.relative_to(root)), "status": run_status(run)}
        row.update({k: configs[run].get(k) for k in MAIN_SETTINGS + varying})
        row.update(metrics)
        rows.append(row)
    ordered = sorted(metric_names, key=lambda m: (m != "epochs_done", not m.startswith("val_"), m))
    return ["run", "status", *MAIN_SETTINGS, *varying, *ordered], rows


def sort_rows(rows: list[dict[str, Any]], metric: str, order: str) -> list[dict[str, Any]]:
    if order == "auto":
        order = "asc" if any(word in metric for word in ("loss", "error", "time")) else "desc"
    have = [r for r in rows if isinstance(r.get(metric), (int, float))]
    missing = [r for r in rows if not isinstance(r.get(metric), (int, float))]
    return sorted(have, key=lambda r: r[metric], reverse=order == "desc") + missing


# The terminal table: how each run ended, then the settings that tell the runs apart, then metrics.
COMPACT_FIRST = ["run", "status", "epochs_done"]
COMPACT_METRICS = ["test_accuracy", "test_loss", "val_accuracy", "val_loss"]
WIDTH = 120


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compact_columns(columns: list[str], rows: list[dict[str, Any]], sort: str | None) -> list[str]:
    """The most telling columns, in order of interest, as many as fit WIDTH characters."""
    present = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]
    settings_end = columns.index("epochs_done") if "epochs_done" in columns else len(columns)
    settings = columns[2:settings_end]
    differ = [c for c in settings if c in present and len({cell(row.get(c)) for row in rows}) > 1]
    ranked = [c for c in COMPACT_FIRST if c in present] + ([sort] if sort else [])
    ranked += differ + [c for c in COMPACT_METRICS if c in present]
    ranked += [c for c in present if c.startswith(("test_", "val_"))] + present
    ranked = list(dict.fromkeys(ranked))
    chosen, used = [], 0
    for column in ranked:
        width = max(len(column), *(len(shown(column, row)) for row in rows)) + 2
        if used + width > WIDTH and chosen:
            continue
        chosen.append(column)
        used += width
    return [c for c in ranked if c in chosen]


def shown(column: str, row: dict[str, Any]) -> str:
    """A terminal cell: the run by its folder name (the files keep the path under the root)."""
    value = cell(row.get(column))
    return value.rsplit("/", 1)[-1] if column == "run" else value


def text_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """Columns aligned with spaces, for a terminal."""
    widths = [max(len(c), *(len(shown(c, row)) for row in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(shown(c, row).ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("result"), help="result root (default: result)")
    parser.add_argument("--sort", help="metric column to sort by, best first (e.g. test_accuracy, val_loss)")
    parser.add_argument("--order", choices=["auto", "asc", "desc"], default="auto",
                        help="auto: ascending for loss/error/time metrics, descending otherwise")  # fmt: skip
    parser.add_argument(
        "--columns", help="comma-separated columns to print (default: a compact set that fits 120 characters)"
    )
    parser.add_argument("--csv", type=Path, help="CSV file to write (default: <root>/results.csv)")
    parser.add_argument("--md", type=Path, help="Markdown file to write (default: <root>/results.md)")
    parser.add_argument("--include-debug", action="store_true", help="also list debug=true smoke tests")
    args = parser.parse_args()

    from src.errors import did_you_mean

    if not args.root.is_dir():
        print(
            f"error: result root '{args.root}' does not exist; pass --root <folder holding the runs>",
            file=sys.stderr,
        )
        return 2
    columns, rows = table(args.root, args.include_debug)
    debug = 0 if args.include_debug else sum(bool(settings(r).get("debug")) for r in find_runs(args.root))
    left_out = f" ({debug} debug=true run(s) left out; --include-debug lists them)" if debug else ""
    if not rows:
        print(
            f"no runs under {args.root} (a run is a folder with config.yaml and train.log){left_out}",
            file=sys.stderr,
        )
        return 1
    if args.sort:
        if args.sort not in columns:
            metrics = columns[columns.index("status") + 1 :]
            print(
                f"error: --sort {args.sort}: no such column{did_you_mean(args.sort, metrics)}",
                file=sys.stderr,
            )
            return 2
        rows = sort_rows(rows, args.sort, args.order)
    shown = compact_columns(columns, rows, args.sort)
    if args.columns:
        shown = [c.strip() for c in args.columns.split(",") if c.strip()]
        unknown = [c for c in shown if c not in columns]
        if unknown:
            print(
                f"error: --columns {unknown[0]}: no such column{did_you_mean(unknown[0], columns)}; "
                "every column is in the --csv and --md files",
                file=sys.stderr,
            )
            return 2
    csv_path = args.csv or args.root / "results.csv"
    md_path = args.md or args.root / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown(columns, rows))
    print(text_table(shown, rows), end="")
    print(
        f"\n{len(rows)} run(s), {len(shown)} of {len(columns)} columns shown; all of them in {csv_path} and {md_path}"
        + left_out,
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
