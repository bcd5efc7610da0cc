"""FLOP accounting for MFU: the GPU's peak from a table, and a training step's FLOPs counted on meta tensors."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from src.data.batch import split_batch, to_device, total_loss

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
