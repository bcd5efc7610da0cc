"""Train a model: python train.py CONFIG [key=value ...]  (a result's config.yaml resumes that run)."""

import sys

from src.run import cli


def train(args, cfg) -> int:
    from src.tracking.start import spawn_mlflow

    spawn_mlflow(cfg)  # MLflow's child imports MLflow while this process imports torch
    from src.run.main import train_main

    return train_main(args.config, args.overrides, cfg=cfg)


if __name__ == "__main__":
    sys.exit(cli.main("train.py", __doc__, train))
