"""Two tiny models that train in seconds on a CPU: for smoke tests, debugging and small datasets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from src.errors import RunError
from src.registry import MODEL_REGISTRY


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    # With BatchNorm right after, the conv bias is redundant.
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


@MODEL_REGISTRY.register()
class SimpleCNN(nn.Module):
    """Three conv stages (width, 2*width, 4*width) and global average pooling.

    Two 2x2 poolings and the global pool make it accept any image of at least 8x8 pixels, so the
    same model serves MNIST, CIFAR and larger toy images.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        dropout: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(in_channels, width, batch_norm),
            nn.MaxPool2d(2),
            *_conv_block(width, 2 * width, batch_norm),
            nn.MaxPool2d(2),
            *_conv_block(2 * width, 4 * width, batch_norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODEL_REGISTRY.register()
class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout per hidden width, then a Linear head (no BatchNorm)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The usual mistake is a wrong in_features; say which value fits instead of a matmul error.
        per_sample = x.shape[1:].numel()
        if per_sample != self.in_features:
            raise RunError(
                f"MLP was built with in_features={self.in_features} but its inputs have {per_sample} "
                f"values per sample (shape {tuple(x.shape)}); set model.in_features: {per_sample}"
            )
        return self.net(x)
