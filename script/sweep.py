"""Grid or random search: one result directory per point, skip-and-resume, a table sorted by a metric.

    python script/sweep.py CONFIG optimizer.lr=1e-4,1e-3,1e-2 batch=32,64 [key=value ...]
                           [--random N] [--seed 0] [--gpus 0,1] [--metric val_accuracy --mode max]
    python script/sweep.py CONFIG optimizer.lr=loguniform:1e-5:1e-1 batch=32,64 --optuna 20
                           [--sampler tpe|random|cmaes] [--pruner median|hyperband|none]

A setting with several comma-separated values is an axis of the grid; one with a single value is
applied to every point (quote a value that holds a comma: 'gpu.use="0,1"'). Running the same command
again skips finished points and resumes a cut one. --index K trains point K only (a SLURM array
task, see script/slurm_sweep.sh); --count prints the number of points.

--optuna N runs an Optuna study of N trials instead (pip install -e ".[optuna]"): ranges
(uniform:LO:HI, loguniform:LO:HI, int:LO:HI) and value lists are sampled, each validation feeds the
pruner, and the study is kept in optuna.db in the summary directory, so the same command continues it.
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
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("settings", nargs="*", help="key=v1,v2,... (an axis) or key=value (fixed)")
    parser.add_argument("--random", type=int, help="train N points drawn at random from the grid")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of --random, or of --optuna's sampler (default 0)"
    )
    parser.add_argument("--gpus", help="GPU ids, e.g. 0,1: one point per GPU at once (default: in turn)")
    parser.add_argument("--metric", help="sort by this metric (default: checkpoint.monitor)")
    parser.add_argument(
        "--mode", choices=["min", "max"], help="min or max is best (default: checkpoint.mode)"
    )
    parser.add_argument("--index", type=int, help="train only point K (0-based) and write no summary")
    parser.add_argument("--count", action="store_true", help="print the number of points and exit")
    parser.add_argument(
        "--optuna", type=int, metavar="N", help="an Optuna study of N trials instead of a grid"
    )
    parser.add_argument("--sampler", default="tpe", help="with --optuna: tpe (default), random or cmaes")
    parser.add_argument(
        "--pruner", default="median", help="with --optuna: median (default), hyperband or none"
    )
    args = parser.parse_intermixed_args(argv)

    from src.run.cli import run_cli

    def go() -> int:
        from src.errors import ConfigError
        from src.search.sweep import plan, sweep
        from src.workflows.runs import parse_gpus

        if args.optuna is not None:
            if args.count or args.index is not None or args.random is not None:
                raise ConfigError(
                    "--count, --index and --random list grid points; an Optuna study (--optuna) asks for "
                    "its own trials: leave them out"
                )
            from src.search.optuna_study import study

            gpus = parse_gpus(args.gpus)
            return study(args.config, args.settings, args.optuna, args.sampler, args.pruner, args.seed, gpus,
                         args.metric, args.mode)  # fmt: skip
        if args.count:
            print(len(plan(args.config, args.settings, args.random, args.seed)[2]))
            return 0
        gpus = parse_gpus(args.gpus)
        return sweep(
            args.config, args.settings, args.random, args.seed, gpus, args.metric, args.mode, args.index
        )

    return run_cli(go, show_traceback=False)


if __name__ == "__main__":
    sys.exit(main())
