"""Evaluate on the test split: python test.py result/<...>/config.yaml [key=value ...]
(or python test.py EXPERIMENT.yaml --checkpoint FILE.pth to evaluate any checkpoint with that config)"""

import sys

from src.run import cli


def evaluate_run(args, cfg) -> int:
    cli.check_test_input(args.config, cfg, args.checkpoint)
    from src.run.main import test_main

    return test_main(args.config, args.overrides, args.checkpoint, cfg=cfg)


if __name__ == "__main__":
    sys.exit(cli.main("test.py", __doc__, evaluate_run, with_checkpoint=True))
