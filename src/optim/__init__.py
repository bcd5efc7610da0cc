"""Optimizers and LR schedulers: registries, builders from config sections, schedule-free helpers.

May import models (parameter groups follow freezing), config, registry and errors.
"""

from src.optim.optimizers import build_optimizer, is_schedule_free, set_optimizer_mode
from src.optim.schedulers import CosineAnnealingWarmupReduceRestarts, LRSchedule, build_scheduler
from src.registry import LR_SCHEDULER_REGISTRY, OPTIMIZER_REGISTRY

__all__ = [
    "LR_SCHEDULER_REGISTRY",
    "OPTIMIZER_REGISTRY",
    "CosineAnnealingWarmupReduceRestarts",
    "LRSchedule",
    "build_optimizer",
    "build_scheduler",
    "is_schedule_free",
    "set_optimizer_mode",
]
