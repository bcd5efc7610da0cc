"""The shared front of train.py and test.py: arguments in, one clear line and an exit code out."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any


def parse(argv: list[str], prog: str, description: str, with_checkpoint: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if with_checkpoint:
        config_help = (
            "result/<...>/config.yaml of a run (writes <run>/test/), or an experiment YAML together with "
            "--checkpoint"
        )
    else:
        config_help = "experiment YAML, or result/<...>/config.yaml of an existing run"
    parser.add_argument("config", help=config_help)
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # optional: without a default argparse lists them as required when config is missing
        help="optional key=value settings applied last, e.g. batch=64 optimizer.lr=1e-3",
    )
    if with_checkpoint:
        parser.add_argument(
            "--checkpoint",
            help="checkpoint file to evaluate (default: the run's best.pth); with an experiment YAML the "
            "results go to test_<name>/ beside the checkpoint",
        )
    parser.add_argument(
        "--traceback", action="store_true", help="show Python tracebacks of errors (or TEMPLATE_TRACEBACK=1)"
    )
    return parser.parse_intermixed_args(argv)  # options may sit between the overrides


def check_test_input(config: str, cfg: object, checkpoint: str | None) -> None:
    """test.py's own mistakes, answered before torch is imported (a config's are answered by the loader)."""
    from pathlib import Path

    from src.errors import ConfigError

    if checkpoint is not None and not Path(checkpoint).is_file():
        folder = Path(checkpoint).parent
        near = ""
        if folder.is_dir():
            from src.errors import did_you_mean

            near = did_you_mean(Path(checkpoint).name, [p.name for p in folder.glob("*.pth")])
        raise ConfigError(f"--checkpoint {checkpoint}: no such file{near}")
    if not getattr(cfg, "run_dir", None) and checkpoint is None:
        raise ConfigError(
            f"{config} is an experiment config, not a run's: pass result/<...>/config.yaml, or add "
            "--checkpoint <file.pth> to evaluate that checkpoint with this config"
        )


def main(
    script: str,
    doc: str | None,
    entry: Callable[[argparse.Namespace, Any], int],
    with_checkpoint: bool = False,
    argv: list[str] | None = None,
) -> int:
    """train.py's and test.py's whole front: parse, load the config (errors answer before torch loads), run."""
    from src.engine.signals import watch_launcher

    watch_launcher()  # first: a torchrun worker reads its launcher's pid before that can die
    args = parse(sys.argv[1:] if argv is None else argv, script, doc or "", with_checkpoint=with_checkpoint)

    def go() -> int:
        from src.config import load_config

        return entry(args, load_config(args.config, args.overrides))

    code = run_cli(go, args.traceback)
    dist_utils = sys.modules.get("src.distributed.process_group")  # loaded only if the run got that far
    if dist_utils is not None and dist_utils.started_process_group:
        dist_utils.exit_process(code)
    return code


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
