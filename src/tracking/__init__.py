"""Where a run's metrics go: metrics.jsonl, MLflow, TensorBoard, the console log and progress bars,
and the profiler's traces.

Importing this package is cheap: MLflow, TensorBoard and tqdm load when first used.

May import config only; the loop hands it numbers, it never reaches back.
"""

from src.tracking.base import MultiTracker, Tracker
from src.tracking.console import setup_logging
from src.tracking.metrics_file import MetricsFile
from src.tracking.mlflow_tracker import MlflowTracker, resolve_tracking_uri
from src.tracking.progress import Progress
from src.tracking.tensorboard_tracker import TensorBoardTracker

__all__ = [
    "MetricsFile",
    "MlflowTracker",
    "MultiTracker",
    "Progress",
    "TensorBoardTracker",
    "Tracker",
    "resolve_tracking_uri",
    "setup_logging",
]
