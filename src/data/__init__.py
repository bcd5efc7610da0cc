"""Datasets, transforms, the resumable sampler and loader building; importing registers them all.

May import config, registry and errors; never models, optim or anything that runs a loop.
"""

from src.data.datasets import (
    CIFAR10,
    CIFAR100,
    MNIST,
    FashionMNIST,
    ImageFolder,
    LabeledSubset,
    SyntheticClassification,
    build_dataset,
    dataset_num_classes,
    stratified_indices,
)
from src.data.loader import build_loader, seed_worker
from src.data.sampler import ResumableSampler
from src.data.split import Split, build_split
from src.data.transforms import EnsureFloat, build_transforms, split_transforms
from src.registry import DATASET_REGISTRY, TRANSFORM_REGISTRY

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASET_REGISTRY",
    "MNIST",
    "TRANSFORM_REGISTRY",
    "EnsureFloat",
    "FashionMNIST",
    "ImageFolder",
    "LabeledSubset",
    "ResumableSampler",
    "Split",
    "SyntheticClassification",
    "build_dataset",
    "build_loader",
    "build_split",
    "build_transforms",
    "dataset_num_classes",
    "seed_worker",
    "split_transforms",
    "stratified_indices",
]
