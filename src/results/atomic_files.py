"""Atomic checkpoint files: write, fsync, then publish every name with one rename each.

A save writes the state to a temporary file, fsyncs it, and renames it to its first name
(last.pth). Its other names (best.pth, a top-k or periodic file) share one fsynced copy, a second
file, so that damage to one file in place (a truncation, a bad block) never takes the only other
resumable state with it; the copy is made only at saves that have such names. Every name is
either the old complete file or the new one, never a torn one. The file being replaced can be kept
under another name (previous.pth), and only once the new state is on disk, so a failed save
leaves every name as it was. A full disk is one clear error (NoRoomError), the temporary files
removed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from src.errors import RunError


def atomic_save(state: dict[str, Any], names: list[Path], previous: Path | None = None) -> None:
    """Write `state` and publish it under every path in `names` atomically: `names[0]` is the written
    file, the others one copy of it. `previous`: keep the file `names[0]` replaces under this name."""
    if not names:
        return
    first, *others = names
    folder = first.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}.pth"
    copy = folder / f".tmp-{os.getpid()}-copy.pth"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if others:
            shutil.copyfile(tmp, copy)
            with open(copy, "rb+") as f:
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError("unexpected pos")
        tmp.unlink(missing_ok=True)  # a partial file would keep taking the space
        copy.unlink(missing_ok=True)
        cause = _no_room(err)
        if cause is None:
            raise
        raise NoRoomError(describe_no_room(cause, names, state)) from None
    # The new state is on disk: only now does the file it replaces become `previous`.
    if previous is not None and first.exists():
        publish(first, previous)
    os.replace(tmp, first)
    for name in others:
        publish(copy, name)
    copy.unlink(missing_ok=True)
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
    folder = names[0].parent
    needed = _tensor_bytes(state) * (2 if len(names) > 1 else 1)  # the file, and the copy for its other names
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.2f} MB free"
    except OSError:
        free = "free space unknown"
    good = [folder / n for n in ("last.pth", "previous.pth") if (folder / n).is_file()]
    kept = f"the last good checkpoint is {good[0]}" if good else "no checkpoint had been saved yet"
    return (
        f"cannot save checkpoint {', '.join(sorted(n.name for n in names))} in {folder}: {_NO_ROOM[err.errno]} (it needs about {needed / 2**20:.2f} MB, {free}); "
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


def no_room_line(what: str, err: OSError, needed: int, where: Path) -> str:
    """'cannot write X: no space left on the device (it needs about 0.29 MB, 0.30 MB free); free some space'."""
    free = _free(where)
    return f"cannot write {what}: {_NO_ROOM[err.errno]} (it needs about {_size(needed)}, {free}); free some space"


def _free(where: Path | str) -> str:
    import shutil

    try:
        return f"{_size(shutil.disk_usage(where).free)} free"
    except OSError:
        return "free space unknown"


def _size(count: int) -> str:
    """Bytes as a person reads them: 0.29 MB, or 3.1 KB where MB would round to 0.00."""
    return f"{count / 2**20:.2f} MB" if count >= 10_000 else f"{count / 1024:.1f} KB"


def as_no_room(err: BaseException, what: str) -> NoRoomError | None:
    """A full disk met outside a checkpoint save (a log, the metrics file) as one line; None otherwise."""
    cause = _no_room(err)
    if cause is None:
        return None
    name = cause.filename or f"in {what}"
    return NoRoomError(f"cannot write {name}: {_NO_ROOM[cause.errno]} ({_free(what)}); free some space")


def atomic_write(path: Path, data: bytes | str) -> None:
    """A small file written whole or not at all (temporary file, then a rename); a full disk is a
    NoRoomError that names the file and the space it needs, with the temporary file removed."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno not in _NO_ROOM:
            raise
        raise NoRoomError(no_room_line(str(path), err, len(raw), path.parent)) from None


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Give `folder` exactly `files` (name -> content) all at once: they are written into a sibling
    folder that is then renamed into place, so a reader (or a full disk) never meets half of them."""
    import shutil

    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, content in files.items():
            (staging / name).write_bytes(content)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno not in _NO_ROOM:
            raise
        needed = sum(len(c) for c in files.values())
        raise NoRoomError(
            no_room_line(f"{folder}/ ({', '.join(files)})", err, needed, folder.parent)
        ) from None
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)  # a rename needs no space; the old results go once the new are in place
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
