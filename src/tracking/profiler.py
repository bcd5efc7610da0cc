"""profiling.enabled: a torch.profiler trace of a few training steps, for TensorBoard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("template")


def start_profiler(p: Any, ctx: Any, run_dir: Path) -> Any:
    """A started profiler the loop steps once per optimizer step (rank 0 only), or None when off."""
    if not p.enabled or not ctx.is_main:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    prof = profile(
        activities=activities,
        schedule=schedule(wait=int(p.wait), warmup=int(p.warmup), active=int(p.active), repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile")),
        profile_memory=bool(p.profile_memory),
        record_shapes=bool(p.record_shapes),
        with_stack=bool(p.with_stack),
    )
    prof.start()
    log.info(
        "profiling steps %d..%d into %s", p.wait + p.warmup, p.wait + p.warmup + p.active, run_dir / "profile"
    )
    return prof
