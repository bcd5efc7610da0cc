"""Mixed precision: autocast dtype, GradScaler and backend switches (FLOPs and MFU: flops.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.config.schema import PRECISIONS

log = logging.getLogger("template")


@dataclass
class Precision:
    name: str  # "32" | "16" | "bf16"
    device_type: str

    @property
    def label(self) -> str:
        """How logs name it: fp32, fp16 or bf16 (the bare "32" reads as a count)."""
        return {"32": "fp32", "16": "fp16"}.get(self.name, self.name)

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
    """gpu.precision wins when set; `mixed_precision: true` alone picks bf16 where supported, else fp16.

    On a CPU without native bf16 matmul, `mixed_precision: true` alone means fp32: emulated bf16
    autocast is several times slower there, and the flag asks for speed, not for a dtype.
    """
    if gpu_cfg.precision is not None:
        name = PRECISIONS[str(gpu_cfg.precision).lower()]
    elif gpu_cfg.mixed_precision and device.type == "cpu" and not _cpu_has_native_bf16():
        _say_fp32_instead()
        name = "32"
    elif gpu_cfg.mixed_precision:
        bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
        name = "bf16" if bf16_ok else "16"
    else:
        name = "32"
    device_type = device.type if device.type in ("cuda", "cpu", "mps") else "cpu"
    if device_type == "cpu" and name != "32" and not _cpu_has_native_bf16():
        log.warning(
            "%s autocast on this CPU (%s) is emulated and can be many times slower than fp32; "
            "set gpu.mixed_precision=false gpu.precision=32 for CPU runs",
            "bf16" if name == "bf16" else "fp16", torch.backends.cpu.get_cpu_capability(),
        )  # fmt: skip
    return Precision(name, device_type)


@functools.cache
def _say_fp32_instead() -> None:
    """Once per process: training and the test after it resolve the precision each."""
    log.info(
        "gpu.mixed_precision: this CPU (%s) has no native bf16 matmul (AMX or AVX512-BF16), where "
        "autocast runs slower than fp32: training in fp32; gpu.precision=bf16 forces bf16",
        torch.backends.cpu.get_cpu_capability(),
    )


# CPU features that compute bf16 products in hardware: x86 AMX and AVX512-BF16, Arm's BF16 extension.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (oneDNN's own check also says yes to plain AVX512,
    which only emulates it)."""
    get = getattr(torch.cpu, "get_capabilities", None)  # cpuinfo's flags; torch >= 2.6 on most builds
    if get is not None:
        try:
            caps = get()
            return any(bool(caps.get(flag)) for flag in NATIVE_BF16)
        except RuntimeError:
            pass
    try:  # Linux: the kernel's flag list ("flags" on x86, "Features" on Arm)
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return any(flag in words for flag in NATIVE_BF16)


def configure_backends(gpu_cfg: Any) -> None:
    """TF32 matmuls and cudnn autotuning: free speed on Ampere+ GPUs, no effect elsewhere.

    `gpu.deterministic` turns autotuning off and allows deterministic kernels only (CPU ops are
    deterministic already, so on a CPU it changes nothing).
    """
    deterministic = bool(gpu_cfg.get("deterministic", False))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(gpu_cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(gpu_cfg.tf32)
        torch.backends.cudnn.benchmark = bool(gpu_cfg.cudnn_benchmark) and not deterministic
        torch.backends.cudnn.deterministic = deterministic


# cuBLAS needs a fixed workspace for reproducible matmuls; it reads this before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"


def prepare_determinism(gpu_cfg: Any) -> None:
    """Before anything touches CUDA: the environment cuBLAS reads when it starts."""
    if bool(gpu_cfg.get("deterministic", False)):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def nondeterministic_op(err: BaseException) -> str | None:
    """The op named by torch's error for a kernel without a deterministic implementation, else None."""
    text = str(err)
    if "does not have a deterministic implementation" not in text:
        return None
    return text.split(" does not have", 1)[0].strip() or "an operation"
