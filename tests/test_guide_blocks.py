"""The YAML blocks of the training guide's set-up, optimizer and scheduler sections load and build."""

import textwrap

import pytest
import torch

from src.config import load_config
from src.engine.build import preflight
from src.models.build import build_model
from src.optim import build_optimizer, build_scheduler
from tests.guide_blocks import (
    BASIC_SETUP,
    COMMON_SCHEDULERS,
    OPTIMIZER_SELECTION,
    SCHEDULE_FREE,
    WARMUP_SCHEDULE,
    alternatives,
)

# The guide's blocks that list alternatives are run one alternative at a time.
OPTIMIZERS = [*alternatives(OPTIMIZER_SELECTION), SCHEDULE_FREE]
SCHEDULERS = [*alternatives(COMMON_SCHEDULERS), WARMUP_SCHEDULE]

MY_DATASET = textwrap.dedent(
    """
    import torch
    from src import DATASET_REGISTRY

    @DATASET_REGISTRY.register("my_dataset")
    class MyDataset(torch.utils.data.Dataset):
        num_classes = 10
        classes = [str(i) for i in range(10)]

        def __init__(self, split, transform=None):
            self.targets = [i % 10 for i in range(20)]

        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.zeros(3, 32, 32), self.targets[i]
    """
)


def load_block(tmp_path, text: str, *overrides: str):
    path = tmp_path / "my_experiment.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def test_basic_training_setup_block(tmp_path, monkeypatch):
    (tmp_path / "guide_user_pkg.py").write_text(MY_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    import guide_user_pkg  # noqa: F401  (registers my_dataset, as `imports:` would)

    cfg = load_block(tmp_path, BASIC_SETUP)
    assert (cfg.dataset.name, cfg.model.name, cfg.batch, cfg.epoch) == ("my_dataset", "resnet50", 32, 100)
    assert cfg.gpu.mixed_precision is True and cfg.gpu.use == "0"
    preflight(cfg)
    model = build_model(cfg.model, num_classes=10)
    assert model.fc.out_features == 10
    optimizer = build_optimizer(cfg.optimizer, model)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    schedule = build_scheduler(cfg.lr_scheduler, optimizer, steps_per_epoch=5, epochs=cfg.epoch)
    assert type(schedule.scheduler).__name__ == "CosineAnnealingWarmRestarts"


@pytest.mark.parametrize("block", OPTIMIZERS, ids=["AdamW", "SGD", "Lion", "AdamWScheduleFree"])
def test_optimizer_blocks(tmp_path, block):
    cfg = load_block(tmp_path, block)
    preflight(cfg)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(cfg.optimizer, model)
    assert type(optimizer).__name__ == cfg.optimizer.name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr)
    if hasattr(optimizer, "train"):
        optimizer.train()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()


@pytest.mark.parametrize(
    "block", SCHEDULERS, ids=["WarmRestarts", "StepLR", "ReduceLROnPlateau", "WarmupReduceRestarts"]
)
def test_scheduler_blocks(tmp_path, block):
    cfg = load_block(tmp_path, block)
    preflight(cfg)
    optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)
    schedule = build_scheduler(cfg.lr_scheduler, optimizer, steps_per_epoch=3, epochs=20)
    assert type(schedule.scheduler).__name__ == cfg.lr_scheduler.name
    for _ in range(12):
        optimizer.step()
        schedule.step(1.0 if schedule.needs_metric else None)
    assert schedule.last_lr()[0] > 0
