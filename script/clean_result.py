"""List result directories not worth keeping, and delete them only when asked.

    python script/clean_result.py [--root result] [--min-age 10]            # list
    python script/clean_result.py [--root result] [--min-age 10] --delete   # list, then delete them

A run is listed when it has no checkpoint (nothing to resume or test) or when it failed (its
train.log ends with "the run FAILED" and no summary.txt was written). Runs touched in the last
--min-age minutes are left out, so a run that is still starting is never listed. Their MLflow runs
stay in the store: delete those in the MLflow UI if you want them gone too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from aggregate_results import checkpoints, find_runs, run_status


def last_touched(run: Path) -> float:
    return max((p.stat().st_mtime for p in run.rglob("*")), default=run.stat().st_mtime)


def size_of(run: Path) -> int:
    return sum(p.stat().st_size for p in run.rglob("*") if p.is_file())


def candidates(root: Path, min_age_minutes: float) -> list[tuple[Path, str]]:
    """(run, why it can go) for every run without checkpoints or that failed, oldest activity first."""
    now = time.time()
    found = []
    for run in find_runs(root):
        if now - last_touched(run) < min_age_minutes * 60:
            continue
        status = run_status(run)
        reasons = [
            why
            for why, hit in (("no checkpoint", not checkpoints(run)), ("failed", status == "failed"))
            if hit
        ]
        if reasons:
            found.append((run, f"{', '.join(reasons)} (status: {status})"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path("result"), help="result root (default: result)")
    parser.add_argument("--min-age", type=float, default=10.0, help="skip runs touched in the last N minutes")
    parser.add_argument("--delete", action="store_true", help="delete the listed runs (default: only list)")
    args = parser.parse_args()
    if not args.root.is_dir():
        print(
            f"error: result root '{args.root}' does not exist; pass --root <folder holding the runs>",
            file=sys.stderr,
        )
        return 2
    found = candidates(args.root, args.min_age)
    if not found:
        print(f"nothing to clean under {args.root}")
        return 0
    total = 0
    for run, why in found:
        size = size_of(run)
        total += size
        print(f"{run}  [{why}, {size / 2**20:.1f} MiB]")
    if not args.delete:
        print(f"{len(found)} run(s), {total / 2**20:.1f} MiB; nothing deleted (add --delete to delete them)")
        return 0
    for run, _ in found:
        shutil.rmtree(run)
        if run.parent != args.root and not any(run.parent.iterdir()):
            run.parent.rmdir()  # the dataset folder it leaves empty
    print(f"deleted {len(found)} run(s), {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
