"""Every fixed setting, its type and its default: the one place a reader looks up a key.

Component sections (model, dataset, loss, optimizer, lr_scheduler, evaluator) are `name` plus free
keyword arguments checked against the registered constructor at build time; only their template
keys (compile, subsample, warmup, ...) are listed here, in `TEMPLATE_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COMPONENT_SECTIONS = ("model", "dataset", "loss", "optimizer", "lr_scheduler", "evaluator")

# Keys of component sections that the template consumes itself (never passed to the constructor).
TEMPLATE_KEYS: dict[str, dict[str, Any]] = {
    "model": {
        "compile": False,
        "compile_mode": "default",
        "compile_backend": "inductor",
        "gradient_checkpointing": False,
        "channels_last": False,
        "ema": 0.0,
        "pretrained_weight": None,
        "freeze": [],
    },
    "dataset": {"subsample": 1.0},
    "loss": {},
    "optimizer": {"no_decay_bias_norm": False, "param_groups": []},
    "lr_scheduler": {"interval": "auto", "warmup": 0},
    "evaluator": {},
}

# alias -> canonical: the guide names these settings in two places; the saved config shows the canonical one.
ALIASES = {
    "training.save_frequency": "checkpoint.save_frequency",
    "training.validation_frequency": "evaluation.frequency",
    "model.precision": "gpu.precision",
}

PRECISIONS = {
    "32": "32", "fp32": "32", "float32": "32", "32-true": "32", "full": "32",
    "16": "16", "fp16": "16", "float16": "16", "half": "16", "16-mixed": "16",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16",
}  # fmt: skip


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # epochs without improvement before stopping; 0 turns it off
    monitor: str = "val_loss"
    mode: str = "min"
    min_delta: float = 0.0


@dataclass
class PrivacyConfig:
    enabled: bool = False  # DP-SGD with Opacus (pip install -e ".[privacy]"); docs/finetuning.md
    noise_multiplier: float = 1.1  # noise std / max_grad_norm; ignored when target_epsilon is set
    max_grad_norm: float = 1.0  # every sample's gradient is clipped to this norm
    target_epsilon: float | None = None  # set: the noise multiplier that spends this epsilon over `epoch`
    target_delta: float = 1e-5  # the delta of the reported (epsilon, delta)
    fix_model: bool = False  # true: Opacus replaces BatchNorm by GroupNorm; false: BatchNorm is refused
    secure_mode: bool = False  # noise nothing saved reproduces (Opacus' secure_mode); resume not bit-exact


@dataclass
class TrainingConfig:
    accumulate_grad_batches: int = 1
    gradient_clip_norm: float = 0.0  # 0 turns clipping off
    nan_policy: str = "stop"  # stop | skip
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    unfreeze: list[Any] = field(default_factory=list)  # [{epoch: N, params: [globs], lr_scale: 1.0}]
    freeze_backbone_epochs: int = 0  # train only the classifier head for the first N epochs
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


@dataclass
class CheckpointConfig:
    save_best: bool = True
    save_last: bool = True
    save_top_k: int = 1
    save_frequency: int = 0  # keep an epoch_XXXX.pth every N epochs; 0 = never
    save_every_n_steps: int = 0  # refresh last.pth every N optimizer steps; 0 = only at epoch end
    monitor: str = "val_loss"
    mode: str = "min"
    resume_from: str | None = None
    weights_only_resume: bool = False
    allow_config_change: bool = False
    allow_restart: bool = False  # resume with no loadable checkpoint: start over, the old history moved aside


@dataclass
class EvaluationConfig:
    frequency: int = 1  # validate every N epochs; 0 = never
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    save_predictions: bool = False


@dataclass
class GpuConfig:
    use: Any = "0"  # "0" or "0,1,2,3" (DataParallel without torchrun, local ranks under torchrun)
    device: str = "auto"  # auto | cpu | cuda | mps
    mixed_precision: bool = False
    precision: str | None = None  # "32" | "16" | "bf16"; unset: bf16 (or 16) when mixed_precision
    tf32: bool = True
    cudnn_benchmark: bool = True
    deterministic: bool = False  # deterministic kernels only: bit-identical GPU runs and resumes (slower)


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto | none | dp | ddp | fsdp
    backend: str = "auto"  # auto | nccl | gloo
    precision: str | None = None  # FSDP parameter dtype; unset: gpu.precision
    sharding_strategy: str = "full_shard"  # full_shard | shard_grad_op | no_shard | hybrid_shard
    fsdp_modules: list[str] = field(default_factory=list)  # class names to shard one by one
    fsdp_min_params: int = 100_000  # or shard every leaf-most block with at least this many params
    cpu_offload: bool = False
    find_unused_parameters: bool = False
    sync_batchnorm: bool = False
    timeout_minutes: int = 10


@dataclass
class DataloaderConfig:
    num_workers: Any = "auto"  # an int, or auto: min(8, cores per process) on CUDA (persistent), 0 on CPU
    pin_memory: bool = True
    persistent_workers: bool = False
    prefetch_factor: int = 2
    drop_last: bool = False


@dataclass
class LoggingConfig:
    log_frequency: int = 50  # optimizer steps between reads of the loss (the only host syncs)
    tensorboard: bool = True
    log_dir: str = "tensorboard"  # inside the result directory
    mlflow: bool = True
    mlflow_tracking_uri: str | None = None  # unset: $MLFLOW_TRACKING_URI, else sqlite under `output`
    experiment_name: str | None = None  # unset: the dataset name
    progress_bar: bool = True
    system_metrics: bool = True  # CPU, RAM, GPU use into the MLflow run, sampled by its tracking process


@dataclass
class ProfilingConfig:
    enabled: bool = False
    profile_memory: bool = False
    record_shapes: bool = False
    with_stack: bool = False
    wait: int = 1
    warmup: int = 1
    active: int = 3


@dataclass
class DistillationConfig:
    teacher: str | None = None  # a finished run's config.yaml; null = no distillation
    temperature: float = 4.0  # softens both distributions; the soft loss is scaled by T^2
    alpha: float = 0.7  # weight of the distillation loss; 1 - alpha weights the task loss


@dataclass
class RootConfig:
    output: str = "result"
    tag: str = ""
    seed: int = 42
    imports: list[str] = field(default_factory=list)
    debug: bool = False
    batch: int = 32  # per process
    epoch: int = 10
    run_dir: str = ""  # written into a run's own config.yaml (running it resumes it); never set it
    model: dict[str, Any] = field(default_factory=lambda: {"name": "SimpleCNN"})
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "SyntheticClassification"})
    transform: dict[str, Any] = field(default_factory=lambda: {"train": [], "val": [], "test": None})
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "CrossEntropyLoss"})
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "AdamW", "lr": 0.001})
    lr_scheduler: dict[str, Any] = field(default_factory=lambda: {"name": None})
    evaluator: dict[str, Any] = field(default_factory=lambda: {"name": "classification_evaluator"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)


# Allowed values of the keys that take a choice.
CHOICES: dict[str, tuple[str, ...]] = {
    "gpu.device": ("auto", "cpu", "cuda", "mps"),
    "gpu.precision": tuple(PRECISIONS),
    "distributed.precision": tuple(PRECISIONS),
    "distributed.strategy": ("auto", "none", "dp", "ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "distributed.sharding_strategy": ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard"),
    "checkpoint.mode": ("min", "max"),
    "training.early_stopping.mode": ("min", "max"),
    "training.nan_policy": ("stop", "skip"),
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "lr_scheduler.interval": ("auto", "epoch", "step"),
}

# (low, high, low inclusive) bounds of numeric keys.
RANGES: dict[str, tuple[float, float, bool]] = {
    "seed": (0, 2**32 - 1, True),  # NumPy's seed range; the seeds derived from it stay inside int64
    "batch": (1, float("inf"), True),
    "epoch": (1, 1_000_000, True),  # more is a typo, and would overflow step counts and schedules
    "optimizer.lr": (0, float("inf"), False),
    "training.accumulate_grad_batches": (1, float("inf"), True),
    "training.gradient_clip_norm": (0, float("inf"), True),
    "training.early_stopping.patience": (0, float("inf"), True),
    "training.freeze_backbone_epochs": (0, float("inf"), True),
    "training.privacy.noise_multiplier": (0, float("inf"), True),
    "training.privacy.max_grad_norm": (0, float("inf"), False),
    "training.privacy.target_epsilon": (0, float("inf"), False),
    "training.privacy.target_delta": (0, 1, False),
    "checkpoint.save_top_k": (0, float("inf"), True),
    "checkpoint.save_frequency": (0, float("inf"), True),
    "checkpoint.save_every_n_steps": (0, float("inf"), True),
    "evaluation.frequency": (0, float("inf"), True),
    "logging.log_frequency": (1, float("inf"), True),
    "dataloader.num_workers": (0, float("inf"), True),
    "dataloader.prefetch_factor": (1, float("inf"), True),
    "model.ema": (0, 1, True),
    "dataset.subsample": (0, 1, False),
    "lr_scheduler.warmup": (0, float("inf"), True),
}
