"""The data package: datasets, subsampling, transforms, the resumable sampler and loader building."""

from __future__ import annotations

import logging
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data import (
    EnsureFloat,
    ResumableSampler,
    build_dataset,
    build_loader,
    build_transforms,
    dataset_num_classes,
    split_transforms,
)
from src.errors import ConfigError, RunError
from src.registry import DATASET_REGISTRY, TRANSFORM_REGISTRY

SYNTH = {"name": "SyntheticClassification", "train_size": 60, "val_size": 20, "test_size": 20}


def items(ds: Dataset) -> tuple[torch.Tensor, list[int]]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), list(ys)


# --- synthetic ------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_independent_of_global_rng() -> None:
    torch.manual_seed(1)
    x1, y1 = items(DATASET_REGISTRY.build(SYNTH, split="train", transform=None))
    torch.manual_seed(2)
    torch.rand(5)
    x2, y2 = items(DATASET_REGISTRY.build(SYNTH, split="train", transform=None))
    assert torch.equal(x1, x2) and y1 == y2
    assert x1.dtype == torch.float32 and x1.shape == (60, 3, 32, 32)


def test_synthetic_splits_and_seeds_differ_but_share_classes() -> None:
    train = DATASET_REGISTRY.build(SYNTH, split="train", transform=None)
    val = DATASET_REGISTRY.build(SYNTH, split="val", transform=None)
    other = DATASET_REGISTRY.build({**SYNTH, "seed": 1}, split="val", transform=None)
    xv, _ = items(val)
    assert not torch.equal(xv, items(other)[0])
    assert not torch.equal(items(train)[0][:20], xv)
    assert torch.equal(train.prototypes, val.prototypes)  # otherwise val could not measure learning
    assert len(val) == 20 and val.classes == train.classes and val.num_classes == 10


def test_synthetic_classes_are_balanced_and_targets_match_items() -> None:
    ds = DATASET_REGISTRY.build({**SYNTH, "num_classes": 4, "train_size": 42}, split="train", transform=None)
    counts = Counter(ds.targets)
    assert sorted(counts) == [0, 1, 2, 3] and max(counts.values()) - min(counts.values()) <= 1
    assert [ds[i][1] for i in range(len(ds))] == ds.targets


def test_synthetic_vector_inputs_and_transform() -> None:
    ds = DATASET_REGISTRY.build(
        {**SYNTH, "input_shape": [32], "noise": 0.0}, split="test", transform=lambda x: x * 2
    )
    x, y = ds[3]
    assert x.shape == (32,) and torch.equal(x, 2 * ds.prototypes[y])


# --- ImageFolder ----------------------------------------------------------------------------------


def write_pngs(root: Path, split: str, classes: dict[str, int], size: tuple[int, int] = (8, 6)) -> None:
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, color=(40 * i, 100, 200)).save(folder / f"{i}.png")


def test_image_folder_builds_float_tensors_with_train_class_labels(tmp_path: Path) -> None:
    write_pngs(tmp_path, "train", {"cat": 2, "dog": 3})
    write_pngs(tmp_path, "val", {"dog": 2})  # val lacks 'cat': 'dog' must keep label 1
    section = {"name": "ImageFolder", "root": str(tmp_path)}
    train = build_dataset(section, "train", None)
    val = build_dataset(section, "val", None)
    x, _ = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 6, 8) and x.min() >= 0.0 and x.max() <= 1.0
    assert train.classes == ["cat", "dog"] and train.num_classes == 2 and train.targets == [0, 0, 1, 1, 1]
    assert val.classes == ["cat", "dog"] and val.targets == [1, 1] and val[0][1] == 1


def test_image_folder_test_split_falls_back_to_val(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_pngs(tmp_path, "train", {"a": 1, "b": 1})
    write_pngs(tmp_path, "val", {"a": 2, "b": 1})
    pipeline = build_transforms([{"name": "Resize", "size": [4, 4]}])
    with caplog.at_level(logging.WARNING):
        test = build_dataset({"name": "ImageFolder", "root": str(tmp_path)}, "test", pipeline)
    assert len(test) == 3 and test.targets == [0, 0, 1]
    assert test[0][0].shape == (3, 4, 4) and test[0][0].dtype == torch.float32
    assert "no test split" in caplog.text


def test_image_folder_missing_root_or_split_or_images(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(RunError, match=str(missing)):
        build_dataset({"name": "ImageFolder", "root": str(missing)}, "train", None)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(RunError, match=r"split folder .*val"):
        build_dataset({"name": "ImageFolder", "root": str(tmp_path)}, "val", None)
    with pytest.raises(RunError, match="no images"):
        build_dataset({"name": "ImageFolder", "root": str(tmp_path)}, "train", None)


# --- torchvision sets -----------------------------------------------------------------------------


def test_cifar10_without_files_asks_for_download(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"dataset\.download=true") as err:
        build_dataset({"name": "CIFAR10", "root": str(tmp_path)}, "train", None)
    assert str(tmp_path) in str(err.value)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format MNIST ships in: magic (uint8 type, ndim), big-endian sizes, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int = 20, n_test: int = 6) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def test_mnist_gives_one_channel_floats_and_holds_out_val(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    section = {"name": "MNIST", "root": str(tmp_path), "val_from_train": 5}
    train, val, test = (build_dataset(section, split, None) for split in ("train", "val", "test"))
    x, _ = val[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert (len(train), len(val), len(test)) == (15, 5, 6) and train.num_classes == 10
    assert not set(train.indices) & set(val.indices)
    assert [val[i][1] for i in range(5)] == val.targets
    plain_val = build_dataset({"name": "MNIST", "root": str(tmp_path)}, "val", None)
    assert plain_val.targets == test.targets and len(plain_val) == 6


# --- subsample ------------------------------------------------------------------------------------


def test_subsample_is_stratified_deterministic_and_keeps_attributes() -> None:
    section = {**SYNTH, "num_classes": 3, "train_size": 90, "subsample": 0.2}
    a = build_dataset(section, "train", None)
    b = build_dataset(section, "train", None)
    assert a.indices == b.indices and len(a) == 18
    assert Counter(a.targets) == {0: 6, 1: 6, 2: 6}
    assert (
        a.num_classes == 3 and dataset_num_classes(a) == 3 and a.classes == ["class_0", "class_1", "class_2"]
    )
    assert [a[i][1] for i in range(len(a))] == a.targets
    full = build_dataset({**section, "subsample": 1.0}, "train", None)
    assert torch.equal(a[0][0], full[a.indices[0]][0])


def test_subsample_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"subsample"):
        build_dataset({**SYNTH, "subsample": 1.5}, "train", None)


class NoTargets(Dataset):
    def __init__(self, split: str, transform=None) -> None:
        self.split = split

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), 0


def test_subsample_without_targets_takes_a_fixed_uniform_share() -> None:
    DATASET_REGISTRY.add("_TestNoTargets", NoTargets)
    a = build_dataset({"name": "_TestNoTargets", "subsample": 0.25}, "train", None)
    b = build_dataset({"name": "_TestNoTargets", "subsample": 0.25}, "train", None)
    assert len(a) == 10 and a.indices == b.indices and dataset_num_classes(a) is None


# --- transforms -----------------------------------------------------------------------------------


def test_transforms_build_from_names_and_mappings_with_dtype_strings() -> None:
    assert {"RandomCrop", "Normalize", "ToImage", "ToDtype", "RandAugment"} <= set(TRANSFORM_REGISTRY.names())
    pipeline = build_transforms(
        [
            "ToImage",
            {"name": "Resize", "size": [4, 6], "interpolation": "nearest"},
            {"name": "ToDtype", "dtype": "float16", "scale": True},
        ]
    )
    out = pipeline(Image.new("RGB", (12, 8), color=(255, 0, 0)))
    assert out.dtype == torch.float16 and out.shape == (3, 4, 6) and out[0].min() == 1.0
    assert build_transforms([]) is None and build_transforms(None) is None


def test_transform_errors_name_the_culprit() -> None:
    with pytest.raises(ConfigError, match="RandomHorizontalFlip"):
        build_transforms(["RandomHorizontalFlp"])
    with pytest.raises(ConfigError, match="float32"):
        build_transforms([{"name": "ToDtype", "dtype": "flaot32"}])
    with pytest.raises(ConfigError, match="train"):
        split_transforms({"trian": ["ToImage"]})


def test_split_transforms_test_defaults_to_val() -> None:
    built = split_transforms({"train": ["RandomHorizontalFlip"], "val": ["ToImage"], "test": None})
    assert built["test"] is built["val"] and built["train"] is not None
    own = split_transforms({"train": [], "val": ["ToImage"], "test": [{"name": "CenterCrop", "size": 2}]})
    assert own["train"] is None and own["test"] is not built["val"]
    assert own["test"](torch.zeros(3, 5, 5)).shape == (3, 2, 2)
    assert split_transforms(None) == {"train": None, "val": None, "test": None}


def test_ensure_float_converts_pil_and_integer_tensors_only() -> None:
    x = EnsureFloat()(Image.new("L", (3, 2), color=255))
    assert x.dtype == torch.float32 and x.shape == (1, 2, 3) and torch.all(x == 1.0)
    assert type(x) is torch.Tensor
    ints = EnsureFloat(build_transforms(["ToImage"]))(Image.new("RGB", (2, 2), color=(0, 51, 255)))
    assert torch.allclose(ints[:, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    raw = torch.tensor([5.0, -3.0])
    assert torch.equal(EnsureFloat()(raw), raw)


# --- sampler --------------------------------------------------------------------------------------


def rank_lists(n: int, world: int, shuffle: bool, epoch: int = 0, start: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        s = ResumableSampler(n, shuffle, seed=7, rank=rank, world_size=world)
        s.set_epoch(epoch)
        s.set_start(start)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [3, 10, 13])
def test_sampler_ranks_interleave_to_the_single_process_order(n: int, world: int, shuffle: bool) -> None:
    single = rank_lists(n, 1, shuffle, epoch=2)[0]
    assert sorted(single) == list(range(n))
    per_rank = rank_lists(n, world, shuffle, epoch=2)
    assert len({len(r) for r in per_rank}) == 1  # every rank the same count
    interleaved = [idx for position in zip(*per_rank, strict=True) for idx in position]
    assert interleaved[:n] == single
    assert len(interleaved) % world == 0 and set(interleaved[n:]) <= set(single)  # padding repeats samples


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [11, 12])
def test_sampler_resume_yields_the_exact_tail(n: int, world: int, shuffle: bool) -> None:
    batch = 2
    full = rank_lists(n, world, shuffle, epoch=1)
    for k in range(len(full[0]) // batch + 1):
        resumed = rank_lists(n, world, shuffle, epoch=1, start=k * batch * world)
        assert resumed == [ranks[k * batch :] for ranks in full]


def test_sampler_epochs_reshuffle_and_set_epoch_resets_start() -> None:
    s = ResumableSampler(50, shuffle=True, seed=3)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_start(10)
    assert len(s) == 40
    s.set_epoch(0)
    assert list(s) == first and len(s) == 50
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "n,world,start", [(10, 4, 0), (10, 4, 8), (3, 4, 0), (13, 3, 6), (12, 3, 12), (7, 2, 4)]
)
def test_sampler_num_valid_marks_where_padding_starts(n: int, world: int, start: int) -> None:
    real_seen = []
    for rank in range(world):
        s = ResumableSampler(n, shuffle=False, rank=rank, world_size=world)
        s.set_start(start)
        got = list(s)
        # without shuffling the order is arange, so a position is padding exactly when it repeats
        positions = range(start + rank, start + rank + world * len(got), world)
        assert s.num_valid == sum(p < n for p in positions)
        real_seen += got[: s.num_valid]
    assert sorted(real_seen) == list(range(start, n))  # every remaining sample once, no duplicate


def test_sampler_rejects_bad_start_and_rank() -> None:
    s = ResumableSampler(10, shuffle=False, rank=0, world_size=2)
    with pytest.raises(ValueError):
        s.set_start(3)
    with pytest.raises(ValueError):
        s.set_start(12)
    with pytest.raises(ValueError):
        ResumableSampler(10, shuffle=False, rank=2, world_size=2)


# --- loader ---------------------------------------------------------------------------------------


class NumpyRandom(Dataset):
    """Items drawn from NumPy's global RNG, which workers seed from the loader's generator."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), float(np.random.rand())]), i


def test_loader_workers_give_the_same_batches_as_the_main_process() -> None:
    ds = build_dataset({**SYNTH, "train_size": 24}, "train", None)
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), shuffle=True, seed=5)
        sampler.set_epoch(1)
        loader = build_loader(ds, 5, sampler, {"num_workers": workers, "prefetch_factor": 2}, 0, "cpu")
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 5
    for (x0, y0), (x1, y1) in zip(*batches, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_loader_seed_fixes_the_workers_random_streams() -> None:
    cfg = {"num_workers": 2, "persistent_workers": False}
    runs = [
        torch.cat([x for x, _ in build_loader(NumpyRandom(), 1, None, cfg, s, "cpu")]) for s in (11, 11, 12)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # items 0 and 1 come from different workers: their NumPy streams must differ
    assert runs[0][0, 1] != runs[0][1, 1]


def test_loader_options_follow_the_device() -> None:
    ds = build_dataset(SYNTH, "val", None)
    cpu = build_loader(ds, 4, None, {"pin_memory": True, "drop_last": True}, 0, "cpu")
    assert cpu.pin_memory is False and cpu.drop_last is True and len(cpu) == 5
    cuda = build_loader(ds, 4, None, {"pin_memory": True, "persistent_workers": True}, 0, "cuda")
    assert cuda.pin_memory is True and cuda.persistent_workers is False  # no workers, nothing to persist
