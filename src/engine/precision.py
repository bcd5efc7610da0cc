"""Mixed precision and the arithmetic it buys: autocast dtype, GradScaler, backend switches, FLOPs and MFU."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from src.config.schema import PRECISIONS

log = logging.getLogger("template")

# Dense bf16/fp16 tensor-core peak of one GPU in TFLOP/s (vendor data sheets, no sparsity). A name
# matches whole words only (see `peak_tflops`): "L40" is not an "L4", "RTX 3090 Ti" not an "RTX 3090".
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


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
    """gpu.precision wins when set; `mixed_precision: true` alone picks bf16 where supported, else fp16."""
    if gpu_cfg.precision is not None:
        name = PRECISIONS[str(gpu_cfg.precision).lower()]
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


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of this GPU from PEAK_TFLOPS; None on CPUs and GPUs not in the table (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tflops = peak_tflops(name)
    if tflops is None:
        log.info("MFU is not reported: unknown peak FLOP/s for GPU '%s' (not in PEAK_TFLOPS)", name)
        return None
    return tflops * 1e12


# Words a device name may carry without changing its peak: vendor and brand, memory size and kind (dropped
# before matching), the SXM socket and the PCIe form factor after the model (the H100 PCIe, which differs,
# has its own entry and comes first).
_IGNORED_WORD = re.compile(r"NVIDIA|TESLA|GEFORCE|\d+GB|HBM\d*E?")
_FORM_FACTOR = re.compile(r"SXM\d*|PCIE")


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name, matched word by word; None (unknown) rather than a guess.

    "NVIDIA H100 80GB HBM3" and "NVIDIA A100-SXM4-80GB" match; "NVIDIA L40", "RTX 3090 Ti" and
    "RTX 4090 Laptop GPU" (other chips, other peaks) do not.
    """
    words = [w for w in re.split(r"[\s\-_]+", device_name.upper()) if w and not _IGNORED_WORD.fullmatch(w)]
    for key, tflops in PEAK_TFLOPS:
        key_words = key.upper().split()
        rest = words[len(key_words) :]
        if words[: len(key_words)] == key_words and all(_FORM_FACTOR.fullmatch(w) for w in rest):
            return tflops
    return None


def train_flops_per_sample(
    build: Callable[[], torch.nn.Module], sample: Any, batch: int, loss_fn: Any
) -> float | None:
    """FLOPs of forward + backward per sample, counted once on a meta-device copy of the model.

    Meta tensors carry shapes but no data, so counting costs neither memory nor device time. A model
    or loss that cannot run on meta tensors (it reads values, or holds real tensors) gives None.
    """
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    from src.engine.evaluate import split_batch, to_device, total_loss

    meta = torch.device("meta")
    try:
        with meta:
            model = build()
        inputs, targets = split_batch(to_device(default_collate([to_device(sample, meta)] * batch), meta))
        with FlopCounterMode(display=False) as counter:
            total_loss(loss_fn(model(inputs), targets)).backward()
    except Exception as err:  # only MFU is lost
        log.info(
            "MFU is not reported: counting FLOPs on the meta device failed (%s: %s)", type(err).__name__, err
        )
        return None
    return counter.get_total_flops() / batch
