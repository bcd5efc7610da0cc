"""Speed features behave as promised: accumulation, precision, compile, EMA, profiling, clipping, syncs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.helpers import ROOT, TINY, explain, only_run_dir, read_metrics, run_script

# A bias-free-of-BatchNorm MLP on small synthetic inputs: every sample's gradient is independent
# of the others in its batch, so how batches are grouped must not change the result.
MLP = [
    "model.name=MLP",
    "model.in_features=48",
    "model.hidden=[32]",
    "dataset.name=SyntheticClassification",
    "dataset.input_shape=[3,4,4]",
]
QUIET = ["logging.mlflow=false", "logging.tensorboard=false"]


def train(tmp: Path, *overrides: str, config: str = "config/dummy.yaml") -> Path:
    proc = run_script("train.py", config, f"output={tmp}", *overrides)
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(tmp)


def last_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------- gradient accumulation
def accumulation_pair(tmp_path: Path, train_size: int) -> tuple[dict, dict]:
    """Final weights of batch 64 and of 4 x batch 16 accumulated, with plain SGD (no scale invariance)."""
    common = [*QUIET, *MLP, "epoch=1", f"dataset.train_size={train_size}", "dataset.test_size=16",
              "evaluation.frequency=0", "optimizer.name=SGD", "optimizer.lr=0.5", "lr_scheduler.name=null"]  # fmt: skip
    big = train(tmp_path / "big", *common, "batch=64")
    small = train(tmp_path / "small", *common, "batch=16", "training.accumulate_grad_batches=4")
    a, b = last_state(big), last_state(small)
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == -(-train_size // 64)
    return a["model"], b["model"]


@pytest.mark.slow
def test_accumulating_four_batches_of_16_equals_one_batch_of_64(tmp_path):
    big, small = accumulation_pair(tmp_path, train_size=128)
    assert_same_weights(big, small)


@pytest.mark.slow
def test_short_last_window_is_normalised_by_its_own_samples(tmp_path):
    # 100 samples: windows of 64 (16+16+16+16) and 36 (16+16+4), the same groups batch=64 makes.
    big, small = accumulation_pair(tmp_path, train_size=100)
    assert_same_weights(big, small)


# ---------------------------------------------------------------------- precision and compile
def test_bf16_autocast_runs_on_cpu_and_says_so(tmp_path):
    run = train(tmp_path, *TINY, "gpu.device=cpu", "model.precision=bfloat16")  # alias and another spelling
    assert "bf16 precision" in (run / "train.log").read_text()
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.gpu.precision == "bfloat16" and "precision" not in saved.model  # the alias is folded
    losses = [m["train_loss"] for m in read_metrics(run) if "train_loss" in m]
    assert losses and all(0 < v < 10 for v in losses)


def test_mixed_precision_alone_trains_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    """No such CPU here to run on: the detection is replaced, the decision and its one line are real."""
    from src.engine import precision

    cpu = torch.device("cpu")
    mixed = OmegaConf.create({"mixed_precision": True, "precision": None})
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: False)
    precision._say_fp32_instead.cache_clear()
    with caplog.at_level("INFO", logger="template"):
        assert precision.resolve_precision(mixed, cpu).name == "32"
        assert precision.resolve_precision(mixed, cpu).name == "32"  # the test after training: said once
    said = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(said) == 1 and "gpu.precision=bf16 forces bf16" in said[0]
    explicit = OmegaConf.create({"mixed_precision": True, "precision": "bf16"})
    assert precision.resolve_precision(explicit, cpu).name == "bf16"
    monkeypatch.setattr(precision, "_cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision(mixed, cpu).name == "bf16"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags():
    from src.engine.precision import NATIVE_BF16, _cpu_has_native_bf16

    words = set(Path("/proc/cpuinfo").read_text().split())
    assert _cpu_has_native_bf16() == any(flag in words for flag in NATIVE_BF16)


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    run = train(tmp_path, *TINY, *MLP, "model.compile=true", "model.compile_backend=aot_eager")
    assert "compiling the model" in (run / "train.log").read_text()
    keys = set(last_state(run)["model"])
    assert keys == {"net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"}  # no _orig_mod. prefix
    assert json.loads((run / "test" / "metrics.json").read_text())["test_loss"] > 0


def test_gradient_checkpointing_and_channels_last_run(tmp_path):
    run = train(
        tmp_path, *QUIET, "model.name=resnet18", "dataset.input_shape=[3,16,16]", "batch=8", "epoch=1",
        "dataset.train_size=16", "dataset.val_size=8", "dataset.test_size=8",
        "model.gradient_checkpointing=true", "model.channels_last=true",
    )  # fmt: skip
    log = (run / "train.log").read_text()
    assert "activation checkpointing: 8 block(s)" in log  # resnet18: 4 stages x 2 BasicBlocks
    assert "channels_last" in log
    assert (run / "test" / "metrics.json").is_file()


# ---------------------------------------------------------------------- EMA
@pytest.mark.slow
def test_ema_is_checkpointed_resumed_exactly_and_used_for_testing(tmp_path):
    common = [
        *TINY,
        *MLP,
        "model.ema=0.5",
        "optimizer.name=SGD",
        "optimizer.lr=0.5",
        "lr_scheduler.name=null",
        "evaluation.frequency=0",
    ]
    straight = train(tmp_path / "straight", *common)
    first = train(tmp_path / "split", *common, "epoch=1")
    proc = run_script("train.py", str(first / "config.yaml"), "epoch=2")
    assert proc.returncode == 0, explain(proc)

    full, resumed = last_state(straight), last_state(first)
    assert full["ema"] is not None and int(full["ema"]["n_averaged"]) == full["progress"]["global_step"] == 8
    assert_same_weights(full["ema"], resumed["ema"], exact=True)
    assert_same_weights(full["model"], resumed["model"], exact=True)

    # test/metrics.json was computed with the EMA weights, which differ from the trained ones.
    from src.data.datasets import SyntheticClassification
    from src.models.small import MLP as MLPModel

    data = SyntheticClassification("test", input_shape=(3, 4, 4), test_size=32)
    inputs = torch.stack([data[i][0] for i in range(len(data))])
    targets = torch.tensor([data[i][1] for i in range(len(data))])

    def loss_with(weights: dict) -> float:
        model = MLPModel(in_features=48, hidden=[32])
        model.load_state_dict(weights)
        with torch.no_grad():
            return nn.functional.cross_entropy(model(inputs), targets).item()

    ema_weights = {k.removeprefix("module."): v for k, v in full["ema"].items() if k.startswith("module.")}
    tested = json.loads((straight / "test" / "metrics.json").read_text())["test_loss"]
    assert tested == pytest.approx(loss_with(ema_weights), rel=1e-5)
    assert tested != pytest.approx(loss_with(full["raw_model"]), rel=1e-3)
    assert_same_weights(full["model"], ema_weights, exact=True)  # "model" holds the reported weights


def test_weight_ema_update_is_a_lerp_and_keeps_averaged_model_layout():
    from torch.optim.swa_utils import AveragedModel

    from src.techniques.ema import WeightEMA

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.75)
    assert ema.state_dict().keys() == AveragedModel(model, use_buffers=True).state_dict().keys()
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # BatchNorm updates its running stats and counter
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, 0.75 * before["0.weight"] + 0.25 * model[0].weight)
    torch.testing.assert_close(ema.module[1].running_mean, 0.25 * model[1].running_mean)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 1  # copied, not averaged
    assert ema.n_averaged.device.type == "cpu" and int(ema.n_averaged) == 1


def test_ema_decay_outside_zero_one_is_refused_before_a_run_exists(tmp_path):
    proc = run_script("train.py", "config/dummy.yaml", f"output={tmp_path}", *TINY, "model.ema=1.0")
    assert proc.returncode == 2, explain(proc)
    assert "model.ema" in proc.stderr
    assert not list(tmp_path.glob("*/*/config.yaml"))


# ---------------------------------------------------------------------- profiling, clipping, throughput
def test_profiling_writes_a_trace_into_the_run(tmp_path):
    run = train(tmp_path, *TINY, *MLP, "profiling.enabled=true", "profiling.record_shapes=true",
                "profiling.profile_memory=true", "profiling.with_stack=true")  # fmt: skip
    traces = list((run / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1, list(run.rglob("*"))
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::addmm" in str(e.get("name")) for e in events)


def test_clipping_logs_the_gradient_norm_and_throughput(tmp_path):
    clip = 0.01
    run = train(tmp_path, *TINY, *MLP, f"training.gradient_clip_norm={clip}", "logging.log_frequency=1",
                "dataloader.num_workers=1", "dataloader.persistent_workers=true", "dataloader.prefetch_factor=2")  # fmt: skip
    steps = [m for m in read_metrics(run) if "train_loss" in m]
    assert len(steps) == 8  # 64 samples / 16 per batch, 2 epochs, one event per step
    for m in steps:
        assert m["samples_per_sec"] > 0 and m["step_time"] > 0 and 0 <= m["data_wait_share"] <= 1
    norms = [m["grad_norm"] for m in steps]
    assert all(torch.isfinite(torch.tensor(norms)))
    assert max(norms) > clip  # the norm before clipping is what gets logged


# ---------------------------------------------------------------------- host-device syncs
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


def count_syncs(tmp: Path, train_size: int, log_frequency: int) -> int:
    """Calls that would wait for a GPU, made during one epoch of `Trainer.fit` on the CPU."""
    from torch.overrides import TorchFunctionMode

    from src.config import load_config
    from src.distributed import process_group as dist_utils
    from src.engine.trainer import Trainer

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in SYNCS:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(ROOT / "config" / "dummy.yaml", [
        *QUIET, *MLP, "epoch=1", "batch=16", f"dataset.train_size={train_size}", "evaluation.frequency=0",
        f"logging.log_frequency={log_frequency}", "training.gradient_clip_norm=1.0", "model.ema=0.9",
        "training.accumulate_grad_batches=2", "optimizer.name=SGD", "optimizer.momentum=0.9", "lr_scheduler.name=null",
    ])  # fmt: skip
    ctx = dist_utils.setup(cfg.distributed, cfg.gpu)
    trainer = Trainer(cfg, ctx, tmp, resume=None)
    try:
        with Count():
            state = trainer.fit()
    finally:
        trainer.stop.uninstall()
        if trainer.trackers is not None:
            trainer.trackers.finish("FINISHED")
    assert state.finished and state.global_step == train_size // 32
    return Count.calls


def test_no_host_sync_on_steps_that_do_not_log(tmp_path):
    quiet_short = count_syncs(tmp_path / "a", train_size=64, log_frequency=1000)
    quiet_long = count_syncs(tmp_path / "b", train_size=192, log_frequency=1000)
    assert quiet_short > 0  # the epoch's end reads the loss and saves a checkpoint
    assert quiet_long == quiet_short  # four more optimizer steps, not one more sync
    # The counter does see syncs at log steps: logging every step adds reads with every step.
    assert count_syncs(tmp_path / "c", train_size=192, log_frequency=1) > quiet_long


# ---------------------------------------------------------------------- building blocks
def test_flops_of_a_training_step_are_counted_on_the_meta_device():
    from src.engine.flops import peak_flops, train_flops_per_sample
    from src.models.small import MLP as MLPModel

    sample = (torch.randn(8), 3)
    per_sample = train_flops_per_sample(lambda: MLPModel(in_features=8, hidden=[16], num_classes=4), sample,
                                        batch=2, loss_fn=nn.CrossEntropyLoss())  # fmt: skip
    # forward 2*8*16 + 2*16*4; backward: weight grads of both layers, input grad of the second only
    assert per_sample == (2 * 8 * 16) * 2 + (2 * 16 * 4) * 3
    assert peak_flops(torch.device("cpu")) is None


def test_fused_optimizer_only_on_cuda_and_only_when_not_chosen():
    from src.engine.trainer import fused_on_cuda
    from src.optim import build_optimizer

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    adamw = OmegaConf.create({"name": "AdamW", "lr": 1e-3})
    assert fused_on_cuda(adamw, cuda)["fused"] is True
    assert "fused" not in fused_on_cuda(adamw, cpu)
    assert "fused" not in fused_on_cuda(OmegaConf.create({"name": "AdamW", "foreach": True}), cuda)
    assert "fused" not in fused_on_cuda(OmegaConf.create({"name": "Lion", "lr": 1e-4}), cuda)
    # the key is one the optimizer accepts (CPU has fused AdamW kernels too)
    optimizer = build_optimizer(fused_on_cuda(adamw, cuda), nn.Linear(2, 2))
    assert optimizer.param_groups[0]["fused"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("preset", ["resnet50-cuda", "resnet50-cuda-resident", "data-path-cuda"])
def test_benchmark_cuda_preset_refuses_cleanly_without_cuda(preset):
    proc = run_script("script/benchmark.py", "--preset", preset)
    assert proc.returncode == 2, explain(proc)
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_benchmark_reports_every_ratio_on_a_tiny_cpu_run():
    proc = run_script(
        "script/benchmark.py", "--preset", "mlp-cpu", "--steps", "12", "--rounds", "1", "--epochs", "2",
        "--startup-rounds", "0", "--val-samples", "64", "--threads", "1",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    for line in ("mean step-time ratio", "median step ratio", "first-epoch mean step ratio",
                 "whole-run wall time (set-up included) ratio", "epoch-boundary gap beyond a median step"):  # fmt: skip
        assert line in proc.stdout, line
    assert "validation of 64 samples per epoch" in proc.stdout
