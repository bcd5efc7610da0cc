"""The training guide's code blocks, verbatim and in one place, for every test that runs them.

The guide (shared/spec/training-guide.md) is the user's contract: when it changes, this file changes with
it, and test_guide.py, test_guide_blocks.py and test_optim.py run the new blocks.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------
# The guide's YAML blocks, verbatim.

BASIC_SETUP = """\
# config/my_experiment.yaml
dataset: my_dataset
model: resnet50
batch: 32
epoch: 100

optimizer:
  name: AdamW
  lr: 0.001
  weight_decay: 0.01

lr_scheduler:
  name: CosineAnnealingWarmRestarts
  T_0: 10
  T_mult: 2

gpu:
  use: "0"
  mixed_precision: true
"""

ADVANCED_OPTIONS = """\
# Advanced configuration
training:
  gradient_clip_norm: 1.0
  accumulate_grad_batches: 4
  validation_frequency: 5
  save_frequency: 10
  early_stopping:
    patience: 20
    monitor: "val_loss"
    mode: "min"

checkpoint:
  save_best: true
  save_last: true
  save_top_k: 3
  monitor: "val_accuracy"
  mode: "max"
"""

FSDP = """\
# Enable FSDP in configuration
distributed:
  strategy: "fsdp"
  precision: "bf16"
  sharding_strategy: "full_shard"
"""

AMP = """\
gpu:
  mixed_precision: true
  precision: "16"  # or "bf16" for newer GPUs
"""

CUSTOM_PRECISION = """\
# In model configuration
model:
  name: my_model
  precision: "bf16"
  compile: true  # PyTorch 2.0 compilation
"""

GRADIENT_ACCUMULATION = """\
training:
  accumulate_grad_batches: 4  # Effective batch = batch * accumulate_grad_batches
  gradient_clip_norm: 1.0     # Clip gradients to prevent explosion
"""

AUTOMATIC_CHECKPOINTING = """\
checkpoint:
  save_frequency: 10        # Save every 10 epochs
  save_best: true          # Save best model based on metric
  save_last: true          # Always save latest checkpoint
  monitor: "val_accuracy"   # Metric to monitor for best model
  mode: "max"              # "max" for accuracy, "min" for loss
"""

# "Common Schedulers" and "Optimizer Selection" are each one block of alternatives (the same key three
# times; YAML would keep only the last), so tests run every alternative on its own: see `alternatives`.
COMMON_SCHEDULERS = """\
# Cosine annealing with warm restarts
lr_scheduler:
  name: CosineAnnealingWarmRestarts
  T_0: 10
  T_mult: 2
  eta_min: 1e-6

# Step LR with decay
lr_scheduler:
  name: StepLR
  step_size: 30
  gamma: 0.1

# Reduce on plateau
lr_scheduler:
  name: ReduceLROnPlateau
  mode: "min"
  factor: 0.5
  patience: 10
"""

WARMUP_SCHEDULE = """\
lr_scheduler:
  name: CosineAnnealingWarmupReduceRestarts
  T_0: 50
  T_mult: 2
  eta_min: 1e-6
  T_up: 10      # Warmup epochs
  gamma: 0.5    # Restart decay factor
"""

OPTIMIZER_SELECTION = """\
# AdamW (recommended for most cases)
optimizer:
  name: AdamW
  lr: 0.001
  weight_decay: 0.01
  betas: [0.9, 0.999]

# SGD with momentum (for some computer vision tasks)
optimizer:
  name: SGD
  lr: 0.1
  momentum: 0.9
  weight_decay: 1e-4

# Lion optimizer (new, efficient)
optimizer:
  name: Lion
  lr: 1e-4
  betas: [0.9, 0.99]
  weight_decay: 0.01
"""

SCHEDULE_FREE = """\
# AdamW Schedule-Free (no LR scheduler needed)
optimizer:
  name: AdamWScheduleFree
  lr: 0.001
  betas: [0.9, 0.999]
  weight_decay: 0.01
  warmup_steps: 1000
"""

TENSORBOARD = """\
logging:
  tensorboard: true
  log_dir: "logs"
  log_frequency: 100  # Log every 100 steps
"""

VALIDATION = (  # the guide's blank line inside this block holds two spaces
    """\
evaluation:
  frequency: 5        # Validate every 5 epochs
  metrics: ["accuracy", "f1_score", "precision", "recall"]
  save_predictions: true
"""
    "  \n"
    """\
evaluator:
  name: classification_evaluator
  num_classes: 10
  average: "macro"
"""
)

COMPILATION = """\
model:
  compile: true
  compile_mode: "default"  # "default", "reduce-overhead", "max-autotune"
"""

DATA_LOADING = """\
dataloader:
  num_workers: 8
  pin_memory: true
  persistent_workers: true
  prefetch_factor: 2
"""

MEMORY = """\
# Gradient checkpointing for large models
model:
  gradient_checkpointing: true

# Reduce precision
gpu:
  mixed_precision: true
  precision: "bf16"

# Smaller batch size with accumulation
batch: 16
training:
  accumulate_grad_batches: 4
"""

PROFILING = """\
profiling:
  enabled: true
  profile_memory: true
  record_shapes: true
  with_stack: true
"""

OUT_OF_MEMORY = """\
# Reduce batch size
batch: 16

# Enable gradient checkpointing
model:
  gradient_checkpointing: true

# Use gradient accumulation
training:
  accumulate_grad_batches: 4
"""

SLOW_TRAINING = """\
# Increase num_workers
dataloader:
  num_workers: 8

# Enable model compilation
model:
  compile: true

# Use mixed precision
gpu:
  mixed_precision: true
"""

NAN_LOSS = """\
# Gradient clipping
training:
  gradient_clip_norm: 1.0

# Lower learning rate
optimizer:
  lr: 1e-4

# Use more stable precision
gpu:
  precision: "32"
"""

# The guide's python snippets, used as written inside the user's evaluator.
CUSTOM_METRICS_LOGGING = """\
# In custom evaluator
import mlflow

def log_custom_metrics(self, metrics_dict):
    for key, value in metrics_dict.items():
        mlflow.log_metric(key, value)
"""

CUSTOM_EVALUATION = """\
@EVALUATOR_REGISTRY.register("my_evaluator")
class MyEvaluator(BaseEvaluator):
    def evaluate(self, predictions, targets):
        # Custom evaluation logic
        results = {}
        results["custom_metric"] = self.compute_custom_metric(predictions, targets)
        return results
"""

# The guide's shell commands, verbatim.
CMD_DP = 'python train.py config/my_experiment.yaml gpu.use="0,1,2,3"'
CMD_DDP = './torchrun.sh 4 train.py config/my_experiment.yaml gpu.use="0,1,2,3"'
CMD_FSDP = "./torchrun.sh 8 train.py config/my_experiment.yaml distributed.strategy=fsdp"
CMD_RESUME_DIR = "python train.py result/my_dataset/20241208_093000_resnet50_experiment/config.yaml"
CMD_RESUME_FILE = 'python train.py config/my_experiment.yaml checkpoint.resume_from="path/to/checkpoint.pth"'
CMD_RESUME_LONGER = (
    "python train.py result/my_dataset/20241208_093000_resnet50_experiment/config.yaml epoch=200"
)
CMD_DEBUG = "python train.py config/my_experiment.yaml debug=true"
CMD_BASIC = "python train.py config/my_experiment.yaml"
CMD_ALL_FEATURES = """\
./torchrun.sh 4 train.py config/advanced.yaml \\
  batch=64 \\
  optimizer.lr=0.001 \\
  gpu.mixed_precision=true \\
  training.gradient_clip_norm=1.0 \\
  checkpoint.save_frequency=5"""
GUIDE_RUN = "result/my_dataset/20241208_093000_resnet50_experiment"


def alternatives(block: str) -> list[str]:
    """The alternatives of a guide block that lists several for one section, separated by blank lines."""
    return [part.strip("\n") + "\n" for part in block.split("\n\n")]


def by_name(block: str, section: str) -> dict[str, str]:
    """`alternatives` keyed by the `name:` each one gives its section (e.g. "StepLR")."""
    out = {}
    for part in alternatives(block):
        name = part.split(f"{section}:\n", 1)[1].split("name:", 1)[1].split("\n", 1)[0].strip()
        out[name] = part
    return out


SCHEDULERS = by_name(COMMON_SCHEDULERS, "lr_scheduler")
OPTIMIZERS = by_name(OPTIMIZER_SELECTION, "optimizer")
