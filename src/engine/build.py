"""What building a run needs beyond each package's own builder: the class count and preflight.

Each package builds its own parts (src.models, src.data, src.evaluators, src.optim); this module
settles the class count that model and evaluator share, and checks
every section before a result directory exists.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from src.arguments import accepts, check_arguments
from src.config.sections import component_args
from src.data import dataset_num_classes
from src.data.split import Split
from src.data.split import build_split as data_split
from src.distributed.process_group import DistContext
from src.errors import ConfigError
from src.evaluators import EVALUATOR_REGISTRY
from src.models import LOSS_REGISTRY, MODEL_REGISTRY, build_loss, build_model

if TYPE_CHECKING:
    from src.techniques.privacy import Privacy

log = logging.getLogger("template")


def build_split(cfg: DictConfig, split: str, ctx: DistContext, shuffle: bool, transforms: dict) -> Split:
    """src.data's `build_split` for this process: its rank, the job's size and its device."""
    return data_split(
        cfg.dataset,
        split,
        shuffle=shuffle,
        transforms=transforms,
        loader_section=cfg.dataloader,
        batch=int(cfg.batch),
        seed=int(cfg.seed),
        rank=ctx.rank,
        world_size=ctx.world_size,
        device_type=ctx.device.type,
    )


def num_classes_of(cfg: DictConfig, dataset: Any) -> int | None:
    found = dataset_num_classes(dataset)
    if found is None:
        found = cfg.model.get("num_classes") or cfg.evaluator.get("num_classes")
    return found


def require_num_classes(cfg: DictConfig, num_classes: int | None) -> None:
    """Refuse to guess the class count: a model built with its default of 10 would fail later, mid-run."""
    if num_classes is not None:
        return
    model_args = component_args(cfg.model, "model")
    model_needs = "num_classes" not in model_args and accepts(
        MODEL_REGISTRY.get(model_args["name"]), "num_classes"
    )
    evaluator_args = component_args(cfg.evaluator, "evaluator")
    evaluator_needs = (
        evaluator_args.get("name") == "classification_evaluator" and "num_classes" not in evaluator_args
    )
    if model_needs or evaluator_needs:
        raise ConfigError(
            f"dataset '{cfg.dataset.name}' does not say how many classes it has: set model.num_classes=<n> "
            "(the model and the evaluator both use it), or give the dataset a `num_classes` or `classes` attribute"
        )


def preflight(cfg: DictConfig) -> None:
    """Check every component's name and arguments before a result directory exists."""
    from src.data import TRANSFORM_REGISTRY
    from src.optim import LR_SCHEDULER_REGISTRY, OPTIMIZER_REGISTRY
    from src.registry import DATASET_REGISTRY

    checks = [
        (MODEL_REGISTRY, "model", {"num_classes"}),
        (DATASET_REGISTRY, "dataset", {"split", "transform"}),
        (LOSS_REGISTRY, "loss", set()),
        (OPTIMIZER_REGISTRY, "optimizer", {"params"}),
        (EVALUATOR_REGISTRY, "evaluator", {"metrics", "num_classes"}),
        # the schedule's lengths are filled in from the run when not given
        (
            LR_SCHEDULER_REGISTRY,
            "lr_scheduler",
            {"optimizer", "total_steps", "max_lr", "T_max", "total_iters"},
        ),
    ]
    for registry, kind, context in checks:
        args = component_args(cfg[kind], kind)
        name = args.pop("name", None)
        if not name:
            continue
        obj = registry.get(name)
        check_arguments(obj, args, dict.fromkeys(context), where=f"{registry.name} '{name}'")
    for items in (cfg.get("transform") or {}).values():
        for item in items or []:
            name = item if isinstance(item, str) else item.get("name")
            TRANSFORM_REGISTRY.get(str(name))
    if cfg.loss.get("name") == "WeightedSum":  # its parts are losses: check them before a directory exists
        build_loss(cfg.loss)
    check_parameter_patterns(cfg)
    if cfg.get("distillation") is not None and cfg.distillation.get("teacher"):
        from src.techniques.distillation import teacher_files

        teacher_files(cfg.distillation)
    check_privacy_before_run(cfg)


def _meta_model(cfg: DictConfig) -> torch.nn.Module | None:
    """The model built on the meta device (no memory), or None where it cannot be: training then checks it."""
    try:
        with torch.device("meta"):
            num_classes = cfg.model.get("num_classes") or cfg.evaluator.get("num_classes")
            return model_for(cfg, num_classes)
    except ConfigError:
        raise
    except Exception:  # a model that cannot be built on the meta device is checked when training builds it
        return None


def privacy_section(cfg: DictConfig) -> Any:
    """training.privacy, or None in a config without one."""
    return (cfg.get("training") or {}).get("privacy")


def model_for(cfg: DictConfig, num_classes: int | None) -> torch.nn.Module:
    """`cfg.model` as every run builds it: with training.privacy's layer swaps where privacy is enabled."""
    return build_model(cfg.model, num_classes, privacy=privacy_section(cfg))


def privacy_checked_sections(cfg: DictConfig) -> dict[str, Any]:
    """The sections `check_privacy` reads, by its argument names: DP-SGD rules out settings all over the config."""
    return {
        "training": cfg.training,
        "model_cfg": cfg.model,
        "optimizer": cfg.optimizer,
        "gpu": cfg.gpu,
        "distributed": cfg.distributed,
        "distillation": cfg.get("distillation"),
    }


def check_privacy_before_run(cfg: DictConfig) -> None:
    """training.privacy: Opacus installed, a supported combination, no BatchNorm (on the meta device)."""
    from src.techniques.privacy import check_privacy, privacy_enabled

    if not privacy_enabled(privacy_section(cfg)):
        return
    check_privacy(**privacy_checked_sections(cfg))
    model = _meta_model(cfg)
    if model is None:
        return
    check_privacy(**privacy_checked_sections(cfg), model=model)


def build_privacy(cfg: DictConfig, num_samples: int, precision: str) -> Privacy | None:
    """src.techniques' `build_privacy` (None unless enabled), after the settings are checked again: a
    resumed config may differ from the one checked before the run."""
    from src.techniques import privacy

    section = privacy_section(cfg)
    if not privacy.privacy_enabled(section):
        return None
    privacy.check_privacy(**privacy_checked_sections(cfg))
    return privacy.build_privacy(
        section, num_samples, precision, batch=int(cfg.batch), seed=int(cfg.seed), epochs=int(cfg.epoch)
    )


def check_parameter_patterns(cfg: DictConfig) -> None:
    """Freezing, unfreezing and param_groups patterns must match parameters: built on the meta device, no memory."""
    if not (cfg.model.get("freeze") or cfg.training.unfreeze or cfg.training.freeze_backbone_epochs
            or cfg.optimizer.get("param_groups")):  # fmt: skip
        return
    from omegaconf import OmegaConf

    from src.models.freezing import match, plan_unfreezing

    if "weights" in cfg.model:  # names only: never download or read pretrained weights here
        cfg = OmegaConf.merge(cfg, {"model": {"weights": None}})
    model = _meta_model(cfg)
    if model is None:
        return
    if plan_unfreezing(model, cfg.training):
        from src.distributed.process_group import launched_by_torchrun

        if launched_by_torchrun() or str(cfg.distributed.strategy) in ("ddp", "fsdp"):
            raise ConfigError(
                "training.unfreeze / freeze_backbone_epochs add parameters to the model mid-run, which DDP and "
                "FSDP do not allow; train on one process, or freeze with model.freeze only"
            )
    names = [n for n, _ in model.named_parameters()]
    for i, spec in enumerate(cfg.optimizer.get("param_groups") or []):
        if hasattr(spec, "get") and spec.get("params") is not None:
            match(names, spec.params, f"optimizer.param_groups[{i}].params")
