"""Fine-tuning by configuration: freezing, layer-wise learning rates, progressive unfreezing.

In-process checks build the real models and optimizers; one SIGKILL + resume test runs train.py
across the epoch where frozen layers join the optimizer and compares the end state bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import src  # noqa: F401  (registers the built-in components)
from src.errors import ConfigError
from src.models.build import build_model
from src.models.freezing import freeze, plan_unfreezing
from src.optim import build_optimizer, build_scheduler
from src.optim.param_groups import add_group, mark_base_lrs
from tests.helpers import (
    ROOT,
    assert_same_states,
    explain,
    only_run_dir,
    read_metrics,
    run_script,
    sigkill_after,
    slow_mlp_source,
    start_script,
    user_module_config,
    wait_for_step,
)


def mlp_cfg(**model: object) -> object:
    return OmegaConf.create({"model": {"name": "MLP", "in_features": 8, "hidden": [16, 16], **model}})


def test_freeze_globs_take_parameters_out_of_training_and_the_optimizer():
    model = build_model(mlp_cfg(freeze=["net.1.*"]).model, num_classes=3)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"net.1.weight", "net.1.bias"}
    optimizer = build_optimizer({"name": "SGD", "lr": 0.1}, model)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in (model.net[1].weight, model.net[1].bias)}
    model(torch.randn(4, 8)).sum().backward()
    assert model.net[1].weight.grad is None and model.net[4].weight.grad is not None


def test_a_pattern_that_matches_nothing_names_close_parameters():
    with pytest.raises(ConfigError) as err:
        build_model(mlp_cfg(freeze=["nett.1.*"]).model, num_classes=3)
    assert "nett.1.*" in str(err.value) and "net.1.*" in str(err.value)


def test_a_bad_pattern_stops_train_py_before_a_result_directory_exists(tmp_path):
    proc = run_script(
        "train.py",
        "config/dummy.yaml",
        f"output={tmp_path}",
        "training.unfreeze=[{epoch: 1, params: [feature.0.*]}]",
    )
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip().splitlines() == [
        "error: training.unfreeze[0].params: pattern 'feature.0.*' matches no parameter; close names: "
        "features.0.*, features.9.*, features.8.*, features.5.* (python script/show_model.py CONFIG lists the layers)"
    ]
    assert not list(tmp_path.iterdir())


def test_show_model_marks_frozen_layers():
    proc = run_script(
        "script/show_model.py", "config/dummy.yaml", "model=MLP", "model.in_features=16",
        "model.num_classes=3", "model.freeze=[net.1.*]",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("1 "))
    assert "frozen" in row, proc.stdout


def test_param_groups_set_layer_wise_lr_and_the_rest_keep_the_top_level():
    model = build_model(mlp_cfg().model, num_classes=3)
    section = {
        "name": "AdamW",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "param_groups": [
            {"params": ["net.7.*"], "lr": 1e-2, "weight_decay": 0.0},
            {"params": ["net.4.*"], "lr": 1e-4},
        ],
    }
    optimizer = build_optimizer(section, model)
    rest, head, middle = optimizer.param_groups
    assert (rest["lr"], rest["weight_decay"]) == (1e-3, 0.05)
    assert (head["lr"], head["weight_decay"]) == (1e-2, 0.0)
    assert (middle["lr"], middle["weight_decay"]) == (1e-4, 0.05)
    assert [p is q for p, q in zip(head["params"], model.net[7].parameters(), strict=True)] == [True, True]
    assert len(rest["params"]) == 2  # net.1 only
    # every scheduler scales every group
    schedule = build_scheduler({"name": "CosineAnnealingLR"}, optimizer, steps_per_epoch=1, epochs=4)
    optimizer.step()
    schedule.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] < 1e-3 and lrs[1] / lrs[0] == pytest.approx(10) and lrs[2] / lrs[0] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="'lrr' is not a setting"):
        build_optimizer({**section, "param_groups": [{"params": ["net.7.*"], "lrr": 1.0}]}, model)


@pytest.mark.parametrize("section", [{"name": "CosineAnnealingLR"}, {"name": "CosineAnnealingLR", "warmup": 3},
                                     {"name": "OneCycleLR"}])  # fmt: skip
def test_an_added_group_joins_the_schedule_where_it_stands(section):
    model = build_model(mlp_cfg(freeze=["net.1.*"]).model, num_classes=3)
    optimizer = build_optimizer({"name": "SGD", "lr": 0.1}, model)
    schedule = build_scheduler(section, optimizer, steps_per_epoch=1, epochs=6)
    mark_base_lrs(optimizer)
    for _ in range(2):
        optimizer.step()
        schedule.step()
    add_group(optimizer, schedule, [p.requires_grad_(True) for p in model.net[1].parameters()], 0.5)
    for _ in range(2):
        optimizer.step()
        schedule.step()
        first, new = optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]
        assert new == pytest.approx(first * 0.5) and first <= 0.1


def test_freeze_backbone_epochs_freezes_all_but_the_replaced_head():
    cfg = OmegaConf.create({"model": {"name": "resnet18", "weights": None}})
    model = build_model(cfg.model, num_classes=4)
    (stage,) = plan_unfreezing(model, OmegaConf.create({"freeze_backbone_epochs": 2, "unfreeze": []}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert stage.epoch == 2 and "conv1.weight" in stage.names and "fc.weight" not in stage.names


def test_unfreeze_needs_frozen_parameters():
    model = build_model(mlp_cfg().model, num_classes=3)
    with pytest.raises(ConfigError, match="matches no frozen parameter"):
        plan_unfreezing(model, OmegaConf.create({"unfreeze": [{"epoch": 1, "params": ["net.1.*"]}]}))
    freeze(model, ["net.1.*"])
    with pytest.raises(ConfigError, match="epoch must be"):
        plan_unfreezing(model, OmegaConf.create({"unfreeze": [{"epoch": 0, "params": ["net.1.*"]}]}))


# ---------------------------------------------------------------------- exact resume across the unfreeze epoch
PARTS = slow_mlp_source("FINETUNE_TEST_SLEEP")

# 48 samples / batch 8 = 6 steps per epoch; net.1 is frozen for epoch 1 and joins at lr x 0.1 in epoch 2.
CONFIG = f"""
__base__: {ROOT}/config/__base__/config.yaml
imports: [finetune_parts]
epoch: 3
batch: 8
model: {{name: SlowMLP, in_features: 16, hidden: [16, 16], dropout: 0.2, freeze: ["net.1.*"]}}
dataset: {{name: SyntheticClassification, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}}
optimizer:
  name: AdamW
  lr: 0.01
  param_groups: [{{params: ["net.7.*"], lr: 0.03, weight_decay: 0.0}}]
lr_scheduler: {{name: CosineAnnealingLR, interval: step}}
training: {{unfreeze: [{{epoch: 1, params: ["net.1.*"], lr_scale: 0.1}}]}}
checkpoint: {{save_every_n_steps: 1, save_frequency: 1}}
logging: {{log_frequency: 1, mlflow: false, tensorboard: false, progress_bar: false}}
"""


@pytest.mark.slow
def test_sigkill_across_the_unfreeze_epoch_resumes_bit_exact(tmp_path):
    config, env = user_module_config(tmp_path, "finetune_parts", PARTS, CONFIG)

    ref_out = tmp_path / "ref"
    proc = run_script("train.py", str(config), f"output={ref_out}", env=env)
    assert proc.returncode == 0, explain(proc)
    ref = only_run_dir(ref_out)

    def ckpt(run: Path, name: str) -> dict:
        return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)

    # Epoch 1 trained without net.1: its weights are the initial ones, and it joined later with lr x 0.1.
    after1, final = ckpt(ref, "epoch_0001.pth"), ckpt(ref, "last.pth")
    cfg = OmegaConf.load(ref / "config.yaml")
    torch.manual_seed(int(cfg.seed))
    fresh = build_model(OmegaConf.merge(cfg, {"model": {"name": "MLP"}}).model, num_classes=10).state_dict()
    assert torch.equal(after1["model"]["net.1.weight"], fresh["net.1.weight"])
    assert not torch.equal(final["model"]["net.1.weight"], fresh["net.1.weight"])
    assert len(after1["optimizer"]["param_groups"]) == 2 and len(final["optimizer"]["param_groups"]) == 3
    rest, head, late = final["optimizer"]["param_groups"]
    assert head["base_lr"] == pytest.approx(0.03) and late["base_lr"] == pytest.approx(0.001)
    assert late["lr"] == pytest.approx(rest["lr"] * 0.1)

    # Killed in epoch 2, after the unfreeze (step 8 of 18), then resumed from the result directory.
    out = tmp_path / "killed"
    out.mkdir()
    run = start_script("train.py", str(config), f"output={out}", log_file=out / "console.log",
                       env={**env, "FINETUNE_TEST_SLEEP": "0.1"})  # fmt: skip
    sigkill_after(run, lambda: wait_for_step(run, out, 8))
    killed = only_run_dir(out)
    assert not (killed / "checkpoints" / "epoch_0003.pth").exists()
    proc = run_script("train.py", str(killed / "config.yaml"), env=env)
    assert proc.returncode == 0, explain(proc)
    got = ckpt(killed, "last.pth")
    assert_same_states(got, final, ("model", "optimizer", "scheduler"))


def test_freezing_and_groups_are_logged_at_start_and_every_groups_lr_in_each_tracker(tmp_path):
    """Which parameters are frozen (per pattern), what unfreezes when, each group's lr at start; then
    `lr/<group>` for every group in metrics.jsonl, MLflow and TensorBoard."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, env = user_module_config(tmp_path, "finetune_parts", PARTS, CONFIG)
    out = tmp_path / "out"
    proc = run_script("train.py", str(config), f"output={out}", "epoch=2", "logging.mlflow=true",
                      "logging.tensorboard=true", "logging.system_metrics=false",
                      env={**env, "MLFLOW_TRACKING_URI": ""})  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    run = only_run_dir(out)
    log = (run / "train.log").read_text()
    assert re.search(r"frozen at start: 2 of 6 parameter tensors \([\d,]+ values\); by 'net\.1\.\*' 2\n", log)
    assert "unfreezes at the start of epoch 2: 2 parameter tensors (net.1.weight ...) at lr x 0.1" in log
    assert "optimizer groups: default lr 0.01 (2 tensors), net.7 lr 0.03 (2 tensors)" in log

    events = [e for e in read_metrics(run) if "train_loss" in e]
    first = [e for e in events if e["epoch"] == 1]
    later = [e for e in events if e["epoch"] == 2]
    assert all({"lr/default", "lr/net.7"} <= e.keys() and "lr/unfrozen_epoch2" not in e for e in first)
    assert all(e["lr"] == e["lr/default"] for e in events)
    assert later and all(e["lr/unfrozen_epoch2"] == pytest.approx(0.1 * e["lr/default"]) for e in later)
    assert all(e["lr/net.7"] == pytest.approx(3 * e["lr/default"]) for e in events)

    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("SyntheticClassification").experiment_id])
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    for key in ("lr/default", "lr/net.7", "lr/unfrozen_epoch2"):
        want = [(e["step"], pytest.approx(e[key])) for e in events if key in e]
        assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)] == want, key
        assert [(s.step, s.value) for s in board.Scalars(key)] == want, key
