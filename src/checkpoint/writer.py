"""Checkpoint writes off the training thread: copy to host memory, then write on one background thread.

Training pays only for `snapshot()`, a copy of the state's tensors into host memory (pinned
buffers reused from one save to the next on CUDA, so the copy is one fast DMA per tensor). The
`CheckpointWriter` then writes that copy with `atomic_save` on its own thread: temporary file,
fsync, and one atomic rename per name, so a crash or a SIGKILL at any moment leaves every name
either the old complete file or the new one. At most one write is in flight; `submit` waits for
the previous one, and `wait()` (end of training, stop signals) waits for the last. A write that
failed raises its error in the training thread at the next `submit` or `wait`. Used by the
Checkpointer; nothing here knows what a checkpoint holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from src.errors import RunError
from src.results.atomic_files import atomic_save


class HostSnapshot:
    """Copies nested state (dicts, lists, tuples of tensors and plain data) to host memory.

    CUDA tensors go into pinned buffers kept between calls, keyed by their place in the state, so
    steady-state saves allocate nothing; CPU tensors are cloned, because training goes on updating
    the originals in place while the writer reads the copy.
    """

    def __init__(self) -> None:
        self._pinned: dict[str, torch.Tensor] = {}

    def __call__(self, state: Any) -> Any:
        copied = self._copy(state, "")
        if any(t.is_cuda for t in _tensors(state)):
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory must land first
        return copied

    def _copy(self, obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj.detach(), key)
        if isinstance(obj, dict):
            return {k: self._copy(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v, f"{key}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj  # numbers, strings, None: immutable

    def _copy_tensor(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor.clone()
        buffer = self._pinned.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._pinned[key] = buffer
        buffer.copy_(tensor, non_blocking=True)
        return buffer


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


class CheckpointWriter:
    """Writes host-memory states on one background thread, one at a time, atomically.

    `save` is the function that writes (`atomic_save` by default: state, list of paths). A state
    handed to `submit` must not change until it is written; take it with `writer.snapshot(state)`,
    which waits for the write in flight before it refills the pinned buffers that write reads.
    """

    def __init__(self, save: Callable[[Any, list[Path]], None] = atomic_save) -> None:
        self._save = save
        self._copy = HostSnapshot()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._after: Callable[[], None] | None = None

    def snapshot(self, state: Any) -> Any:
        """Host copy of `state`; waits for the write in flight, whose pinned buffers it reuses."""
        self.wait()
        return self._copy(state)

    def submit(
        self,
        state: Any,
        names: list[Path],
        after: Callable[[], None] | None = None,
        before: Callable[[], None] | None = None,
    ) -> None:
        """Start writing `state` (already on the host) under `names`. On the writer thread, `before`
        runs first (FSDP: wait for the sharded part the files point to) and `after` once every name
        is published (pruning, tracker commits). Waits for the previous write first."""
        self.wait()
        self._thread = threading.Thread(
            target=self._write,
            args=(state, list(names), before, after),
            name="checkpoint-writer",
            daemon=True,
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until no write is in flight; re-raise the error of a write that failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _write(
        self,
        state: Any,
        names: list[Path],
        before: Callable[[], None] | None,
        after: Callable[[], None] | None,
    ) -> None:
        try:
            if before is not None:
                before()
            self._save(state, names)
            if after is not None:
                after()
        except RunError as err:  # already the one line the user reads (a full disk, a failed DCP write)
            self._error = err
        except BaseException as err:  # handed to the training thread at its next submit/wait
            where = ", ".join(n.name for n in names)
            self._error = RunError(
                f"writing checkpoint {where} in {names[0].parent if names else '?'} "
                f"failed: {type(err).__name__}: {err}"
            )
            self._error.__cause__ = err
