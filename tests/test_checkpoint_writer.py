"""The background checkpoint writer: snapshots, one write in flight, errors surfaced, SIGKILL-safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from src.checkpoint.checkpointer import atomic_save, load_checkpoint
from src.checkpoint.writer import CheckpointWriter, HostSnapshot
from src.errors import RunError
from tests.helpers import ROOT


class GatedSave:
    """atomic_save that waits for a gate before writing, to hold a write in flight on purpose."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()

    def __call__(self, state: dict, names: list[Path]) -> None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.started.set()
        assert self.gate.wait(30)
        atomic_save(state, names)
        with self.lock:
            self.active -= 1


def test_a_write_in_flight_keeps_the_snapshot_while_training_mutates_the_source(tmp_path: Path) -> None:
    weights = {"w": torch.zeros(1000), "nested": [torch.ones(3)], "step": 1}
    save = GatedSave()
    writer = CheckpointWriter(save)
    writer.submit(writer.snapshot({"model": weights}), [tmp_path / "last.pth", tmp_path / "best.pth"])
    assert save.started.wait(10) and writer.busy
    weights["w"].add_(5.0)  # training goes on in place while the write waits
    weights["nested"][0].mul_(7.0)
    save.gate.set()
    writer.wait()
    assert not writer.busy
    for name in ("last.pth", "best.pth"):
        state = load_checkpoint(tmp_path / name)
        assert torch.equal(state["model"]["w"], torch.zeros(1000))
        assert torch.equal(state["model"]["nested"][0], torch.ones(3))
        assert state["model"]["step"] == 1
    # two files: damage to last.pth in place leaves best.pth whole
    assert os.stat(tmp_path / "last.pth").st_ino != os.stat(tmp_path / "best.pth").st_ino
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_at_most_one_write_in_flight_and_after_runs_once_published(tmp_path: Path) -> None:
    save = GatedSave()
    writer = CheckpointWriter(save)
    seen: list[bool] = []
    writer.submit({"model": {"v": torch.tensor(1)}}, [tmp_path / "last.pth"])
    assert save.started.wait(10)
    second = threading.Thread(
        target=writer.submit,
        args=({"model": {"v": torch.tensor(2)}}, [tmp_path / "last.pth"]),
        kwargs={"after": lambda: seen.append((tmp_path / "last.pth").exists())},
    )
    second.start()
    time.sleep(0.2)
    assert second.is_alive()  # the second submit waits for the first write
    save.gate.set()
    second.join(10)
    writer.wait()
    assert save.most_active == 1 and seen == [True]
    assert int(load_checkpoint(tmp_path / "last.pth")["model"]["v"]) == 2


def test_a_failed_write_raises_in_the_training_thread_at_the_next_call(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the checkpoint folder should be")
    writer = CheckpointWriter()
    writer.submit({"model": {}}, [blocker / "last.pth"])
    with pytest.raises(RunError, match=r"writing checkpoint last.pth in .*not_a_folder failed"):
        writer.wait()
    writer.wait()  # reported once; the writer is usable again
    writer.submit({"model": {}}, [tmp_path / "ok.pth"])
    writer.wait()
    assert (tmp_path / "ok.pth").is_file()

    writer.submit({"model": {}}, [blocker / "again.pth"])
    with pytest.raises(RunError, match=r"again\.pth"):
        writer.submit({"model": {}}, [tmp_path / "later.pth"])  # the next submit reports it too
    assert not (tmp_path / "later.pth").exists()


def test_host_snapshot_clones_cpu_tensors_and_keeps_structure() -> None:
    source = {"a": torch.arange(4.0), "t": (torch.ones(2), 3), "s": "x", "n": None}
    copy = HostSnapshot()(source)
    source["a"].zero_()
    assert torch.equal(copy["a"], torch.arange(4.0))
    assert isinstance(copy["t"], tuple) and copy["t"][1] == 3 and copy["s"] == "x" and copy["n"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned, reused host buffers")
def test_host_snapshot_reuses_pinned_buffers_on_cuda() -> None:
    snap = HostSnapshot()
    source = {"w": torch.randn(256, device="cuda")}
    first = snap(source)
    assert first["w"].is_pinned() and torch.equal(first["w"], source["w"].cpu())
    second = snap(source)
    assert second["w"].data_ptr() == first["w"].data_ptr()


CHILD = """
import sys, threading, time
import torch
sys.path.insert(0, {root!r})
from pathlib import Path
from src.checkpoint import checkpointer as checkpoint
from src.checkpoint.writer import CheckpointWriter

folder = Path({folder!r})
checkpoint.atomic_save({{"model": {{"v": torch.tensor(1)}}, "progress": {{}}}}, [folder / "last.pth"])
real = torch.save

def slow_save(obj, f):  # a large write that takes a while: the parent kills us inside it
    real(obj, f)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

checkpoint.torch.save = slow_save
writer = CheckpointWriter()
big = {{"model": {{"v": torch.tensor(2), "big": torch.zeros(4_000_000)}}, "progress": {{}}}}
writer.submit(writer.snapshot(big), [folder / "last.pth", folder / "best.pth"])
writer.wait()
"""


@pytest.mark.slow
def test_sigkill_during_a_background_write_leaves_the_previous_last_loadable(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), folder=str(tmp_path)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
        temporary = list(tmp_path.glob(".tmp-*.pth"))
        assert temporary and temporary[0].stat().st_size > 4_000_000  # killed mid-write, data on disk
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(tmp_path / "last.pth")
    assert int(state["model"]["v"]) == 1 and "big" not in state["model"]
    assert not (tmp_path / "best.pth").exists()
