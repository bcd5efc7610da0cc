"""The Checkpointer's file choices, in-process: what a run that never validates leaves behind."""

from __future__ import annotations

from src.config import load_config
from src.engine import distributed as dist_utils
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
    ctx = dist_utils.setup(cfg)
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
