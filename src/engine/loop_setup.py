"""Small pieces of the loop's set-up: fused optimizer kernels, background builds, the lr to log."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import torch
from omegaconf import OmegaConf

from src.optim.param_groups import group_name

log = logging.getLogger("template")


def fused_on_cuda(section: Any, device: torch.device) -> Any:
    """Adam, AdamW and SGD on CUDA use the fused kernel (one launch for all parameters, and fp16 loss
    scaling without a sync) unless the config chose an implementation itself."""
    if device.type != "cuda" or section.get("name") not in ("Adam", "AdamW", "SGD"):
        return section
    if any(key in section for key in ("fused", "foreach", "differentiable", "capturable")):
        return section
    log.info(
        "optimizer %s: fused CUDA kernel (set optimizer.fused=false to turn it off)", section.get("name")
    )
    return OmegaConf.merge(section, {"fused": True})


def in_background(fn: Any, *args: Any) -> concurrent.futures.Future:
    """Run `fn(*args)` on a worker thread; `.result()` waits for it and re-raises its error."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-build")
    job = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return job


def step_lr(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every group's lr now, by group name, the first group first; a tensor lr (schedulers update those
    in place) is copied, without a sync."""
    lrs = {}
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        lrs[group_name(group, i)] = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
    return lrs
