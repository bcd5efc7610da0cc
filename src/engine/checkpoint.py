"""Checkpoint files: atomic writes, safe loads, RNG capture, and finding the newest good one.

A save writes the state once to a temporary file, fsyncs it, then gives it its names (last.pth,
best.pth, ...) as hard links renamed into place, so every name is either the old complete file or
the new complete file, never a torn one.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.errors import RunError

log = logging.getLogger("template")


def atomic_save(state: dict[str, Any], names: list[Path]) -> None:
    """Write `state` once and publish it under every path in `names` atomically."""
    if not names:
        return
    folder = names[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}.pth"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError("unexpected pos")
        cause = _no_room(err)
        if cause is None:
            raise
        tmp.unlink(missing_ok=True)  # the partial file would keep taking the space
        raise NoRoomError(describe_no_room(cause, names, state)) from None
    for name in names:
        publish(tmp, name)
    tmp.unlink()
    _fsync_dir(folder)


class NoRoomError(RunError):
    """A checkpoint did not fit on its file system (full disk, quota, file size limit)."""


_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file size limit (ulimit -f) was reached"}  # fmt: skip


def _no_room(err: BaseException | None) -> OSError | None:
    """The OSError saying the disk is full somewhere in `err`'s chain (torch wraps it), or None."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def describe_no_room(err: OSError, names: list[Path], state: dict[str, Any]) -> str:
    """Which file, the space it needs against the space free, and the checkpoint that is still good."""
    import shutil

    folder = names[0].parent
    needed = _tensor_bytes(state)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.2f} MB free"
    except OSError:
        free = "free space unknown"
    good = [folder / n for n in ("last.pth", "previous.pth") if (folder / n).is_file()]
    kept = f"the last good checkpoint is {good[0]}" if good else "no checkpoint had been saved yet"
    return (
        f"cannot save checkpoint {', '.join(n.name for n in names)} in {folder}: {_NO_ROOM[err.errno]} (it needs about {needed / 2**20:.2f} MB, {free}); "
        f"{kept}; free some space"
    )


def _tensor_bytes(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(_tensor_bytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_tensor_bytes(v) for v in node)
    return 0


def publish(source: Path, name: Path) -> None:
    """Give `source`'s content the path `name` in one atomic rename: readers see the old or the new file."""
    staged = name.with_name(f".{name.name}.{os.getpid()}.link")
    if staged.exists():
        staged.unlink()
    try:
        os.link(source, staged)
    except OSError:  # file systems without hard links: copy
        import shutil

        shutil.copyfile(source, staged)
    os.replace(staged, name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)` with one clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        folder = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist either)"
        raise RunError(f"checkpoint not found: {path}{folder}")
    state = safe_load(path)
    if not isinstance(state, dict) or "model" not in state:
        raise RunError(f"{path} is not a checkpoint of this template (no 'model' entry)")
    return state


def safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain data only, so a file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle error, foreign file, refused object
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if refused:
            raise RunError(
                f"{path} was refused: it holds a Python object ({refused.group(1)}), not only tensors and "
                "plain data, and loading it could run code; load checkpoints written by this template"
            ) from None
        raise RunError(
            f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(err).__name__}); "
            "use another checkpoint (previous.pth, best.pth) or rerun"
        ) from None


def remove_partial_writes(folder: Path) -> None:
    """Delete what a save cut short left behind (its temporary file, staged links); never a checkpoint."""
    for path in [*folder.glob(".tmp-*.pth"), *folder.glob(".*.pth.*.link")]:
        log.warning("removing %s, left by a checkpoint write that did not finish", path)
        path.unlink(missing_ok=True)


def newest_valid_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recent checkpoint in `folder` that loads; damaged newer ones are skipped with a warning."""
    if not folder.is_dir():
        return None
    files = [p for p in folder.glob("*.pth") if not p.name.startswith(".")]
    order = {"last.pth": 0, "previous.pth": 1}
    files.sort(key=lambda p: (-_progress_key(p), order.get(p.name, 2), p.name))
    for path in files:
        try:
            state = load_checkpoint(path)
        except RunError as err:
            log.warning("%s; trying an older checkpoint", err)
            continue
        if "progress" in state:
            return path, state
    return None


def _progress_key(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def describe_mismatch(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 5) -> str:
    """A short summary of keys and shapes that differ between a model and a state dict."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)
