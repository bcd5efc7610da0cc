"""Models for script/gpu_check.sh, registered through `imports:`.

KillableCNN dies by SIGKILL at the GPU_CHECK_KILL_AT-th training forward (a kill at an exact step,
however fast the GPU is); BilinearCNN upsamples, whose CUDA backward has no deterministic kernel.
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
class BilinearCNN(SimpleCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return super().forward(x)
