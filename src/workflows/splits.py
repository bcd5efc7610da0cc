"""Stratified cross-validation splits with one held-out test set, written once per dataset.

Every class is shuffled with `seed`; its first `test_fraction` goes to the shared test list and the
rest is dealt round-robin into `folds` validation sets (continuing the deal from class to class, so
fold sizes differ by at most one). Fold k trains on every non-test image outside its own val set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from src.data.cv_splits import INFO, split_file
from src.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(raw: Path) -> dict[str, list[str]]:
    """{class name: sorted image paths relative to raw/} for every class folder under `raw`."""
    if not raw.is_dir():
        raise ConfigError(f"raw image folder '{raw}' does not exist; expected <root>/raw/<class>/<image>")
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(raw), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = sorted(
            p.relative_to(raw).as_posix()
            for p in Path(entry.path).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and "\n" not in p.name
        )
        classes[entry.name] = files
    if not classes:
        raise ConfigError(f"'{raw}' has no class folders; expected {raw}/<class>/<image>")
    return classes


def make_splits(
    raw: Path, folds: int = 5, test_fraction: float = 0.15, seed: int = 42, force: bool = False
) -> Path:
    """Write <root>/splits/ beside `raw` and return it; a ConfigError (exit 2) names any bad input."""
    raw = Path(raw)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if not 0.0 < test_fraction < 1.0:  # 0 would leave every fold's final test with an empty list
        raise ConfigError(
            f"--test-fraction must be above 0 and below 1, got {test_fraction}: every fold is tested on the "
            "held-out images; keep some, e.g. --test-fraction 0.15"
        )
    classes = list_images(raw)
    splits = raw.parent / "splits"
    if splits.exists() and not force:
        raise ConfigError(  # script/make_splits.py says the same before importing torch
            f"splits already exist at {splits}; add --force to replace them (runs trained on them "
            "would no longer match)"
        )
    rng = random.Random(seed)
    test: list[str] = []
    val: list[list[str]] = [[] for _ in range(folds)]
    deal = 0
    for name, files in classes.items():
        files = list(files)
        rng.shuffle(files)
        n_test = round(test_fraction * len(files))
        if len(files) - n_test < folds:
            raise ConfigError(
                f"class '{name}' in {raw} has {len(files)} image(s); after its test share ({n_test}) "
                f"{len(files) - n_test} remain for --folds {folds}, and every fold's validation set needs one "
                "of each class; add images, or use fewer folds or a smaller --test-fraction"
            )
        test += files[:n_test]
        for item in files[n_test:]:
            val[deal % folds].append(item)
            deal += 1
    if not test:
        smallest = min(len(files) for files in classes.values())
        raise ConfigError(
            f"--test-fraction {test_fraction} of {raw} rounds to no test image (the smallest class has "
            f"{smallest}); raise it to at least {1 / smallest:.2g}, since every fold is tested on the held-out images"
        )
    tmp = splits.with_name(f".splits.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_list(split_file(tmp, "test", 0), test)
    for k in range(folds):
        train = [item for j in range(folds) if j != k for item in val[j]]
        _write_list(split_file(tmp, "train", k), train)
        _write_list(split_file(tmp, "val", k), val[k])
    info = {
        "classes": list(classes),
        "folds": folds,
        "test_fraction": test_fraction,
        "seed": seed,
        "images": {name: len(files) for name, files in classes.items()},
        "test_images": len(test),
    }
    (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    if splits.exists():
        shutil.rmtree(splits)
    os.replace(tmp, splits)  # all lists appear at once: a crash never leaves half of them
    return splits


def _write_list(path: Path, items: list[str]) -> None:
    path.write_text("".join(f"{item}\n" for item in sorted(items)), encoding="utf-8")
