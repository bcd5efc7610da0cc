"""Mixed precision: which autocast dtype to use and whether fp16 needs a GradScaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from src.config.schema import PRECISIONS


@dataclass
class Precision:
    name: str  # "32" | "16" | "bf16"
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"16": torch.float16, "bf16": torch.bfloat16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16, where small gradients underflow without loss scaling."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "16")


def resolve_precision(gpu_cfg: Any, device: torch.device) -> Precision:
    """gpu.precision wins when set; `mixed_precision: true` alone picks bf16 where supported, else fp16."""
    if gpu_cfg.precision is not None:
        name = PRECISIONS[str(gpu_cfg.precision).lower()]
    elif gpu_cfg.mixed_precision:
        bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
        name = "bf16" if bf16_ok else "16"
    else:
        name = "32"
    device_type = device.type if device.type in ("cuda", "cpu", "mps") else "cpu"
    return Precision(name, device_type)


def configure_backends(gpu_cfg: Any) -> None:
    """TF32 matmuls and cudnn autotuning: free speed on Ampere+ GPUs, no effect elsewhere."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(gpu_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(gpu_cfg.tf32)
        torch.backends.cudnn.benchmark = bool(gpu_cfg.cudnn_benchmark)
