"""The shared front of train.py and test.py: arguments in, one clear line and an exit code out."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable


def parse(argv: list[str], prog: str, description: str, with_checkpoint: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="experiment YAML, or result/<...>/config.yaml of an existing run")
    parser.add_argument(
        "overrides", nargs="*", help="key=value settings applied last, e.g. batch=64 optimizer.lr=1e-3"
    )
    if with_checkpoint:
        parser.add_argument("--checkpoint", help="checkpoint file to evaluate (default: the run's best.pth)")
    parser.add_argument(
        "--traceback", action="store_true", help="show Python tracebacks of errors (or TEMPLATE_TRACEBACK=1)"
    )
    return parser.parse_intermixed_args(argv)  # options may sit between the overrides


def run_cli(main: Callable[[], int], show_traceback: bool) -> int:
    """Run `main`, turning the template's errors into one line on stderr and their exit code."""
    from src.errors import TemplateError

    show_traceback = show_traceback or os.environ.get("TEMPLATE_TRACEBACK") == "1"
    try:
        return main()
    except TemplateError as err:
        if show_traceback:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
