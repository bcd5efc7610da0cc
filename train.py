"""Train a model: python train.py CONFIG [key=value ...]  (a result's config.yaml resumes that run)."""

import sys

from src.engine.cli import parse, run_cli


def main() -> int:
    args = parse(sys.argv[1:], "train.py", __doc__)

    def go() -> int:
        from src.config import load_config

        cfg = load_config(args.config, args.overrides)  # a configuration error answers before torch loads
        from src.engine.run import train_main

        return train_main(args.config, args.overrides, cfg=cfg)

    return run_cli(go, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
