"""Which device this process uses and how it talks to its peers (DP, DDP, FSDP2 or none)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from src.errors import ConfigError

log = logging.getLogger("template")

started_process_group = False  # this process joined a process group: it ends through `exit_process`
_OWN_GROUP = False  # setup() started the current group, so cleanup() ends it (a launcher's group stays)


@dataclass
class DistContext:
    strategy: str  # "none" | "dp" | "ddp" | "fsdp"
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    dp_ids: list[int] = field(default_factory=list)  # DataParallel device ids

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def parse_gpu_ids(use: Any) -> list[int]:
    """`"0,1,2"`, `0`, `[0, 1]` -> [0, 1, 2] / [0] / [0, 1]; a clear error for anything else."""
    items = use if isinstance(use, (list, tuple)) else str(use).replace(" ", "").split(",")
    try:
        return [int(i) for i in items if str(i) != ""]
    except ValueError:
        raise ConfigError(f'gpu.use must be GPU ids like "0" or "0,1,2,3", got {use!r}') from None


def setup(distributed: Any, gpu: Any) -> DistContext:
    """Pick the device and start the process group if the strategy needs one.

    `distributed` and `gpu` are the config's sections: all this process's place in the job depends on.
    """
    strategy = str(distributed.strategy).lower()
    want = str(gpu.device).lower()
    ids = parse_gpu_ids(gpu.use)
    cuda = torch.cuda.is_available()
    if want.startswith("cuda") and not cuda:
        raise ConfigError(
            f"gpu.device={want} but CUDA is not available here; use gpu.device=auto or gpu.device=cpu"
        )
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if want == "mps" and not mps:
        raise ConfigError(
            "gpu.device=mps but MPS is not available here; use gpu.device=auto or gpu.device=cpu"
        )
    kind = want if want != "auto" else ("cuda" if cuda else "mps" if mps else "cpu")
    if kind == "cuda":
        count = torch.cuda.device_count()
        bad = [i for i in ids if i < 0 or i >= count]
        if bad:
            raise ConfigError(
                f"gpu.use id {bad[0]} is out of range: this machine has {count} CUDA device(s) (ids 0..{count - 1})"
            )

    torchrun = launched_by_torchrun()
    if strategy == "ddp" and not torchrun:
        raise ConfigError("distributed.strategy=ddp needs torchrun: ./torchrun.sh NPROC train.py CONFIG ...")
    if strategy == "dp" and torchrun:
        raise ConfigError("distributed.strategy=dp is for a single process; under torchrun use ddp or fsdp")

    if torchrun:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if strategy in ("auto", "none", "dp"):
            strategy = "ddp"
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1
        if strategy == "auto":
            strategy = "dp" if len(ids) > 1 else "none"
        if strategy == "dp" and kind != "cuda":
            log.warning(
                "gpu.use=%s asks for DataParallel, which needs CUDA: training on %s in one process",
                gpu.use,
                kind,
            )
            strategy = "none"

    if kind == "cuda":
        if torchrun:
            if 1 < len(ids) < local_world:
                raise ConfigError(
                    f"gpu.use={gpu.use} lists {len(ids)} GPUs but torchrun starts {local_world} processes per "
                    "node; list one GPU per process, or start as many processes as GPUs listed"
                )
            # One id per local rank when listed; the default single id means "one GPU per local rank".
            index = ids[local_rank] if len(ids) >= local_world else local_rank
            if os.environ.get("TEMPLATE_CUDA_DEVICE"):  # the launcher assigned one (Ray Train)
                index = int(os.environ["TEMPLATE_CUDA_DEVICE"])
            if index >= torch.cuda.device_count():
                raise ConfigError(
                    f"local rank {local_rank} has no GPU: gpu.use={gpu.use} and {torch.cuda.device_count()} device(s)"
                )
        else:
            index = ids[0] if ids else 0
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device(kind)

    ctx = DistContext(strategy, device, rank, world, local_rank, local_world, ids if strategy == "dp" else [])
    if strategy in ("ddp", "fsdp"):
        _join_group(distributed, device, rank, world, torchrun)
    return ctx


def _join_group(distributed: Any, device: torch.device, rank: int, world: int, torchrun: bool) -> None:
    """Start this process's group (DDP, FSDP), or adopt the one a launcher already made."""
    global _OWN_GROUP, started_process_group
    kind = device.type
    backend = str(distributed.backend).lower()
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if not torchrun:  # FSDP in one process: a group of one, so checkpoints keep the sharded format
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if dist.is_initialized():  # a launcher (Ray Train) made the group: use it as it is, never destroy it
        log.info("process group of the launcher adopted: backend %s, timeout %s%s", dist.get_backend(),
                 _group_timeout(), "" if backend == dist.get_backend() else f" (distributed.backend={backend} "
                 "is not used: the launcher chose)")  # fmt: skip
    else:
        _OWN_GROUP = started_process_group = True
        timeout = datetime.timedelta(minutes=int(distributed.timeout_minutes))
        store = restart_safe_store(timeout) if torchrun else None
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if kind == "cuda" else None,
            store=store,
            rank=rank if store is not None else -1,
            world_size=world if store is not None else -1,
        )


def restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The torchrun agent's store, with a prefix per attempt (one node) so restarts meet no stale keys.

    torchrun shares its TCPStore with the workers and keeps it across `--max-restarts`; without a
    prefix a restarted worker can read a dead peer's address from the previous attempt and fail to
    connect (pytorch/pytorch#135712). Across nodes the restart count may differ between agents, so
    there the default is kept; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for the agents instead.
    """
    env = os.environ
    single_node = env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not single_node:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"template/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def cleanup() -> None:
    """Destroy the process group `setup` started; one a launcher made stays for the launcher to end."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def _group_timeout() -> Any:
    """The default group's collective timeout, as far as the backend tells it."""
    try:
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # another backend, another torch: the log line just lacks it
        return "unknown"


def exit_process(code: int) -> NoReturn:
    """End a process that joined a process group, skipping the interpreter's own teardown.

    `destroy_process_group` does not end gloo's worker threads while a group object is still
    referenced, and FSDP2 keeps the default group referenced (DTensor's and DeviceMesh's caches) to
    the end. A worker thread that lets go of the last collective's tensors while the interpreter
    shuts down needs the GIL there and aborts the process ("terminate called without an active
    exception", exit 1, after a finished run). So, once the run is over, the exit functions run
    (logs flushed, child processes joined, the run's lock released) and the process ends at once.
    """
    import atexit
    import contextlib
    import sys

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a small picklable object, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any: how ranks agree to stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
