"""Every torchvision classification model, registered under its torchvision name.

`model: {name: resnet50, num_classes: 10, weights: DEFAULT}` builds the ImageNet-pretrained net and
swaps its last layer for a fresh 10-way one, so fine-tuning needs no code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from src.errors import ConfigError, did_you_mean
from src.registry import MODEL_REGISTRY

# These two return (logits, aux_logits) tuples in train mode when aux_logits is on, which no loss
# of the template expects; they are built without the auxiliary heads unless asked for.
_AUX_LOGITS_MODELS = ("googlenet", "inception_v3")


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the logits: the last registered nn.Linear (or nn.Conv2d, for SqueezeNet).

    torchvision registers each classifier head after its backbone, so "last registered" finds
    `fc` (ResNet), `classifier[-1]` (VGG, EfficientNet, MobileNet), `heads.head` (ViT), `head` (Swin).
    """
    for kind in (nn.Linear, nn.Conv2d):
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
        if found:
            return found[-1]
    raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to use as its head")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the head for a freshly initialised one with `num_classes` outputs (in place; returns model)."""
    name, old = find_head(model)
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    else:
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=old.bias is not None,
            **factory,
        )
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def _drop_aux_heads(model: nn.Module) -> None:
    model.aux_logits = False
    for attr in ("AuxLogits", "aux1", "aux2"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def _check_weights(name: str, weights: str) -> int:
    """Validate a weights name without downloading anything; returns its number of classes."""
    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.verify(weights)
    except (KeyError, ValueError):
        choices = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ConfigError(
            f"model '{name}' has no weights '{weights}'{did_you_mean(weights, choices)}; "
            f"choose one of {', '.join(choices)} or null"
        ) from None
    return len(chosen.meta["categories"])


def _factory(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, weights: str | None = None, **kwargs: Any) -> nn.Module:
        aux = kwargs.pop("aux_logits", False) if name in _AUX_LOGITS_MODELS else None
        if weights is None:
            if aux is not None:  # explicit init_weights also silences torchvision's FutureWarning
                kwargs.update(aux_logits=aux, init_weights=kwargs.get("init_weights", True))
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        pretrained_classes = _check_weights(name, weights)
        if aux:  # torchvision insists on building pretrained nets with their aux heads
            kwargs["aux_logits"] = True
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        if aux is False:
            _drop_aux_heads(model)
        if num_classes != pretrained_classes:
            replace_head(model, num_classes)  # the aux heads, if kept, stay at pretrained_classes
        return model

    build.__name__ = name
    build.__qualname__ = name
    build.__doc__ = (
        f"torchvision's {name}: `weights` is a torchvision weights name (e.g. DEFAULT) or None; with "
        f"weights and another num_classes the last layer is replaced. Other keys go to torchvision."
    )
    return build


TORCHVISION_MODELS: list[str] = torchvision.models.list_models(module=torchvision.models)

for _name in TORCHVISION_MODELS:
    MODEL_REGISTRY.add(_name, _factory(_name))
