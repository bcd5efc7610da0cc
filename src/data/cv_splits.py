"""The on-disk format of cross-validation splits, read by ImageFolder and written by script/make_splits.py.

    <root>/raw/<class>/<image>          the images, one folder per class
    <root>/splits/info.json             classes, folds, seed, test fraction
    <root>/splits/test.txt              the held-out test images, one path (relative to raw/) a line
    <root>/splits/fold_<k>_train.txt    fold k's training images
    <root>/splits/fold_<k>_val.txt      fold k's validation images

Plain text lists so that a person can read, diff and grep them; the class is a path's first part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from src.errors import RunError

INFO = "info.json"


def split_file(splits: Path, split: str, fold: int) -> Path:
    """The list file of `split` ("train", "val" or "test") for `fold`: one test list serves every fold."""
    return splits / ("test.txt" if split == "test" else f"fold_{fold}_{split}.txt")


def read_info(splits: Path) -> dict[str, Any]:
    path = splits / INFO
    if not path.is_file():
        raise RunError(
            f"no split index at {path}; make one with: python script/make_splits.py {splits.parent / 'raw'} --folds 5"
        )
    return json.loads(path.read_text())


def read_split(root: Path, split: str, fold: int) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, label), ...]) of one split of one fold under `root`."""
    splits, raw = root / "splits", root / "raw"
    info = read_info(splits)
    folds = int(info["folds"])
    if not 0 <= fold < folds:
        raise RunError(f"ImageFolder: dataset.fold={fold} but {splits} holds folds 0..{folds - 1}")
    classes = list(info["classes"])
    index = {name: i for i, name in enumerate(classes)}
    path = split_file(splits, split, fold)
    if not path.is_file():
        raise RunError(f"ImageFolder: split list {path} is missing; remake the splits with --force")
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name = line.split("/", 1)[0]
        if name not in index:
            raise RunError(f"ImageFolder: '{line}' in {path} is not under a class listed in {splits / INFO}")
        items.append((raw / line, index[name]))
    return classes, items
