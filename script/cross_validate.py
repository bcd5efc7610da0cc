"""Train every cross-validation fold of a config and summarise them (mean and standard deviation).

    python script/cross_validate.py CONFIG [key=value ...] [--folds 0,1,2,3,4] [--gpus 0,1]

Each fold is an ordinary result directory (`python train.py CONFIG key=value dataset.fold=k`); the
folds run in turn, or one per GPU at once with --gpus. Running the same command again skips finished
folds and resumes a cut one in place. The summary lands in <output>/<dataset>/<ts>_cv_<hash>_<model>[_<tag>]/.
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
        "config", help="experiment YAML whose dataset takes `fold` (ImageFolder with splits/)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value settings for every fold")
    parser.add_argument(
        "--folds", help="folds to train, e.g. 0,1,2 (default: every fold in splits/info.json)"
    )
    parser.add_argument("--gpus", help="GPU ids, e.g. 0,1: one fold per GPU at once (default: in turn)")
    args = parser.parse_intermixed_args(argv)

    from src.run.cli import run_cli

    def go() -> int:
        from src.workflows.cross_validation import cross_validate, parse_folds
        from src.workflows.runs import parse_gpus

        return cross_validate(args.config, args.overrides, parse_folds(args.folds), parse_gpus(args.gpus))

    return run_cli(go, show_traceback=False)


if __name__ == "__main__":
    sys.exit(main())
