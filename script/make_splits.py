"""Stratified cross-validation splits plus one held-out test set for a raw/<class>/<image> folder.

    python script/make_splits.py data/<name>/raw --folds 5 [--test-fraction 0.15] [--seed 42] [--force]

Writes data/<name>/splits/: test.txt, fold_<k>_train.txt and fold_<k>_val.txt (image paths relative
to raw/, one a line) and info.json. Train a fold with dataset: {name: ImageFolder, root: data/<name>, fold: k}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The refusal of existing splits (src.workflows.splits raises the same for callers from Python).
ALREADY = "splits already exist at {splits}; add --force to replace them (runs trained on them would no longer match)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("raw", type=Path, help="the raw/ folder: one sub-folder of images per class")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--test-fraction", type=float, default=0.15, help="held-out test share of each class")
    parser.add_argument("--seed", type=int, default=42, help="shuffling seed (default 42)")
    parser.add_argument("--force", action="store_true", help="replace existing splits")
    args = parser.parse_args(argv)
    splits = args.raw.parent / "splits"
    if splits.exists() and not args.force:  # said before importing torch, which takes seconds
        print(f"error: {ALREADY.format(splits=splits)}", file=sys.stderr)
        return 2

    from src.run.cli import run_cli
    from src.workflows.splits import make_splits

    def go() -> int:
        splits = make_splits(args.raw, args.folds, args.test_fraction, args.seed, args.force)
        print(f"wrote {splits}: test.txt and {args.folds} folds (fold_<k>_train.txt, fold_<k>_val.txt)")
        return 0

    return run_cli(go, show_traceback=False)


if __name__ == "__main__":
    sys.exit(main())
