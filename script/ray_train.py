"""Train on a Ray cluster with Ray Train: the template's DDP/FSDP2 run in N Ray workers.

    pip install -e ".[ray]"
    python script/ray_train.py CONFIG [key=value ...] [--workers 2] [--cpus-per-worker 1]
                               [--gpus-per-worker 0] [--max-failures K] [--storage PATH]
                               [--address HOST:PORT] [--portable-checkpoints]

Every run is an ordinary result directory; `python script/ray_train.py <run>/config.yaml --workers N`
resumes it. See docs/scale-out.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.run.ray_launch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
