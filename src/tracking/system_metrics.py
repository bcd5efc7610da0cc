"""Host and GPU use over time (CPU, RAM, disk, network; GPU utilisation and memory) in the MLflow run.

MLflow's own SystemMetricsMonitor does the sampling (psutil for the host, NVIDIA's NVML bindings for
GPUs). It runs as a thread of the MLflow tracking process (`mlflow_worker`), never of the trainer:
one sample every 10 s (MLflow's `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` changes that) cost that
niced background process 15 ms of CPU time on a 2-core VM, with a sqlite store. Metrics land under `system/` (`system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/gpu_0_utilization_percentage`, ...), with the sample
count as the step; a resumed run continues the count. One more sample is taken as the run ends, so a run
shorter than the interval still holds one.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any


def start_monitor(run_id: str, tracking_uri: str) -> tuple[Any | None, str | None]:
    """(the started monitor, None), or (None, why not) when psutil is missing."""
    if importlib.util.find_spec("psutil") is None:
        return None, "logging.system_metrics needs psutil (pip install psutil); no system metrics this run"
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # "Started monitoring ..." and "Skip logging GPU metrics" are INFO lines of no use to the trainer.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor, None


def stop_monitor(monitor: Any) -> str | None:
    """Stop the sampler, then log one closing sample (MLflow logs only after a full interval); returns
    why that sample is missing, if it is (the run is closed all the same)."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # a sampler or store problem must not keep the run from being closed
        return f"MLflow: the closing system metrics sample was not logged: {err}"
    return None
