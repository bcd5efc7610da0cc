"""Evaluate a run on its test split: python test.py result/<...>/config.yaml [key=value ...]"""

import sys

from src.engine.cli import parse, run_cli


def main() -> int:
    args = parse(sys.argv[1:], "test.py", __doc__, with_checkpoint=True)

    def go() -> int:
        from src.config import load_config

        cfg = load_config(args.config, args.overrides)  # a configuration error answers before torch loads
        from src.engine.run import test_main

        return test_main(args.config, args.overrides, args.checkpoint, cfg=cfg)

    return run_cli(go, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
