"""Moved to src/tracking/start.py; these names stay here only for trainer.py's lazy imports."""

from src.tracking.start import activate_mlflow, start_trackers

__all__ = ["activate_mlflow", "start_trackers"]
