"""Evaluate on the test split: python test.py result/<...>/config.yaml [key=value ...]
(or python test.py EXPERIMENT.yaml --checkpoint FILE.pth to evaluate any checkpoint with that config)"""

import sys

from src.engine.cli import check_test_input, parse, run_cli


def main() -> int:
    args = parse(sys.argv[1:], "test.py", __doc__, with_checkpoint=True)

    def go() -> int:
        from src.config import load_config

        cfg = load_config(args.config, args.overrides)  # a configuration error answers before torch loads
        check_test_input(args.config, cfg, args.checkpoint)
        from src.engine.run import test_main

        return test_main(args.config, args.overrides, args.checkpoint, cfg=cfg)

    return run_cli(go, args.traceback)


if __name__ == "__main__":
    sys.exit(main())
