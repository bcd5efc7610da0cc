"""Search hyperparameters with Ray Tune; every trial is an ordinary train.py run (pip install -e ".[ray]").

    python script/ray_tune.py CONFIG optimizer.lr=1e-3,1e-2 batch=32,64 [key=value ...] [--metric val_loss --mode min]
    python script/ray_tune.py CONFIG optimizer.lr=loguniform:1e-5:1e-1 --samples 8 --asha

Value lists are grid axes (as in script/sweep.py); ranges (uniform:LO:HI, loguniform:LO:HI, int:LO:HI)
are sampled --samples times. --asha stops poor trials early (each stops with a checkpoint, resumable).
Running the same command again restores the Tune experiment (--restore insists on it). See
docs/scale-out.md.
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
    parser.add_argument(
        "settings", nargs="*", help="key=v1,v2 (grid), key=loguniform:LO:HI (sampled), key=value"
    )
    parser.add_argument("--metric", help="the metric to optimise (default: checkpoint.monitor)")
    parser.add_argument(
        "--mode", choices=["min", "max"], help="min or max is best (default: checkpoint.mode)"
    )
    parser.add_argument("--samples", type=int, default=1, help="draws of the sampled ranges (default 1)")
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA)")
    parser.add_argument("--restore", action="store_true", help="continue the interrupted experiment")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (default 0)")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_intermixed_args(argv)

    from src.run.cli import run_cli

    def go() -> int:
        from src.search.ray_tune import tune_search

        return tune_search(args.config, args.settings, args.metric, args.mode, args.samples, args.asha,
                           args.restore, args.cpus_per_trial, args.gpus_per_trial, args.max_concurrent,
                           args.address)  # fmt: skip

    return run_cli(go, show_traceback=False)


if __name__ == "__main__":
    sys.exit(main())
