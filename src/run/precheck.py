"""Check a train.py / test.py command line once, before torchrun starts any worker.

    python -m src.run.precheck train.py CONFIG [key=value ...]

torchrun.sh and multinode.sh run this first: a configuration error is then one `error:` line and
exit 2, instead of that line from every worker followed by torchrun's ChildFailedError report.
It imports the config loader only (no torch), so it costs a fraction of a second. Exit 0 means
"nothing found": the workers still run every check themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from src.run.cli import check_test_input, parse


def main(argv: list[str]) -> int:
    if not argv or Path(argv[0]).name not in ("train.py", "test.py"):
        return 0  # another script: its own business
    script, args = Path(argv[0]).name, argv[1:]
    if any(a in ("-h", "--help") for a in args):
        return 0  # the workers print the help
    parsed = parse(args, script, "", with_checkpoint=script == "test.py")  # usage errors exit 2 here
    from src.config import load_config
    from src.errors import ConfigError

    try:
        cfg = load_config(parsed.config, parsed.overrides)
        if script == "test.py":
            check_test_input(parsed.config, cfg, parsed.checkpoint)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception:  # not this check's to judge: the workers report it with the full context
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
