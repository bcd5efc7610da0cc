"""Models for script/gpu_check.sh, registered through `imports:`.

KillableCNN dies by SIGKILL at the GPU_CHECK_KILL_AT-th training forward (a kill at an exact step,
however fast the GPU is); MaxPooledCNN max-pools a learnable scaling of its input with
adaptive_max_pool2d, whose CUDA backward has no deterministic kernel (torch 2.11 on an H200; bilinear
upsampling, used before, gained one and could no longer show the error).
"""

import os
import signal

import torch
import torch.nn.functional as F

from src.models.small import SimpleCNN
from src.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class KillableCNN(SimpleCNN):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and os.environ.get("GPU_CHECK_KILL_AT"):
            KillableCNN.calls += 1
            if KillableCNN.calls == int(os.environ["GPU_CHECK_KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


@MODEL_REGISTRY.register()
class MaxPooledCNN(SimpleCNN):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.ones(1))  # so the pooling's backward runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.adaptive_max_pool2d(x * self.scale, (h // 2 + 1, w // 2 + 1))
        return super().forward(x)
