"""Models and losses; importing this package registers them all.

MODEL_REGISTRY holds the two small models of `small.py` (SimpleCNN, MLP) and every torchvision
classification model under its torchvision name (resnet50, vit_b_16, ...). A model is called as
`model(inputs)` and returns its outputs: a tensor, or a dict of tensors.

LOSS_REGISTRY holds every torch.nn loss under its class name. The loss contract: `loss_fn(outputs,
targets)` returns a scalar tensor, or a dict of named scalar tensors whose sum is what gets trained
(each entry is logged under its own name). A custom loss is any callable with that signature:

    @LOSS_REGISTRY.register()
    class DistillLoss(nn.Module):
        def forward(self, outputs, targets):
            return {"ce": ..., "kd": ...}

May import config, registry and errors; never data, optim or anything that runs a loop.
"""

from src.models.build import build_model, check_output_size
from src.models.losses import TORCH_LOSSES, build_loss
from src.models.small import MLP, SimpleCNN
from src.models.torchvision_models import TORCHVISION_MODELS, find_head, replace_head
from src.registry import LOSS_REGISTRY, MODEL_REGISTRY

__all__ = [
    "LOSS_REGISTRY",
    "MLP",
    "MODEL_REGISTRY",
    "TORCHVISION_MODELS",
    "TORCH_LOSSES",
    "SimpleCNN",
    "build_loss",
    "build_model",
    "check_output_size",
    "find_head",
    "replace_head",
]
