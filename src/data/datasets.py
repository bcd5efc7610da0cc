"""Built-in datasets and `build_dataset`, which adds the template's stratified `subsample`.

Every dataset takes `split` ("train", "val" or "test") and `transform`, returns (float tensor, int)
items, and exposes `num_classes`, `classes` and `targets` so that subsampling, evaluators and
reports never have to load an image to learn the labels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from torch.utils.data import Dataset, Subset

from src.config.sections import to_plain
from src.data.transforms import SPLITS, EnsureFloat
from src.errors import ConfigError, RunError
from src.registry import DATASET_REGISTRY

log = logging.getLogger(__name__)


def _check_split(split: str, where: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{where}: split must be one of {', '.join(SPLITS)}, got '{split}'")


@DATASET_REGISTRY.register()
class SyntheticClassification(Dataset):
    """Random but learnable classes, identical in every process: the no-download dataset of dummy runs.

    Each class owns a fixed prototype (for image shapes, smooth colour gradients, so that CNNs
    with global pooling can learn it, not only MLPs); an item is its class prototype plus Gaussian noise. Prototypes depend only on
    `seed`, the noise on (seed, split, index), so items are made on demand without storing them.
    The noise comes from NumPy's SeedSequence over all three numbers: torch's CPU generator keeps only
    32 bits of a seed, which once gave item i the same noise in every split and for every seed.
    """

    def __init__(
        self,
        split: str,
        transform: Callable | None = None,
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise: float = 1.0,
        seed: int = 0,
    ) -> None:
        _check_split(split, "SyntheticClassification")
        if num_classes < 1:
            raise ConfigError(f"dataset.num_classes must be at least 1, got {num_classes}")
        self.split = split
        self.transform = transform
        self.num_classes = int(num_classes)
        self.classes = [f"class_{i}" for i in range(self.num_classes)]
        self.input_shape = tuple(int(d) for d in input_shape)
        self.noise = float(noise)
        size = {"train": train_size, "val": val_size, "test": test_size}[split]
        # Seeds seed*4 (prototypes) and seed*4+1..3 (splits) never collide across seeds or splits.
        self._split_seed = int(seed) * 4 + 1 + SPLITS.index(split)
        self._noise_key = (int(seed) % 2**64, SPLITS.index(split))
        self.prototypes = self._prototypes(torch.Generator().manual_seed(int(seed) * 4))
        gen = torch.Generator().manual_seed(self._split_seed)
        labels = torch.arange(size) % self.num_classes  # balanced: class counts differ by at most one
        self.targets: list[int] = labels[torch.randperm(size, generator=gen)].tolist()

    def _prototypes(self, gen: torch.Generator) -> torch.Tensor:
        shape = self.input_shape
        if len(shape) == 3:  # (C, H, W): a coarse 2x2 pattern upsampled into smooth colour gradients
            coarse = torch.randn(self.num_classes, shape[0], 2, 2, generator=gen)
            smooth = F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
            return smooth / smooth.std()
        return torch.randn(self.num_classes, *shape, generator=gen)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        target = self.targets[index]
        rng = np.random.default_rng(np.random.SeedSequence([*self._noise_key, int(index)]))
        noise = torch.from_numpy(rng.standard_normal(self.input_shape, dtype=np.float32))
        x = self.prototypes[target] + self.noise * noise
        if self.transform is not None:
            x = self.transform(x)
        return x, target


class _FixedClassFolder(tvd.ImageFolder):
    """torchvision's ImageFolder with the class list imposed, so every split maps a name to one label."""

    def __init__(self, root: str, classes: list[str], transform: Callable | None) -> None:
        self._classes = classes
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {name: i for i, name in enumerate(self._classes)}


class _ListedImages(Dataset):
    """(image, label) pairs from a list of files, loaded the way torchvision's ImageFolder loads them."""

    def __init__(self, items: list[tuple[Path, int]], transform: Callable) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(tvd.folder.default_loader(str(path))), label


def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


@DATASET_REGISTRY.register()
class ImageFolder(Dataset):
    """Images laid out as root/<split>/<class_name>/<image>; class names come from root/train.

    With `fold` set, root holds raw/<class_name>/<image> and the lists of script/make_splits.py in
    splits/ instead: fold k trains and validates on its own lists and tests on the shared test list.
    """

    def __init__(
        self, root: str, split: str, transform: Callable | None = None, fold: int | None = None
    ) -> None:
        _check_split(split, "ImageFolder")
        if fold is not None:
            self._from_splits(root, split, int(fold), transform)
            return
        layout = "expected root/{train,val,test}/<class_name>/<image files>"
        root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.isdir(root):
            raise RunError(f"ImageFolder: dataset.root '{root}' does not exist ({layout})")
        folder = os.path.join(root, split)
        if split == "test" and not os.path.isdir(folder):
            log.warning("ImageFolder: no test split at %s; testing on the val split instead", folder)
            folder = os.path.join(root, "val")
        if not os.path.isdir(folder) and os.path.isdir(os.path.join(root, "splits")):
            raise RunError(
                f"ImageFolder: '{root}' holds raw/ and splits/: choose a fold, e.g. dataset.fold=0"
            )
        if not os.path.isdir(folder):
            raise RunError(f"ImageFolder: split folder '{folder}' does not exist ({layout})")
        train = os.path.join(root, "train")
        self.classes = _subfolders(train if os.path.isdir(train) else folder)
        stray = sorted(set(_subfolders(folder)) - set(self.classes))
        if stray:
            raise RunError(
                f"ImageFolder: class folder(s) {stray} in '{folder}' have no counterpart in '{train}'"
            )
        self.num_classes = len(self.classes)
        self.root = folder
        self._folder = _FixedClassFolder(folder, self.classes, EnsureFloat(transform))
        if len(self._folder) == 0:
            raise RunError(f"ImageFolder: no images found under '{folder}' ({layout})")
        self.targets: list[int] = list(self._folder.targets)

    def _from_splits(self, root: str, split: str, fold: int, transform: Callable | None) -> None:
        from src.data.cv_splits import read_split

        path = Path(os.path.expanduser(str(root))).resolve()
        if not (path / "raw").is_dir():
            raise RunError(
                f"ImageFolder: dataset.fold is set but '{path / 'raw'}' does not exist (root/raw/<class>/<image>)"
            )
        self.classes, items = read_split(path, split, fold)
        self.num_classes = len(self.classes)
        self.root = str(path / "raw")
        self._folder = _ListedImages(items, EnsureFloat(transform))
        if len(self._folder) == 0:
            raise RunError(f"ImageFolder: the {split} list of fold {fold} under '{path / 'splits'}' is empty")
        self.targets = [label for _, label in items]

    def __len__(self) -> int:
        return len(self._folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._folder[index]


class _TorchvisionClassification(Dataset):
    """A torchvision train/test set with an optional val split held out of train.

    With `val_from_train=N`, N train images picked by a fixed permutation become val (the same
    ones in every run); with 0, val and test are both the official test set.
    """

    source: type = tvd.VisionDataset

    def __init__(
        self,
        split: str,
        transform: Callable | None = None,
        root: str = "data",
        download: bool = False,
        val_from_train: int = 0,
    ) -> None:
        name = type(self).__name__
        _check_split(split, name)
        val_from_train = int(val_from_train)
        if val_from_train < 0:
            raise ConfigError(f"{name}: dataset.val_from_train must be >= 0, got {val_from_train}")
        use_train = split == "train" or (split == "val" and val_from_train > 0)
        self.base = self._load(root, use_train, download, EnsureFloat(transform))
        self.classes = list(self.base.classes)
        self.num_classes = len(self.classes)
        targets = [int(t) for t in self.base.targets]
        self.indices: list[int] | None = None
        if use_train and val_from_train > 0:
            if val_from_train >= len(targets):
                raise ConfigError(
                    f"{name}: dataset.val_from_train={val_from_train} leaves no training images "
                    f"(the train set has {len(targets)})"
                )
            order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
            chosen = order[:val_from_train] if split == "val" else order[val_from_train:]
            self.indices = sorted(chosen.tolist())
            targets = [targets[i] for i in self.indices]
        self.targets: list[int] = targets

    def _load(self, root: str, train: bool, download: bool, transform: Callable) -> Any:
        name = type(self).__name__
        expected = getattr(self.source, "base_folder", None) or os.path.join(self.source.__name__, "raw")
        where = os.path.join(os.path.abspath(os.path.expanduser(str(root))), expected)
        try:
            return self.source(str(root), train=train, transform=transform, download=bool(download))
        except RuntimeError as err:
            if download:
                raise RunError(f"{name}: download into '{where}' failed: {err}") from err
            raise RunError(
                f"{name}: dataset files not found in '{where}'; set dataset.download=true to fetch them "
                f"or point dataset.root at the folder that holds '{expected}'"
            ) from err
        except OSError as err:  # network failures while downloading, unreadable files otherwise
            action = "download into" if download else "reading"
            raise RunError(f"{name}: {action} '{where}' failed: {err}") from err

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[self.indices[index] if self.indices is not None else index]
        return x, int(y)


@DATASET_REGISTRY.register()
class CIFAR10(_TorchvisionClassification):
    source = tvd.CIFAR10


@DATASET_REGISTRY.register()
class CIFAR100(_TorchvisionClassification):
    source = tvd.CIFAR100


@DATASET_REGISTRY.register()
class MNIST(_TorchvisionClassification):
    source = tvd.MNIST


@DATASET_REGISTRY.register()
class FashionMNIST(_TorchvisionClassification):
    source = tvd.FashionMNIST


class LabeledSubset(Subset):
    """A Subset that still answers num_classes, classes and targets like the dataset it cuts."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.num_classes = dataset_num_classes(dataset)
        self.classes = getattr(dataset, "classes", None)
        targets = getattr(dataset, "targets", None)
        self.targets = None if targets is None else [int(targets[i]) for i in self.indices]


def stratified_counts(class_sizes: Sequence[int], fraction: float) -> list[int]:
    """How many items of each class a `fraction` keeps: `fraction * size` rounded down, then the items
    the rounding left over (the total rounded to nearest, halves up) go one each to the classes with
    the largest remainders (ties: lower class first); every class keeps at least one. So each class
    is within one item of its share, and the total is round(fraction * total) unless the at-least-one
    rule adds items to tiny classes.
    """
    exact = [fraction * n for n in class_sizes]
    counts = [math.floor(x) for x in exact]
    extra = math.floor(fraction * sum(class_sizes) + 0.5) - sum(counts)
    by_remainder = sorted(range(len(counts)), key=lambda c: (-(exact[c] - counts[c]), c))
    for c in by_remainder[: max(0, extra)]:
        counts[c] += 1
    return [min(n, max(1, k)) for n, k in zip(class_sizes, counts, strict=True)]


def stratified_indices(targets: Sequence[int] | torch.Tensor, fraction: float, seed: int = 0) -> list[int]:
    """A fixed random share `fraction` of each class (see `stratified_counts`), in dataset order."""
    targets = torch.as_tensor(targets)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.unique(targets).tolist()
    members = [torch.nonzero(targets == label).flatten() for label in labels]
    counts = stratified_counts([len(m) for m in members], fraction)
    keep = [
        m[torch.randperm(len(m), generator=gen)[:count]] for m, count in zip(members, counts, strict=True)
    ]
    return sorted(torch.cat(keep).tolist()) if keep else []


def build_dataset(section: Mapping[str, Any] | str, split: str, transform: Callable | None) -> Dataset:
    """The configured dataset for one split, cut to `subsample` of every class when below 1."""
    section = to_plain(section)
    section = {"name": section} if isinstance(section, str) else dict(section)
    fraction = float(section.pop("subsample", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"dataset.subsample must be in (0, 1], got {fraction}")
    dataset = DATASET_REGISTRY.build(section, split=split, transform=transform)
    if fraction == 1.0:
        return dataset
    targets = getattr(dataset, "targets", None)
    if targets is None:
        log.warning(
            "dataset '%s' has no `targets`; subsample=%s takes a uniform random share instead of a stratified one",
            section["name"],
            fraction,
        )
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        indices = sorted(order[: max(1, int(fraction * n + 0.5))].tolist())
    else:
        indices = stratified_indices(targets, fraction)
    return LabeledSubset(dataset, indices)


def dataset_num_classes(dataset: Any) -> int | None:
    """The class count a dataset declares (num_classes, else len(classes)), or None if it says nothing."""
    num = getattr(dataset, "num_classes", None)
    if num is not None:
        return int(num)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes is not None else None
