"""Build the config's model, and check its head against the data before the first step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from src.arguments import accepts
from src.config.sections import component_args
from src.errors import ConfigError
from src.registry import MODEL_REGISTRY


def build_model(section: Any, num_classes: int | None, privacy: Any = None) -> nn.Module:
    """The `model` section built, with the data's class count filled in where the model takes one.

    `privacy`: the config's training.privacy; when enabled the model is made trainable by Opacus.
    """
    args = component_args(section, "model")
    if (
        num_classes is not None
        and "num_classes" not in args
        and accepts(MODEL_REGISTRY.get(args["name"]), "num_classes")
    ):
        args["num_classes"] = num_classes
    model = MODEL_REGISTRY.build(args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{args['name']}' did not build an nn.Module (got {type(model).__name__})")
    if privacy is not None and privacy.get("enabled"):
        from src.models.private import private_model

        model = private_model(model, bool(privacy.get("fix_model", False)))
    if section.get("freeze"):
        from src.models.freezing import freeze

        freeze(model, section.freeze)
    return model


def check_output_size(
    model: nn.Module,
    dataset: Any,
    num_classes: int | None,
    device: torch.device,
    model_name: str,
    dataset_name: str,
) -> None:
    """Catch a classifier head that does not match the dataset before the first step, not mid-epoch.

    `model_name` and `dataset_name` (model.name, dataset.name) only name the two in the error.
    """
    if num_classes is None:
        return
    sample, _ = dataset[0] if isinstance(dataset[0], (tuple, list)) else (None, None)
    if not isinstance(sample, torch.Tensor):
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.unsqueeze(0).to(device))
    except RuntimeError as err:  # shapes that do not fit: say so now, in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model '{model_name}' cannot take the inputs of dataset '{dataset_name}' "
            f"(one item has shape {tuple(sample.shape)}): {reason}; match the model's input arguments to the data"
        ) from None
    model.train(was)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != num_classes:
        raise ConfigError(
            f"model '{model_name}' outputs {out.shape[1]} classes but dataset '{dataset_name}' "
            f"has {num_classes}; set model.num_classes={num_classes}"
        )
