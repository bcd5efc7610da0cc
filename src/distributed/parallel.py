"""Turn a built model into the one that trains: memory layout, activation checkpointing, compile, DP/DDP/FSDP2."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from src.config.schema import PRECISIONS
from src.distributed.process_group import DistContext
from src.errors import ConfigError

log = logging.getLogger("template")


def prepare_model(
    model: nn.Module, model_cfg: Any, distributed: Any, gpu: Any, ctx: DistContext
) -> tuple[nn.Module, nn.Module]:
    """(model to call, raw module whose state_dict is the plain checkpoint format).

    `model_cfg`, `distributed`, `gpu`: the config's sections of those names (gpu for FSDP2's precision).
    """
    model = model.to(ctx.device)
    if model_cfg.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
        log.info("channels_last memory format for the weights and 4-D inputs")
    if model_cfg.get("gradient_checkpointing", False):
        blocks = enable_activation_checkpointing(model)
        log.info("activation checkpointing: %s recomputed in backward", blocks)
    if ctx.strategy == "ddp" and distributed.sync_batchnorm:
        if ctx.device.type != "cpu":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:  # torch's SyncBatchNorm only runs on accelerators
            log.warning("distributed.sync_batchnorm is ignored on CPU: BatchNorm statistics stay per process")
    raw = model
    if ctx.strategy == "fsdp":
        shard_fsdp2(model, distributed, gpu, ctx)
    compiled = compile_model(model, model_cfg)
    if ctx.strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        compiled = nn.parallel.DistributedDataParallel(
            compiled, device_ids=ids, find_unused_parameters=bool(distributed.find_unused_parameters)
        )
    elif ctx.strategy == "dp":
        compiled = nn.DataParallel(compiled, device_ids=ctx.dp_ids)
    return compiled, raw


def compile_model(model: nn.Module, model_cfg: Any) -> nn.Module:
    """torch.compile as the `model` section's compile keys ask, or the model as it is."""
    if not model_cfg.get("compile", False):
        return model
    mode = model_cfg.get("compile_mode", "default")
    backend = model_cfg.get("compile_backend", "inductor")
    log.info("compiling the model with torch.compile (mode=%s, backend=%s)", mode, backend)
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend)


def enable_activation_checkpointing(model: nn.Module) -> str:
    """Recompute activations of repeated blocks in backward, trading compute for memory.

    A model may offer `gradient_checkpointing_enable()`; otherwise every block held in an
    nn.Sequential or nn.ModuleList (ResNet stages, transformer layers) is wrapped, or, in a model
    without such blocks, each of its top-level parts.
    """
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        return "the model's own blocks"
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    blocks = {
        id(child)
        for parent in model.modules()
        if isinstance(parent, (nn.Sequential, nn.ModuleList))
        for child in parent.children()
        if any(True for _ in child.parameters())
        and not isinstance(child, (nn.Sequential, nn.ModuleList))
        and len(list(child.children())) > 0
    }
    if not blocks:  # no repeated blocks (a small CNN, an MLP): recompute each top-level part instead
        blocks = {id(child) for child in model.children() if any(True for _ in child.parameters())}
    if not blocks:
        raise ConfigError(
            "model.gradient_checkpointing: found no repeated blocks to checkpoint in this model"
        )
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in blocks,
    )
    return f"{len(blocks)} block(s)"


def shard_fsdp2(model: nn.Module, distributed: Any, gpu: Any, ctx: DistContext) -> None:
    """fully_shard each block, then the root, on a 1-D or (replicate, shard) mesh.

    `distributed` and `gpu` are the config's sections; gpu's precision applies where distributed's is unset.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    strategy = str(distributed.sharding_strategy)
    device_type = ctx.device.type
    world = ctx.world_size
    if strategy == "hybrid_shard":
        shard = ctx.local_world_size if world % ctx.local_world_size == 0 else world
        mesh = init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    elif strategy == "no_shard":
        mesh = init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world,))
    precision = distributed.precision if distributed.precision is not None else gpu.precision
    if precision is None and gpu.mixed_precision:
        precision = "bf16"
    dtype = {"16": torch.float16, "bf16": torch.bfloat16}.get(PRECISIONS.get(str(precision).lower(), "32"))
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": strategy != "shard_grad_op",
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype
        else MixedPrecisionPolicy(),
    }
    if distributed.cpu_offload and device_type != "cpu":  # on a CPU run the parameters already live there
        kwargs["offload_policy"] = CPUOffloadPolicy()
    names = set(distributed.fsdp_modules)
    if names:
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        found = {type(m).__name__ for m in blocks}
        if names - found:
            raise ConfigError(
                f"distributed.fsdp_modules: no module of class {sorted(names - found)} in the model"
            )
    else:
        blocks = _large_leafmost_blocks(model, int(distributed.fsdp_min_params))
    why = _sharding_reason(
        model, blocks, names, int(distributed.fsdp_min_params)
    )  # before fully_shard renames classes
    if dtype is not None:
        # BatchNorm keeps fp32 weights to match its fp32 running statistics (batch_norm refuses a
        # bf16 weight beside fp32 buffers); it still takes and returns the low-precision activations.
        fp32 = {**kwargs, "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32)}
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.affine:
                fully_shard(norm, **fp32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    offload = ", CPU offload" if "offload_policy" in kwargs else ""
    extras = (f", {dtype} parameters" if dtype else "") + offload
    log.info(
        "FSDP2: %d block(s) sharded (%s%s), mesh %s: %s",
        len(blocks),
        strategy,
        extras,
        tuple(mesh.shape),
        why,
    )


def _sharding_reason(model: nn.Module, blocks: list[nn.Module], names: set[str], min_params: int) -> str:
    """Which blocks were sharded on their own and why, or why none was (so 0 does not read as 'off')."""
    total = sum(p.numel() for p in model.parameters())
    if not blocks:
        return (
            f"no block holds distributed.fsdp_min_params={min_params} parameters (the whole model has {total:,}), "
            "so the model is sharded as one unit; lower fsdp_min_params or name block classes in "
            "distributed.fsdp_modules to shard block by block"
        )
    where = {id(m): name for name, m in model.named_modules()}
    shown = [
        f"{where.get(id(b), '?')} ({type(b).__name__}, {sum(p.numel() for p in b.parameters()):,})"
        for b in blocks[:5]
    ]
    more = f" and {len(blocks) - 5} more" if len(blocks) > 5 else ""
    rule = (
        f"of class {sorted(names)}"
        if names
        else f"the smallest with at least distributed.fsdp_min_params={min_params} parameters"
    )
    return f"{', '.join(shown)}{more}, {rule}; the rest of the {total:,} parameters with the root"


def _large_leafmost_blocks(model: nn.Module, min_params: int) -> list[nn.Module]:
    counts = {id(m): sum(p.numel() for p in m.parameters()) for m in model.modules()}
    return [
        m
        for m in model.modules()
        if m is not model
        and counts[id(m)] >= min_params
        and not any(counts[id(c)] >= min_params for c in m.children())
    ]


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-batches that are not the last of their accumulation window."""
    if sync:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()
