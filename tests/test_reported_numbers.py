"""Every number a run reports is computed on the right samples, weights and steps (issue #17).

Two real train.py runs share the expensive part: run A (EMA, OneCycleLR logged per step,
drop_last with val and test splits smaller than or not a multiple of the batch, top-2 files) and
run B, a new run from A's state (checkpoint.resume_from) with a numeric tag. A third run trains a
BatchNorm CNN with a schedule-free optimizer. Everything else is checked in process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from src.config import load_config
from src.data.datasets import SyntheticClassification, build_dataset, stratified_counts
from src.distributed.process_group import DistContext
from src.engine.build import build_split
from src.engine.flops import peak_tflops
from src.models.build import build_model
from tests.helpers import ROOT, TINY, explain, only_run_dir, read_metrics, run_script

DUMMY = "config/dummy.yaml"
CPU = DistContext("none", torch.device("cpu"))


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- run A and run B
@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a")
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *TINY, "batch=32", "dataloader.drop_last=true",
        "dataset.val_size=20", "dataset.test_size=37", "lr_scheduler=OneCycleLR", "logging.log_frequency=1",
        "model.ema=0.5", "checkpoint.save_top_k=2",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(out)


@pytest.fixture(scope="module")
def run_b(run_a, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b")
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *TINY, "batch=32", "epoch=3", "model.ema=0.5",
        "checkpoint.save_top_k=2", "lr_scheduler=null", f"checkpoint.resume_from={run_a}/checkpoints/last.pth",
        "tag=1e3",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(out)


def _val_loss(run: Path, weights: dict) -> float:
    """The val loss of `weights`, computed here from the run's own config, over every val sample."""
    cfg = load_config(run / "config.yaml")
    split = build_split(cfg, "val", CPU, shuffle=False, transforms={})
    model = build_model(cfg.model, 10)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        items = [split.dataset[i] for i in range(len(split.dataset))]
        inputs = torch.stack([x for x, _ in items])
        targets = torch.tensor([y for _, y in items])
        return nn.functional.cross_entropy(model(inputs), targets).item()


@pytest.mark.slow
def test_drop_last_leaves_validation_and_testing_whole(run_a):
    """val_size=20 < batch=32 once gave val_loss 0; test_size=37 counted 32 samples."""
    report = (run_a / "test" / "classification_report.txt").read_text()
    supports = [int(line.split()[-1]) for line in report.splitlines() if line.strip().startswith("class_")]
    assert sum(supports) == 37, report
    val = [e for e in read_metrics(run_a) if "val_loss" in e]
    assert len(val) == 2 and all(e["val_loss"] > 0 for e in val)


def test_eval_loaders_never_drop_samples_in_one_or_two_processes():
    cfg = load_config(ROOT / DUMMY, [*TINY, "dataloader.drop_last=true", "dataset.val_size=37"])
    assert build_split(cfg, "train", CPU, shuffle=True, transforms={}).loader.drop_last is True
    val = build_split(cfg, "val", CPU, shuffle=False, transforms={})
    assert sum(len(y) for _, y in val.loader) == val.sampler.num_valid == 37
    # Two ranks: each rank's real (unpadded) share, the samples evaluate() counts, covers all 37 once.
    seen = []
    for rank in (0, 1):
        ctx = DistContext("ddp", torch.device("cpu"), rank=rank, world_size=2)
        split = build_split(cfg, "val", ctx, shuffle=False, transforms={})
        seen += list(split.sampler)[: split.sampler.num_valid]
        assert sum(len(y) for _, y in split.loader) == len(split.sampler)  # every batch, padding included
    assert sorted(seen) == list(range(37))


@pytest.mark.slow
def test_logged_lr_is_the_lr_each_step_used(run_a):
    logged = [e["lr"] for e in read_metrics(run_a) if "train_loss" in e]
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.003)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.003, total_steps=4)
    used = []
    for _ in range(4):  # 2 epochs of 2 steps (64 train samples, batch 32)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(used, rel=1e-6)


@pytest.mark.slow
def test_ema_checkpoints_hold_the_reported_weights(run_a):
    best = torch.load(run_a / "checkpoints" / "best.pth", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in best["ema"].items() if k.startswith("module.")}
    assert weights_equal(best["model"], ema) and not weights_equal(best["raw_model"], best["model"])
    # The val loss recorded for the best epoch is the one best.pth["model"] gives.
    metrics = [e for e in read_metrics(run_a) if "val_loss" in e]
    recorded = next(e["val_loss"] for e in metrics if e["epoch"] == best["progress"]["best_epoch"])
    assert _val_loss(run_a, best["model"]) == pytest.approx(recorded, rel=1e-5)
    # A new run from best.pth's weights starts from those reported weights.
    from src.run.main import _state_to_continue

    cfg = load_config(ROOT / DUMMY, [f"checkpoint.resume_from={run_a}/checkpoints/best.pth",
                                     "checkpoint.weights_only_resume=true"])  # fmt: skip
    assert weights_equal(_state_to_continue(cfg)["model"], ema)


@pytest.mark.slow
def test_resume_from_starts_its_own_best_and_top_k(run_b):
    checkpoints = run_b / "checkpoints"
    last = torch.load(checkpoints / "last.pth", weights_only=True)
    progress = last["progress"]
    assert progress["best_epoch"] == 3 and (checkpoints / "best.pth").is_file()
    assert [name for _, name in progress["top_k"]] == ["top_epoch_0003.pth"]
    assert all((checkpoints / name).is_file() for _, name in progress["top_k"])


@pytest.mark.slow
def test_numeric_tag_stays_as_written(run_b):
    assert run_b.name.endswith("_SimpleCNN_1e3")
    assert load_config(run_b / "config.yaml").tag == "1e3"


def test_numeric_tag_in_a_file_stays_as_written(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(f"__base__: {ROOT / DUMMY}\ntag: 1e3\n")
    assert load_config(path).tag == "1e3"
    assert load_config(path, ["tag=007"]).tag == "007"


# ---------------------------------------------------------------------- schedule-free with BatchNorm
@pytest.mark.slow
def test_schedule_free_batchnorm_statistics_belong_to_the_evaluated_weights(tmp_path):
    proc = run_script("train.py", DUMMY, f"output={tmp_path}", *TINY, "optimizer.name=AdamWScheduleFree")
    assert proc.returncode == 0, explain(proc)
    run = only_run_dir(tmp_path)
    saved = torch.load(run / "checkpoints" / "last.pth", weights_only=True)["model"]

    # Recompute here: the first BatchNorm's input mean over the whole train split (64 items, 4
    # equal batches, so the batches' order and make-up do not change the mean).
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model, 10)
    model.load_state_dict(saved)
    data = SyntheticClassification("train", input_shape=(3, 16, 16), train_size=64)
    inputs = torch.stack([data[i][0] for i in range(len(data))])
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    captured = []
    first_bn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    model.eval()
    with torch.no_grad():
        model(inputs)
    expected_mean = captured[0].mean(dim=(0, 2, 3))
    torch.testing.assert_close(first_bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    # And the val loss the run logged last is the one these saved weights and statistics give.
    recorded = [e["val_loss"] for e in read_metrics(run) if "val_loss" in e][-1]
    assert _val_loss(run, saved) == pytest.approx(recorded, rel=1e-5)


# ---------------------------------------------------------------------- in process
def test_batchnorm_recompute_is_deterministic_and_leaves_no_trace_in_the_rngs():
    """Random augmentations drawn while recomputing must not move the run's RNG streams (exact resume)."""
    import random

    import numpy as np

    from src.checkpoint.rng import capture_rng
    from src.engine.precision import Precision
    from src.techniques.batchnorm import recompute_batchnorm

    class Flip(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 24

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            x = torch.full((3, 4, 4), float(i))
            if torch.rand(()) < 0.5 and random.random() < 2 and np.random.rand() < 2:  # every RNG drawn
                x = x.flip(-1) * 1.5
            return x, 0

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3))
    model.eval()
    loader = torch.utils.data.DataLoader(Flip(), batch_size=8)
    precision = Precision("32", "cpu")
    torch.manual_seed(5)
    before = capture_rng()
    assert recompute_batchnorm(model, loader, 2, torch.device("cpu"), precision) == 2
    after = capture_rng()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert torch.equal(before["numpy"][1], after["numpy"][1]) and before["numpy"][2] == after["numpy"][2]
    first = model[1].running_mean.clone()
    recompute_batchnorm(model, loader, 2, torch.device("cpu"), precision)
    assert torch.equal(model[1].running_mean, first)  # same draws again: the same statistics
    assert model[1].momentum == 0.3 and not model.training


def test_synthetic_noise_differs_between_splits_and_seeds():
    shape = (3, 8, 8)

    def noise(split: str, seed: int) -> torch.Tensor:
        data = SyntheticClassification(split, input_shape=shape, val_size=64, test_size=64, seed=seed)
        return torch.stack([data[i][0] - data.prototypes[data[i][1]] for i in range(64)])

    train, val, test, other_seed = noise("train", 0), noise("val", 0), noise("test", 0), noise("val", 1)
    assert torch.equal(noise("val", 0), val)  # reproducible
    flat = torch.cat([train, val, test, other_seed]).flatten(1)
    distinct = torch.unique(flat, dim=0)
    assert len(distinct) == len(flat)  # no noise vector repeats across splits or seeds
    # Independent draws: correlation of same-index items across splits is near zero.
    corr = nn.functional.cosine_similarity(val.flatten(1), test.flatten(1)).abs().mean()
    assert corr < 0.1


def test_subsample_keeps_the_fraction_within_one_item_per_class():
    # 256 items in 10 classes (26 x 6, 25 x 4): half is 128, not 130 (half rounded up per class).
    dataset = build_dataset(
        {"name": "SyntheticClassification", "train_size": 256, "input_shape": [4], "subsample": 0.5},
        "train",
        None,
    )
    assert len(dataset) == 128
    counts = torch.bincount(torch.tensor(dataset.targets)).tolist()
    assert all(abs(c - 0.5 * n) < 1 for c, n in zip(counts, [26] * 6 + [25] * 4, strict=True))
    assert stratified_counts([1, 1, 100], 0.01) == [1, 1, 1]  # every class keeps at least one


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 3090", 71.0),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
        ("NVIDIA H200 NVL", None),
    ],
)
def test_gpu_peak_matches_whole_names_only(name, tflops):
    assert peak_tflops(name) == tflops
