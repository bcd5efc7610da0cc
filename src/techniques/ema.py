"""model.ema: an exponential moving average of the weights, the weights a run validates, saves and tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from src.errors import ConfigError


class WeightEMA(AveragedModel):
    """Exponential moving average of the weights and float buffers, without host-device syncs.

    torch's AveragedModel reads its step counter on every update (a GPU sync per step); this one
    starts from the initial weights and each update is one fused lerp. Its state dict has
    AveragedModel's layout ("module.<name>", "n_averaged"), which the tester reads.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()],
                    strict=True)  # fmt: skip
        floats, counters = [], []
        for avg, new in pairs:
            (floats if avg.is_floating_point() else counters).append((avg, new.detach()))
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [n for _, n in floats], 1.0 - self.decay)
        for avg, new in counters:  # e.g. BatchNorm's num_batches_tracked: copied, not averaged
            avg.copy_(new)
        self.n_averaged += 1  # a CPU tensor: counting needs no sync


def build_ema(model_cfg: Any, strategy: str, raw_model: nn.Module) -> WeightEMA | None:
    """The average `model.ema` asks for (a decay in [0, 1); 0 = off); not with FSDP's sharded weights."""
    value = model_cfg.get("ema", 0.0) or 0.0
    try:
        decay = float(value)
    except (TypeError, ValueError):
        decay = -1.0
    if not 0 <= decay < 1:
        raise ConfigError(f"model.ema must be a decay in [0, 1), e.g. 0.999 (0 = off), got {value!r}")
    if decay == 0:
        return None
    if strategy == "fsdp":
        raise ConfigError("model.ema is not supported with distributed.strategy=fsdp; set model.ema=0")
    return WeightEMA(raw_model, decay)
