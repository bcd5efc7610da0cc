"""Build a run's parts from its config: data, model, loss, evaluator, optimizer, schedule."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from src.config.schema import TEMPLATE_KEYS
from src.data import ResumableSampler, build_dataset, build_loader, dataset_num_classes, split_transforms
from src.data.transforms import to_container
from src.engine.distributed import DistContext
from src.errors import ConfigError
from src.evaluators import EVALUATOR_REGISTRY
from src.models import LOSS_REGISTRY, MODEL_REGISTRY

log = logging.getLogger("template")


def import_user_modules(modules: list[str]) -> None:
    """Import the config's `imports:` so their decorators register components before anything is built."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in modules:
        if not name or "/" in name or "\\" in name or name.endswith(".py"):
            raise ConfigError(
                f"imports: '{name}' is not a module name; write it the way Python imports it, e.g. mypkg.models"
            )
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise _import_error(name, err) from None
            raise ConfigError(
                f"imports: no module named '{err.name}' (searched the Python path, which includes {Path.cwd()}); "
                "run from the folder that holds it, add that folder to PYTHONPATH, or pip install it"
            ) from None
        except Exception as err:
            raise _import_error(name, err) from None


def _import_error(name: str, err: Exception) -> ConfigError:
    """The user module's own error, pointing at its file and line (not at importlib's frames)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<")]
    if isinstance(err, SyntaxError):  # its message already names the file and line
        where = ""
    elif frames:
        where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})"
    else:
        where = ""
    return ConfigError(f"imports: module '{name}' failed to import: {type(err).__name__}: {err}{where}")


def component_args(section: DictConfig | dict, kind: str) -> dict[str, Any]:
    """A component section without the keys the template consumes itself."""
    from omegaconf import OmegaConf

    plain = (
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    )
    return {k: v for k, v in plain.items() if k not in TEMPLATE_KEYS[kind]}


@dataclass
class Split:
    dataset: Any
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    generator: torch.Generator | None


def build_split(cfg: DictConfig, split: str, ctx: DistContext, shuffle: bool, transforms: dict) -> Split:
    dataset = build_dataset(cfg.dataset, split=split, transform=transforms.get(split))
    if len(dataset) == 0:
        from src.errors import RunError

        raise RunError(
            f"dataset '{cfg.dataset.name}' has no samples in its {split} split; check where it reads from "
            "(dataset.root) and its size settings"
        )
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=int(cfg.seed), rank=ctx.rank, world_size=ctx.world_size
    )
    loader_cfg = dict(to_container(cfg.dataloader) or {})
    if split != "train":  # drop_last is for training only: evaluation sees every sample once
        loader_cfg["drop_last"] = False
    if shuffle:  # training: random augmentation is a function of (seed, epoch, index), see src/data/seeded.py
        from src.data.seeded import EpochIndexSampler, SeededItems

        items, order = SeededItems(dataset, int(cfg.seed)), EpochIndexSampler(sampler)
    else:
        items, order = dataset, sampler
    loader = build_loader(
        items, int(cfg.batch), order, loader_cfg, seed=int(cfg.seed), device_type=ctx.device.type
    )
    return Split(dataset, sampler, loader, getattr(loader, "generator", None))


def build_transforms(cfg: DictConfig) -> dict:
    return split_transforms(cfg.get("transform"))


def build_model(cfg: DictConfig, num_classes: int | None) -> nn.Module:
    args = component_args(cfg.model, "model")
    if (
        num_classes is not None
        and "num_classes" not in args
        and accepts(MODEL_REGISTRY.get(args["name"]), "num_classes")
    ):
        args["num_classes"] = num_classes
    model = MODEL_REGISTRY.build(args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{args['name']}' did not build an nn.Module (got {type(model).__name__})")
    privacy = (cfg.get("training") or {}).get("privacy")
    if privacy is not None and privacy.get("enabled"):
        from src.engine.privacy import private_model

        model = private_model(model, bool(privacy.get("fix_model", False)))
    if cfg.model.get("freeze"):
        from src.models.freezing import freeze

        freeze(model, cfg.model.freeze)
    return model


def build_loss(cfg: DictConfig) -> Any:
    return LOSS_REGISTRY.build(component_args(cfg.loss, "loss"))


def build_evaluator(cfg: DictConfig, num_classes: int | None) -> Any:
    args = component_args(cfg.evaluator, "evaluator")
    if args.get("name") == "classification_evaluator" and "num_classes" not in args:
        if num_classes is None:
            raise ConfigError(
                "evaluator.num_classes is needed: the dataset does not say how many classes it has"
            )
        args["num_classes"] = num_classes
    if accepts(EVALUATOR_REGISTRY.get(args["name"]), "metrics"):
        return EVALUATOR_REGISTRY.build(args, metrics=list(cfg.evaluation.metrics))
    return EVALUATOR_REGISTRY.build(args)


def accepts(obj: Any, name: str) -> bool:
    """Whether a constructor takes the keyword `name` (or any keyword)."""
    import inspect

    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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


def check_output_size(
    cfg: DictConfig, model: nn.Module, dataset: Any, num_classes: int | None, device: torch.device
) -> None:
    """Catch a classifier head that does not match the dataset before the first step, not mid-epoch."""
    if num_classes is None:
        return
    sample, _ = dataset[0] if isinstance(dataset[0], (tuple, list)) else (None, None)
    if not isinstance(sample, torch.Tensor):
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample.unsqueeze(0).to(device))
    except RuntimeError as err:  # shapes that do not fit: say so now, in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model '{cfg.model.name}' cannot take the inputs of dataset '{cfg.dataset.name}' "
            f"(one item has shape {tuple(sample.shape)}): {reason}; match the model's input arguments to the data"
        ) from None
    model.train(was)
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != num_classes:
        raise ConfigError(
            f"model '{cfg.model.name}' outputs {out.shape[1]} classes but dataset '{cfg.dataset.name}' "
            f"has {num_classes}; set model.num_classes={num_classes}"
        )


def preflight(cfg: DictConfig) -> None:
    """Check every component's name and arguments before a result directory exists."""
    from src.data import TRANSFORM_REGISTRY
    from src.optim import LR_SCHEDULER_REGISTRY, OPTIMIZER_REGISTRY
    from src.registry import DATASET_REGISTRY, check_arguments

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
        build_loss(cfg)
    check_parameter_patterns(cfg)
    if cfg.get("distillation") is not None and cfg.distillation.get("teacher"):
        from src.engine.distillation import teacher_files

        teacher_files(cfg.distillation)
    check_privacy_before_run(cfg)


def check_privacy_before_run(cfg: DictConfig) -> None:
    """training.privacy: Opacus installed, a supported combination, no BatchNorm (on the meta device)."""
    from src.engine.privacy import check_privacy, privacy_enabled

    if not privacy_enabled(cfg):
        return
    check_privacy(cfg)
    try:
        with torch.device("meta"):
            model = build_model(cfg, cfg.model.get("num_classes") or cfg.evaluator.get("num_classes"))
    except ConfigError:
        raise
    except Exception:  # a model that cannot be built on the meta device is checked when training builds it
        return
    check_privacy(cfg, model)


def check_parameter_patterns(cfg: DictConfig) -> None:
    """Freezing, unfreezing and param_groups patterns must match parameters: built on the meta device, no memory."""
    if not (cfg.model.get("freeze") or cfg.training.unfreeze or cfg.training.freeze_backbone_epochs
            or cfg.optimizer.get("param_groups")):  # fmt: skip
        return
    from omegaconf import OmegaConf

    from src.models.freezing import match, plan_unfreezing

    if "weights" in cfg.model:  # names only: never download or read pretrained weights here
        cfg = OmegaConf.merge(cfg, {"model": {"weights": None}})
    try:
        with torch.device("meta"):
            model = build_model(cfg, cfg.model.get("num_classes") or cfg.evaluator.get("num_classes"))
    except ConfigError:
        raise
    except Exception:  # a model that cannot be built on the meta device is checked when training builds it
        return
    if plan_unfreezing(model, cfg.training):
        from src.engine.distributed import launched_by_torchrun

        if launched_by_torchrun() or str(cfg.distributed.strategy) in ("ddp", "fsdp"):
            raise ConfigError(
                "training.unfreeze / freeze_backbone_epochs add parameters to the model mid-run, which DDP and "
                "FSDP do not allow; train on one process, or freeze with model.freeze only"
            )
    names = [n for n, _ in model.named_parameters()]
    for i, spec in enumerate(cfg.optimizer.get("param_groups") or []):
        if hasattr(spec, "get") and spec.get("params") is not None:
            match(names, spec.params, f"optimizer.param_groups[{i}].params")
