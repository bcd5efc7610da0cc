"""Compare two models over the same folds: mean difference and paired t-test p-value per metric.

    python script/compare.py A B [--metric test_accuracy] [--alpha 0.05] [--json] [--latest]

A and B are cross-validation directories (<ts>_cv_<hash>_<model>/, from cross_validate.py), their
cv_summary.csv, or comma-separated lists of finished run directories (paired by dataset.fold).
Where a shell pattern matches several directories, compare.py names them; --latest takes the
newest match of each side.
The last line is the verdict for --metric (default test_accuracy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sides", nargs="+", metavar="A B",
        help="model A, then model B: a CV directory, a cv_summary.csv, or run directories r1,r2,...",
    )  # fmt: skip
    parser.add_argument("--latest", action="store_true",
                        help="where a pattern matches several directories, take the newest")  # fmt: skip
    parser.add_argument("--metric", help="the metric of the verdict (default test_accuracy)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from src.run.cli import run_cli

    def go() -> int:
        from src.errors import ConfigError
        from src.workflows.compare import compare, pick_sides, table, to_json

        if not 0 < args.alpha < 1:
            raise ConfigError(f"--alpha must be between 0 and 1, got {args.alpha}")
        a, b = pick_sides(args.sides, args.latest)
        rows, verdict = compare(a, b, args.metric, args.alpha)
        print(to_json(rows, verdict) if args.json else table(rows) + "\n" + verdict)
        return 0

    return run_cli(go, show_traceback=False)


if __name__ == "__main__":
    sys.exit(main())
