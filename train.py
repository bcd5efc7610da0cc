"""Train a model: python train.py CONFIG [key=value ...]  (a result's config.yaml resumes that run)."""

import sys

from src.engine.cli import parse, run_cli


def main() -> int:
    args = parse(sys.argv[1:], "train.py", __doc__)

    def go() -> int:
        from src.engine.run import train_main

        return train_main(args.config, args.overrides)

    return run_cli(go, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
