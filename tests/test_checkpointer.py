"""The Checkpointer's file choices, in-process: what a run that never validates leaves behind."""

from __future__ import annotations

from src.config import load_config
from src.distributed import process_group as dist_utils
from src.engine.tester import pick_checkpoint
from src.engine.trainer import Trainer
from tests.helpers import ROOT

MLP = ["model.name=MLP", "model.in_features=48", "model.hidden=[16]", "dataset.name=SyntheticClassification",
       "dataset.input_shape=[3,4,4]"]  # fmt: skip


def test_a_run_that_never_validates_writes_no_best_and_test_py_takes_last(tmp_path):
    cfg = load_config(ROOT / "config" / "dummy.yaml", [
        "logging.mlflow=false", "logging.tensorboard=false", *MLP, "epoch=2", "batch=16",
        "dataset.train_size=32", "evaluation.frequency=0", "checkpoint.save_best=true",
    ])  # fmt: skip
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    trainer = Trainer(cfg, ctx, tmp_path, resume=None)
    try:
        state = trainer.fit()
    finally:
        trainer.stop.uninstall()
        if trainer.trackers is not None:
            trainer.trackers.finish("FINISHED")
    assert state.finished and state.best_value is None
    # Nothing measured checkpoint.monitor, so nothing is called best; last.pth (published before fit
    # returned, although written in the background) is what test.py evaluates.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pth", "previous.pth"]
    assert pick_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pth"


def test_pruning_keeps_the_dcp_folders_the_record_says_are_used_without_reading_a_file(tmp_path):
    """FSDP folders: each checkpoint records the folder each file points to; no .pth is loaded to find out."""
    import torch

    from src.checkpoint.checkpointer import Checkpointer
    from src.checkpoint.train_state import TrainState

    cfg = load_config(ROOT / "config" / "dummy.yaml", ["logging.mlflow=false"])
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    model = torch.nn.Linear(2, 2)
    parts = {"raw_model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "schedule": None,
             "scaler": torch.amp.GradScaler("cpu", enabled=False), "ema": None}  # fmt: skip
    saver = Checkpointer(cfg.checkpoint, ctx, tmp_path, parts, TrainState(), epochs=3, batch=cfg.batch,
                         model_name=cfg.model.name, timeout_minutes=cfg.distributed.timeout_minutes)  # fmt: skip
    folders = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (folders / f"dcp_step_{step:08d}").mkdir(parents=True)
    (folders / "last.pth").write_bytes(b"not a checkpoint")  # would be skipped if it were read
    saver.dcp_files = {"last.pth": "dcp_step_00000002", "previous.pth": "dcp_step_00000001",
                       "best.pth": "dcp_step_00000001"}  # fmt: skip
    live = saver._record_dcp(["last.pth"], "dcp_step_00000003", keep_top=set())
    assert live == {"dcp_step_00000001", "dcp_step_00000002", "dcp_step_00000003"}  # best.pth still uses 1
    live = saver._record_dcp(["best.pth", "last.pth"], "dcp_step_00000004", keep_top=set())
    saver._published([], "test", keep_top=set(), live_dcp=live)
    assert sorted(p.name for p in folders.glob("dcp_step_*")) == ["dcp_step_00000003", "dcp_step_00000004"]
    assert saver.dcp_files == {"last.pth": "dcp_step_00000004", "previous.pth": "dcp_step_00000003",
                               "best.pth": "dcp_step_00000004"}  # fmt: skip
