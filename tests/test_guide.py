"""The training guide works as written: each of its commands and YAML blocks runs and does what it says.

Every YAML block (held verbatim in tests/guide_blocks.py) is written to a file and run with
`python train.py <file>`;
every shell command is run with bash exactly as printed (`./torchrun.sh 4|8` becomes 2 processes,
`python` is this interpreter, placeholder paths become a real run). Only small-data settings are
appended (tiny synthetic images, few epochs, CPU, no MLflow/TensorBoard unless they are the point);
where a test appends anything else it says why. Blocks that set different keys may share a run (the
file must stay a few minutes long), each still written verbatim to its own file. Each test then checks
the effect the guide promises, in the saved config.yaml and in behaviour: metrics.jsonl, checkpoints,
train.log.

The user components the guide names (`my_dataset`, `my_model`, `my_evaluator`) live in a package
written to a temporary folder and listed under `imports:`, as a user would do it.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch
import yaml

from tests.guide_blocks import (
    ADVANCED_OPTIONS,
    AMP,
    AUTOMATIC_CHECKPOINTING,
    BASIC_SETUP,
    CMD_ALL_FEATURES,
    CMD_BASIC,
    CMD_DDP,
    CMD_DEBUG,
    CMD_DP,
    CMD_FSDP,
    CMD_RESUME_DIR,
    CMD_RESUME_FILE,
    CMD_RESUME_LONGER,
    COMPILATION,
    CUSTOM_EVALUATION,
    CUSTOM_METRICS_LOGGING,
    CUSTOM_PRECISION,
    DATA_LOADING,
    FSDP,
    GRADIENT_ACCUMULATION,
    GUIDE_RUN,
    MEMORY,
    NAN_LOSS,
    OPTIMIZERS,
    OUT_OF_MEMORY,
    PROFILING,
    SCHEDULE_FREE,
    SCHEDULERS,
    SLOW_TRAINING,
    TENSORBOARD,
    VALIDATION,
    WARMUP_SCHEDULE,
)
from tests.helpers import (
    explain,
    only_run_dir,
    read_metrics,
    result_dirs,
    run_script,
    run_shell,
    shell_env,
)

# ---------------------------------------------------------------------------------------------------------
# The user's package: the components the guide names.

USER_PACKAGE = '''\
"""The guide's user components, registered from outside src/ (listed under `imports:`)."""
from torch import nn

from src import DATASET_REGISTRY, MODEL_REGISTRY
from src.data.datasets import SyntheticClassification


@DATASET_REGISTRY.register("my_dataset")
class MyDataset(SyntheticClassification):
    """The user's dataset: synthetic images under the user's own name."""


@MODEL_REGISTRY.register("my_model")
class MyModel(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
'''

LOG_CUSTOM_METRICS = CUSTOM_METRICS_LOGGING.split("import mlflow\n", 1)[1].strip("\n") + "\n"
COMPUTE_CUSTOM_METRIC = '''\
def compute_custom_metric(self, predictions, targets):
    """Top-2 accuracy; also sent to MLflow (in percent) through the guide's helper."""
    top2 = predictions.topk(2, dim=1).indices
    value = (top2 == targets[:, None]).any(dim=1).float().mean().item()
    self.log_custom_metrics({"custom_top2_percent": 100 * value})
    return value
'''

# The guide's evaluator class with its two helper methods, one of them the guide's MLflow snippet.
USER_EVALUATORS = (
    "import mlflow\n\nfrom src import EVALUATOR_REGISTRY\nfrom src.evaluators import BaseEvaluator\n\n\n"
    + CUSTOM_EVALUATION
    + "\n"
    + textwrap.indent(LOG_CUSTOM_METRICS, "    ")
    + "\n"
    + textwrap.indent(COMPUTE_CUSTOM_METRIC, "    ")
)


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("user")
    package = root / "guide_user"
    package.mkdir()
    (package / "__init__.py").write_text(USER_PACKAGE)
    (package / "evaluators.py").write_text(USER_EVALUATORS)
    return {"PYTHONPATH": str(root)}


# ---------------------------------------------------------------------------------------------------------
# Running a block or a command, and reading back what it did.


def small(
    epoch: int = 2,
    train: int = 64,
    batch: int | None = 16,
    shape: str = "[3,16,16]",
    val: int = 32,
    test: int = 32,
    mlflow: bool = False,
    tensorboard: bool = False,
) -> list[str]:
    """The small-data overrides appended to every guide command: seconds on a CPU."""
    args = [
        "gpu.device=cpu",
        f"epoch={epoch}",
        f"dataset.train_size={train}",
        f"dataset.val_size={val}",
        f"dataset.test_size={test}",
        f"dataset.input_shape={shape}",
    ]
    if batch is not None:  # None: the block sets it
        args.append(f"batch={batch}")
    if not mlflow:
        args.append("logging.mlflow=false")
    if not tensorboard:
        args.append("logging.tensorboard=false")
    return args


@dataclass
class Run:
    dir: Path

    @cached_property
    def config(self) -> dict:
        return yaml.safe_load((self.dir / "config.yaml").read_text())

    @property
    def log(self) -> str:
        return (self.dir / "train.log").read_text()

    @property
    def events(self) -> list[dict]:
        return read_metrics(self.dir)

    def checkpoint(self, name: str = "last.pth") -> dict:
        return torch.load(self.dir / "checkpoints" / name, map_location="cpu", weights_only=True)

    def val_epochs(self) -> list[int]:
        return [e["epoch"] for e in self.events if "val_loss" in e]

    def lr_by_epoch(self) -> dict[int, float]:
        lrs: dict[int, float] = {}
        for e in self.events:
            if "lr" in e:
                lrs.setdefault(e["epoch"], e["lr"])
        return lrs

    def files(self, pattern: str) -> list[str]:
        return sorted(p.name for p in (self.dir / "checkpoints").glob(pattern))


def train_block(tmp_path: Path, *blocks: str, overrides: list[str], env: dict | None = None) -> Run:
    """`python train.py <file> <overrides>` where the file is the block; the one run it made.

    Several blocks that set different keys share one run (the suite has to stay short): each is
    written to its own file, verbatim, and the run's file only lists them, `__base__: [files]`.
    """
    if len(blocks) == 1:
        path = tmp_path / "block.yaml"
        path.write_text(blocks[0])
    else:
        names = []
        for i, text in enumerate(blocks):
            (tmp_path / f"block{i}.yaml").write_text(text)
            names.append(f"block{i}.yaml")
        path = tmp_path / "blocks.yaml"
        path.write_text(f"__base__: {names}\n")
    out = tmp_path / "out"
    proc = run_script("train.py", str(path), f"output={out}", *overrides, env=env)
    assert proc.returncode == 0, explain(proc)
    return Run(only_run_dir(out))


def guide_command(command: str, *appended: str, env: dict, substitute: dict[str, str] | None = None):
    """A guide command line as printed, 4 or 8 processes made 2, placeholders made real, overrides appended."""
    line = command.replace("\\\n", " ")
    line = re.sub(r"^\./torchrun\.sh [48] ", "./torchrun.sh 2 ", line)
    for placeholder, real in (substitute or {}).items():
        line = line.replace(placeholder, real)
    line = " ".join([line, *map(shlex.quote, appended)])
    return run_shell(line, env=env)


def cosine(base: float, t: float, period: float, floor: float = 0.0) -> float:
    return floor + (base - floor) * (1 + math.cos(math.pi * t / period)) / 2


def assert_close(actual: float, expected: float) -> None:
    assert actual == pytest.approx(expected, rel=1e-6, abs=1e-12), (actual, expected)


def warmup_restarts(epoch: int) -> float:
    """The guide's warm-up schedule (T_0 50, T_mult 2, T_up 10, gamma 0.5, eta_min 1e-6) during `epoch`."""
    t, start, length, peak = epoch - 1, 0, 50, 0.001
    while t >= start + length:
        start, length, peak = start + length, length * 2, peak * 0.5
    inside = t - start
    if inside < 10:
        return 1e-6 + (peak - 1e-6) * inside / 10
    return cosine(peak, inside - 10, length - 10, 1e-6)


# ---------------------------------------------------------------------------------------------------------
# Training Configuration


def mixed_on_cpu() -> str:
    """What `mixed_precision: true` alone means on this CPU: bf16 with bf16 hardware, else fp32."""
    from src.engine.precision import _cpu_has_native_bf16

    return "bf16" if _cpu_has_native_bf16() else "fp32"


def test_basic_training_setup_block(tmp_path, user_env):
    """my_dataset (the user's) + resnet50 + AdamW + warm restarts + mixed precision.

    bf16 autocast on a CPU without native bf16 runs resnet50 at seconds per step, so this run is a
    single step of 2 images. They are 32x32: at 16x16 and below, torch 2.14.1's bf16 backward on an
    AMX CPU gives non-finite weight gradients for the stride-2 convolutions of layer3/layer4 (on
    2x2 maps) in about half of identical tries, and the run then stops as it should for NaN weights.
    """
    overrides = ["imports=[guide_user]", *small(epoch=1, train=2, batch=2, shape="[3,32,32]", val=2, test=2)]
    run = train_block(tmp_path, BASIC_SETUP, overrides=overrides, env=user_env)
    cfg = run.config
    assert run.dir.parent.name == "my_dataset" and "_resnet50" in run.dir.name
    assert cfg["model"]["name"] == "resnet50" and cfg["dataset"]["name"] == "my_dataset"
    assert cfg["optimizer"] == {"name": "AdamW", "lr": 0.001, "weight_decay": 0.01}
    assert cfg["lr_scheduler"] == {"name": "CosineAnnealingWarmRestarts", "T_0": 10, "T_mult": 2}
    assert cfg["gpu"]["use"] == "0" and cfg["gpu"]["mixed_precision"] is True
    assert f"{mixed_on_cpu()} precision" in run.log  # mixed_precision alone: bf16 where the CPU has it
    state = run.checkpoint()
    assert state["model"]["fc.weight"].shape == (10, 2048)  # resnet50's head sized by the dataset
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.01
    assert_close(group["lr"], cosine(0.001, 1, 10))  # one epoch along the first 10-epoch cosine


def test_advanced_training_options_block(tmp_path):
    """Accumulation, clipping, validation every 5, periodic and top-3 checkpoints, early stopping; with
    the guide's warm-up schedule (Custom Warmup Scheduling) in the same run.

    Appended beyond small data: `training.early_stopping.min_delta=10` (the block leaves min_delta
    unset). No validation can improve val_loss by 10, so early stopping must stop exactly `patience`
    validations after the first: at epoch 5 + 20 * 5 = 105 of the 200 asked for.
    """
    overrides = [*small(epoch=200, val=16, test=16), "training.early_stopping.min_delta=10"]
    run = train_block(tmp_path, ADVANCED_OPTIONS, WARMUP_SCHEDULE, overrides=overrides)
    cfg = run.config
    # the guide's aliases land on the canonical keys
    assert cfg["evaluation"]["frequency"] == 5 and cfg["checkpoint"]["save_frequency"] == 10
    assert "validation_frequency" not in cfg["training"] and "save_frequency" not in cfg["training"]
    assert cfg["training"]["early_stopping"] == {
        "patience": 20, "monitor": "val_loss", "mode": "min", "min_delta": 10.0,
    }  # fmt: skip

    # validation every 5 epochs; early stopping after 20 validations without improvement
    assert run.val_epochs() == list(range(5, 106, 5))
    assert "early stopping" in run.log
    state = run.checkpoint()
    # 4 batches of 16 per epoch, one optimizer step per 4: 105 steps, not 420
    assert state["progress"]["epoch"] == 105 and state["progress"]["global_step"] == 105
    assert "x4 accumulation" in run.log
    train = [e for e in run.events if "train_loss" in e]
    assert len(train) == 105 and all(e["grad_norm"] > 0 for e in train)  # clipping measures the norm

    # every 10th epoch kept; best and top-3 by val_accuracy (max), ties keep the earlier epoch
    assert run.files("epoch_*.pth") == [f"epoch_{e:04d}.pth" for e in range(10, 101, 10)]
    ranked: list[tuple[float, int]] = []
    for e in run.events:
        if "val_accuracy" in e:
            ranked = sorted([*ranked, (e["val_accuracy"], e["epoch"])], key=lambda t: t[0], reverse=True)[:3]
    assert run.files("top_epoch_*.pth") == sorted(f"top_epoch_{epoch:04d}.pth" for _, epoch in ranked)
    assert run.checkpoint("best.pth")["progress"]["epoch"] == ranked[0][1]
    assert {"last.pth", "previous.pth"} <= set(run.files("*.pth"))

    # the warm-up schedule: linear over T_up=10 epochs, cosine to epoch 50, restart at half the peak
    lrs = run.lr_by_epoch()
    for epoch in (1, 2, 6, 11, 30, 50, 51, 56, 61, 105):
        assert_close(lrs[epoch], warmup_restarts(epoch))
    assert_close(lrs[61], 0.0005)


# ---------------------------------------------------------------------------------------------------------
# Distributed Training, and the other commands that use config/my_experiment.yaml


@pytest.fixture
def guide_env(tmp_path) -> dict[str, str]:
    return shell_env(tmp_path)


def experiment_small(out: Path, epoch: int = 2) -> list[str]:
    """config/my_experiment.yaml made small: 2 steps of 8 images per epoch."""
    return [f"output={out}", *small(epoch=epoch, train=16, batch=8, val=16, test=16)]


def test_basic_training_and_resuming_commands(tmp_path, guide_env):
    """Train; lose the last epoch and resume in place; train longer; warm-start a new run from a file."""
    out = tmp_path / "out"
    proc = guide_command(CMD_BASIC, *experiment_small(out), env=guide_env)
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    assert run.dir.name.endswith("_SimpleCNN_experiment") and f"{mixed_on_cpu()} precision" in run.log
    lrs = run.lr_by_epoch()
    assert_close(lrs[1], 0.001)
    assert_close(lrs[2], cosine(0.001, 1, 10))
    finished = run.checkpoint()
    assert finished["progress"]["global_step"] == 4

    # A crash during epoch 2: only the epoch-1 checkpoint survives. Resuming the directory redoes
    # epoch 2 and ends on the very same weights.
    ckpt = run.dir / "checkpoints"
    shutil.copy(ckpt / "previous.pth", ckpt / "last.pth")
    proc = guide_command(CMD_RESUME_DIR, env=guide_env, substitute={GUIDE_RUN: str(run.dir)})
    assert proc.returncode == 0, explain(proc)
    assert "resumed at epoch 2" in run.log
    resumed = run.checkpoint()
    assert resumed["progress"]["global_step"] == 4
    for key, tensor in finished["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    assert run.val_epochs() == [1, 2]  # epoch 2 logged once, not twice

    # Train the finished run for more epochs (epoch=3 appended after the guide's epoch=200).
    proc = guide_command(CMD_RESUME_LONGER, "epoch=3", env=guide_env, substitute={GUIDE_RUN: str(run.dir)})
    assert proc.returncode == 0, explain(proc)
    longer = Run(run.dir)
    assert longer.config["epoch"] == 3 and longer.val_epochs() == [1, 2, 3]
    assert longer.checkpoint()["progress"]["global_step"] == 6
    assert result_dirs(out) == [run.dir]

    # A new run starting from that checkpoint file's full state.
    last = run.dir / "checkpoints/last.pth"
    proc = guide_command(
        CMD_RESUME_FILE, *experiment_small(out, epoch=4), env=guide_env,
        substitute={"path/to/checkpoint.pth": str(last)},
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    (new_dir,) = [d for d in result_dirs(out) if d != run.dir]
    warm = Run(new_dir)
    assert warm.config["checkpoint"]["resume_from"] == str(last)
    assert "resumed at epoch 4" in warm.log and warm.val_epochs() == [4]
    assert warm.checkpoint()["progress"]["global_step"] == 8


def test_debug_command(tmp_path, guide_env):
    out = tmp_path / "out"
    proc = guide_command(CMD_DEBUG, *experiment_small(out, epoch=5), env=guide_env)
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    assert run.config["debug"] is True
    # one batch of train and val per epoch, for two epochs whatever `epoch` says
    progress = run.checkpoint()["progress"]
    assert (progress["epoch"], progress["global_step"]) == (2, 2)
    assert run.val_epochs() == [1, 2]


def test_data_parallel_command(tmp_path, guide_env):
    out = tmp_path / "out"
    proc = guide_command(CMD_DP, *experiment_small(out, epoch=1), env=guide_env)
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    assert run.config["gpu"]["use"] == "0,1,2,3"
    if torch.cuda.device_count() >= 2:
        assert "DataParallel" in run.log
    else:  # no GPUs to spread over: one process on the CPU
        assert "on cpu: 1 process(es)" in run.log


@pytest.mark.slow
def test_ddp_command(tmp_path, guide_env):
    out = tmp_path / "out"
    appended = [f"output={out}", *small(epoch=1, train=32, batch=8, val=16, test=16)]
    proc = guide_command(CMD_DDP, *appended, env=guide_env)
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    assert "2 process(es)" in run.log and "16 global" in run.log
    state = run.checkpoint()
    assert state["world_size"] == 2
    assert state["progress"]["global_step"] == 2  # 32 images / (2 processes x 8)
    assert set(json.loads((run.dir / "test/metrics.json").read_text())) == {"test_accuracy", "test_loss"}


@pytest.mark.slow
def test_fsdp_command(tmp_path, guide_env):
    out = tmp_path / "out"
    proc = guide_command(CMD_FSDP, *experiment_small(out, epoch=1), env=guide_env)
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    assert re.search(r"FSDP2: [1-9]\d* block\(s\) sharded", run.log), run.log
    assert "2 process(es)" in run.log
    assert run.files("dcp_step_*")  # the sharded checkpoint ...
    from src.models.small import SimpleCNN

    SimpleCNN(width=64).load_state_dict(run.checkpoint()["model"])  # ... and the plain one beside it


def test_fsdp_block(tmp_path):
    """The block alone: FSDP2 in one process (a group of one), bf16 parameters, full sharding."""
    run = train_block(tmp_path, FSDP, overrides=small(epoch=1))
    assert run.config["distributed"]["strategy"] == "fsdp"
    assert re.search(r"FSDP2: \d+ block\(s\) sharded \(full_shard, torch.bfloat16 parameters", run.log)
    assert run.files("dcp_step_*")


# ---------------------------------------------------------------------------------------------------------
# Mixed precision; evaluation


def test_amp_and_validation_configuration_blocks(tmp_path):
    """fp16 with a GradScaler; validation every 5 epochs with four metrics and saved predictions."""
    run = train_block(tmp_path, AMP, VALIDATION, overrides=small(epoch=10, train=16))
    assert run.config["gpu"]["precision"] == "16" and re.search(r"\bfp16 precision", run.log)
    assert run.checkpoint()["scaler"]["scale"] > 0  # fp16 trains with a (live) GradScaler

    assert run.val_epochs() == [5, 10]
    for e in [e for e in run.events if "val_loss" in e]:
        assert all(0 <= e[f"val_{name}"] <= 1 for name in ("accuracy", "f1_score", "precision", "recall"))
    test = json.loads((run.dir / "test/metrics.json").read_text())
    assert set(test) == {"test_accuracy", "test_f1_score", "test_precision", "test_recall", "test_loss"}
    predictions = (run.dir / "test/predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 32  # a header and one row per test image
    assert run.config["evaluator"] == {
        "name": "classification_evaluator",
        "num_classes": 10,
        "average": "macro",
    }


def test_precision_compilation_and_custom_evaluator_blocks(tmp_path, user_env):
    """my_model in bf16, compiled in the default mode, 8 workers (Custom Precision Settings, Model
    Compilation, Slow Training), validated by the guide's custom evaluator, which also logs to MLflow
    with `mlflow.log_metric` (Custom Evaluation, Custom Metrics Logging).

    Appended beyond small data: `model.compile_backend=aot_eager` (the default inductor backend builds
    C++ kernels, minutes on a 2-core CI machine) and the evaluator and MLflow store to use.
    """
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [
        "imports=[guide_user,guide_user.evaluators]", "evaluator=my_evaluator", f"logging.mlflow_tracking_uri={uri}",
        "model.compile_backend=aot_eager", *small(epoch=2, train=32, mlflow=True),
    ]  # fmt: skip
    run = train_block(
        tmp_path, CUSTOM_PRECISION, COMPILATION, SLOW_TRAINING, overrides=overrides, env=user_env
    )
    cfg = run.config
    assert cfg["gpu"]["precision"] == "bf16" and "precision" not in cfg["model"]  # the alias, folded
    assert cfg["model"]["compile"] is True and cfg["model"]["compile_mode"] == "default"
    assert cfg["dataloader"]["num_workers"] == 8 and cfg["gpu"]["mixed_precision"] is True
    assert "bf16 precision" in run.log and "compiling the model with torch.compile (mode=default" in run.log
    weights = run.checkpoint()["model"]
    assert set(weights) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}  # no _orig_mod.

    # the evaluator's metric is the run's val_custom_metric; what it logged itself is in the same run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("SyntheticClassification")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])  # no stray run from the fluent API
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == run.dir.name
    ours = [e["val_custom_metric"] for e in run.events if "val_custom_metric" in e]
    assert len(ours) == 2
    history = client.get_metric_history(mlflow_run.info.run_id, "val_custom_metric")
    assert [m.value for m in history] == ours
    logged = client.get_metric_history(mlflow_run.info.run_id, "custom_top2_percent")
    # logged by the user's mlflow.log_metric at each validation, and once more at the test
    assert len(logged) == 3 and [m.value for m in logged[:2]] == pytest.approx([100 * v for v in ours])


# ---------------------------------------------------------------------------------------------------------
# Learning rate scheduling and optimizers: one optimizer alternative and one scheduler alternative per run


def test_adamw_with_cosine_warm_restarts(tmp_path):
    blocks = (OPTIMIZERS["AdamW"], SCHEDULERS["CosineAnnealingWarmRestarts"])
    run = train_block(tmp_path, *blocks, overrides=small(epoch=12, train=16))
    lrs = run.lr_by_epoch()
    for epoch in range(1, 11):
        assert_close(lrs[epoch], cosine(0.001, epoch - 1, 10, 1e-6))
    assert_close(lrs[11], 0.001)  # the restart; the next cycle lasts 20 epochs
    assert_close(lrs[12], cosine(0.001, 1, 20, 1e-6))
    group = run.checkpoint()["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.01, (0.9, 0.999))


def test_sgd_with_step_lr(tmp_path):
    run = train_block(tmp_path, OPTIMIZERS["SGD"], SCHEDULERS["StepLR"], overrides=small(epoch=31, train=16))
    lrs = run.lr_by_epoch()
    assert all(lrs[epoch] == pytest.approx(0.1) for epoch in range(1, 31))
    assert_close(lrs[31], 0.01)  # x0.1 after 30 epochs
    state = run.checkpoint()["optimizer"]
    assert (state["param_groups"][0]["momentum"], state["param_groups"][0]["weight_decay"]) == (0.9, 1e-4)
    assert state["state"] and all("momentum_buffer" in s for s in state["state"].values())


def test_lion_with_reduce_on_plateau(tmp_path):
    blocks = (OPTIMIZERS["Lion"], SCHEDULERS["ReduceLROnPlateau"])
    run = train_block(tmp_path, *blocks, overrides=small(epoch=3, train=16))
    group = run.checkpoint()["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-4, (0.9, 0.99), 0.01)
    # the plateau scheduler is fed the monitored metric (checkpoint.monitor: val_loss) every epoch
    scheduler = run.checkpoint()["scheduler"]
    val_losses = [e["val_loss"] for e in run.events if "val_loss" in e]
    assert scheduler["best"] == pytest.approx(min(val_losses))
    assert (scheduler["mode"], scheduler["factor"], scheduler["patience"]) == ("min", 0.5, 10)
    assert all(lr == pytest.approx(1e-4) for lr in run.lr_by_epoch().values())  # no plateau in 3 epochs


def test_schedule_free_optimizer(tmp_path):
    run = train_block(tmp_path, SCHEDULE_FREE, overrides=small(epoch=2, train=32))
    state = run.checkpoint()
    group = state["optimizer"]["param_groups"][0]
    assert group["warmup_steps"] == 1000 and group["k"] == 4  # 2 steps per epoch
    assert group["train_mode"] is False  # saved with the evaluation weights in place
    assert state["scheduler"] is None


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation, checkpointing, monitoring, profiling, common issues


def test_gradient_accumulation_tensorboard_and_profiling_blocks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_block(
        tmp_path, GRADIENT_ACCUMULATION, TENSORBOARD, PROFILING, overrides=small(epoch=5, tensorboard=True)
    )
    # 4 batches per epoch, one optimizer step per 4 batches
    assert run.checkpoint()["progress"]["global_step"] == 5
    train = [e for e in run.events if "train_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5] and all(e["grad_norm"] > 0 for e in train)

    # TensorBoard under <run>/logs; with fewer than 100 steps per epoch, one train point per epoch
    assert run.config["logging"]["log_dir"] == "logs" and not (run.dir / "tensorboard").exists()
    events = EventAccumulator(str(run.dir / "logs"))
    events.Reload()
    assert [s.step for s in events.Scalars("train_loss")] == [1, 2, 3, 4, 5]
    assert [s.step for s in events.Scalars("grad_norm")] == [1, 2, 3, 4, 5]

    # profiler: wait 1 + warmup 1 + active 3 optimizer steps, one trace under <run>/profile
    traces = list((run.dir / "profile").glob("*.pt.trace.json*"))
    assert len(traces) == 1, list((run.dir / "profile").iterdir())
    trace = traces[0].read_text()
    assert '"ProfilerStep#' in trace and "aten::conv2d" in trace


def test_checkpointing_data_loading_and_nan_loss_blocks(tmp_path):
    """Checkpoints every 10 epochs and best by accuracy; 8 persistent workers; the NaN remedies."""
    run = train_block(
        tmp_path, AUTOMATIC_CHECKPOINTING, DATA_LOADING, NAN_LOSS, overrides=small(epoch=10, train=32)
    )
    assert run.files("epoch_*.pth") == ["epoch_0010.pth"]
    accuracy = {e["epoch"]: e["val_accuracy"] for e in run.events if "val_accuracy" in e}
    best_epoch = max(accuracy, key=lambda epoch: (accuracy[epoch], -epoch))  # the first of the best
    assert run.checkpoint("best.pth")["progress"]["epoch"] == best_epoch
    assert run.checkpoint()["progress"]["epoch"] == 10
    assert run.checkpoint("previous.pth")["progress"]["epoch"] == 9

    assert run.config["dataloader"] == {
        "num_workers": 8, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 2, "drop_last": False,
    }  # fmt: skip
    assert run.checkpoint()["progress"]["global_step"] == 20  # every batch reached the model

    assert run.config["gpu"]["precision"] == "32" and "fp32 precision" in run.log
    assert run.checkpoint()["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert all(e["grad_norm"] > 0 for e in run.events if "train_loss" in e)


def test_memory_optimization_and_out_of_memory_blocks(tmp_path):
    # batch 16 comes from the blocks themselves
    run = train_block(tmp_path, OUT_OF_MEMORY, MEMORY, overrides=small(epoch=2, batch=None))
    cfg = run.config
    assert cfg["batch"] == 16 and cfg["model"]["gradient_checkpointing"] is True
    assert cfg["training"]["accumulate_grad_batches"] == 4
    # SimpleCNN has no repeated blocks: its two top-level parts (features, classifier) are recomputed
    assert "bf16 precision" in run.log and "activation checkpointing: 2 block(s)" in run.log
    assert run.checkpoint()["progress"]["global_step"] == 2  # 4 batches / 4 per step, 2 epochs


# ---------------------------------------------------------------------------------------------------------
# Example training scripts


@pytest.mark.slow
def test_advanced_training_with_all_features_command(tmp_path, guide_env):
    """config/advanced.yaml under 2 processes with the guide's overrides (batch=64 kept: 256 images)."""
    out = tmp_path / "out"
    proc = guide_command(
        CMD_ALL_FEATURES, f"output={out}", *small(epoch=5, train=256, batch=None), env=guide_env
    )
    assert proc.returncode == 0, explain(proc)
    run = Run(only_run_dir(out))
    cfg = run.config
    assert cfg["batch"] == 64 and cfg["optimizer"]["lr"] == 0.001 and cfg["gpu"]["mixed_precision"] is True
    assert cfg["training"]["gradient_clip_norm"] == 1.0 and cfg["checkpoint"]["save_frequency"] == 5
    assert "2 process(es)" in run.log and "bf16 precision" in run.log
    assert "512 global (x4 accumulation)" in run.log  # 64 x 2 processes x 4
    assert run.files("epoch_*.pth") == ["epoch_0005.pth"] and run.val_epochs() == [5]
    assert run.checkpoint()["progress"]["global_step"] == 5  # 2 batches per process per epoch: 1 step
    assert all("grad_norm" in e for e in run.events if "train_loss" in e)
