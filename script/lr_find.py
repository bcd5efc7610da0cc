"""LR range test: sweep the learning rate exponentially and suggest one.

    python script/lr_find.py CONFIG [key=value ...] [--start 1e-7] [--end 1] [--steps 100]

Uses the config's model, optimizer, precision and accumulation on its train split. Writes
lr_find.csv and lr_find.png into <output>/<dataset>/<YYYYMMDD_HHMMSS>_lrfind_<model>/ and prints
the suggested lr with the override that uses it. The logic is in src/workflows/lr_find.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value settings, as for train.py")
    parser.add_argument("--start", type=float, default=1e-7, help="first lr (default 1e-7)")
    parser.add_argument("--end", type=float, default=1.0, help="last lr (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps, one per lr (default 100)")
    parser.add_argument(
        "--diverge", type=float, default=4.0, help="stop when the smoothed loss exceeds this x its best"
    )
    args = parser.parse_intermixed_args()

    import src  # noqa: F401  (registers the built-in components)
    from src.config import load_config
    from src.engine.build import preflight
    from src.errors import TemplateError
    from src.tracking import setup_logging
    from src.user_modules import import_user_modules
    from src.workflows.lr_find import lr_range_test, write_outputs

    try:
        cfg = load_config(args.config, args.overrides)
        import_user_modules(list(cfg.imports))
        preflight(cfg)
        setup_logging(None, 0)
        result = lr_range_test(cfg, args.start, args.end, args.steps, args.diverge)
        folder = write_outputs(result, cfg)
    except TemplateError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    how = "stopped early: the loss diverged" if result.stopped_early else "swept the whole range"
    print(f"LR range test: {len(result.lrs)} steps from {args.start:g}, {how}; results in {folder}")
    if result.suggestion is None:
        print("no suggestion: too few steps before the loss diverged; lower --start or raise --steps")
        return 1
    print(f"suggested lr: {result.suggestion:.3g}")
    print(
        f"  python train.py {args.config} {' '.join([*args.overrides, f'optimizer.lr={result.suggestion:.3g}'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
