"""Transforms from config: every torchvision.transforms.v2 class by name, composed per split."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from src.config.sections import to_plain
from src.errors import ConfigError, did_you_mean
from src.registry import TRANSFORM_REGISTRY

SPLITS = ("train", "val", "test")


def _register_torchvision() -> None:
    for name in dir(v2):
        obj = getattr(v2, name)
        if isinstance(obj, type) and issubclass(obj, v2.Transform) and obj is not v2.Transform:
            TRANSFORM_REGISTRY.add(name, obj)


_register_torchvision()


def _dtype(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    name = value.removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        choices = [n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)]
        raise ConfigError(f"{where}: dtype '{value}' is not a torch dtype{did_you_mean(name, choices)}")
    return dtype


def _enum(enum: type, value: Any, where: str) -> Any:
    """Config strings such as 'bilinear' or 'BILINEAR' to the torchvision enum member."""
    if not isinstance(value, str):
        return value
    for member in enum:
        if value.lower() in (member.value, member.name.lower()):
            return member
    choices = [m.value for m in enum]
    raise ConfigError(f"{where}: '{value}' is not one of {choices}{did_you_mean(value.lower(), choices)}")


def _build_one(item: Any) -> Callable:
    section = {"name": item} if isinstance(item, str) else dict(item)
    if not section.get("name"):
        raise ConfigError(f"transform item {item!r} needs a 'name' (e.g. {{name: Resize, size: 32}})")
    where = f"transform '{section['name']}'"
    for key, value in section.items():
        if key == "dtype":
            section[key] = _dtype(value, where)
        elif key == "interpolation":
            section[key] = _enum(v2.InterpolationMode, value, where)
        elif key == "policy":
            section[key] = _enum(v2.AutoAugmentPolicy, value, where)
        elif key == "transforms" and isinstance(value, list):  # RandomApply, RandomChoice, RandomOrder
            section[key] = [_build_one(v) for v in value]
    return TRANSFORM_REGISTRY.build(section)


def build_transforms(items: list | None) -> Callable | None:
    """One split's pipeline; each item is a name or {name: ..., **kwargs}. None when there is none."""
    items = to_plain(items)
    if not items:
        return None
    if not isinstance(items, list):
        raise ConfigError(f"a transform list must be a YAML list of names or mappings, got {items!r}")
    return v2.Compose([_build_one(item) for item in items])


def split_transforms(section: Mapping | None) -> dict[str, Callable | None]:
    """The `transform:` section as one pipeline per split; a missing or null test list reuses val."""
    section = to_plain(section) or {}
    for key in section:
        if key not in SPLITS:
            raise ConfigError(
                f"unknown key 'transform.{key}'{did_you_mean(key, SPLITS)}; the section takes train, val and test"
            )
    built = {split: build_transforms(section.get(split)) for split in ("train", "val")}
    test = section.get("test")
    built["test"] = built["val"] if test is None else build_transforms(test)
    return built


class EnsureFloat:
    """Ends every dataset pipeline: PIL/ndarray/integer images become float tensors in [0, 1].

    Float tensors pass through untouched, so pipelines that already end in ToDtype cost nothing.
    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, transform: Callable | None = None) -> None:
        self.transform = transform

    def __call__(self, x: Any) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        if not isinstance(x, torch.Tensor):
            x = v2.functional.to_image(x)
        if not x.is_floating_point():
            x = v2.functional.to_dtype(x, torch.float32, scale=True)
        return x.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"EnsureFloat({self.transform!r})"
