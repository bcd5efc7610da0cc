"""Faults at the edges of resuming (issue 22, items 3, 4, 6, 8, 13): `run_dir` set by hand, a resume
with no loadable checkpoint, one damaged file or a full disk at a save, weights that go NaN under
`nan_policy=skip`, and a damaged line in metrics.jsonl. Real train.py runs, real files, a real tmpfs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ROOT,
    TINY,
    explain,
    only_run_dir,
    read_metrics,
    result_dirs,
    run_script,
    small_file_system,
)

DUMMY = str(ROOT / "config" / "dummy.yaml")
QUIET = [*TINY, "logging.progress_bar=false"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    return lines[0]


def tree(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: (mtime, content hash), to prove that nothing was touched.

    `.lock` is the run's lock file: taken and released by every attempt, it holds nothing of the run."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished, tested 2-epoch run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished")
    proc = run_script("train.py", DUMMY, f"output={out}", *QUIET)
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(out)


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the run elsewhere: its config.yaml resumes the copy (the folder counts, not the value)."""
    target = tmp_path / "copy" / run.name
    target.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(run), str(target)], check=True)  # -a: hard links stay links
    return target


# ---------------------------------------------------------------------- 3. run_dir set by hand
def test_run_dir_on_the_command_line_is_refused_and_writes_nothing(tmp_path):
    config_dir = ROOT / "config"
    before = tree(config_dir)
    proc = run_script("train.py", DUMMY, "run_dir=somewhere", "epoch=1", f"output={tmp_path / 'out'}", *QUIET)
    assert proc.returncode == 2, explain(proc)
    line = error_line(proc)
    assert "run_dir cannot be set on the command line" in line
    assert "python train.py <run>/config.yaml" in line and "output=<folder>" in line
    assert tree(config_dir) == before  # no config/config.yaml, checkpoints/, train.log or test/
    assert not (tmp_path / "out").exists() and not (ROOT / "somewhere").exists()


def test_a_users_config_with_run_dir_is_never_overwritten(tmp_path, finished):
    folder = tmp_path / "experiments" / "foo"
    folder.mkdir(parents=True)
    user = folder / "config.yaml"
    text = f"# my experiment\n__base__: {DUMMY}\ntag: foo  # a comment\n"
    user.write_text(text)
    proc = run_script("train.py", str(user), "run_dir=x", f"output={tmp_path / 'out'}", *QUIET)
    assert proc.returncode == 2, explain(proc)
    assert "run_dir cannot be set on the command line" in error_line(proc)

    user.write_text(text + "run_dir: x\n")  # written into the file itself
    proc = run_script("train.py", str(user), f"output={tmp_path / 'out'}", *QUIET)
    assert proc.returncode == 2, explain(proc)
    line = error_line(proc)
    assert f"{user} sets run_dir" in line and "delete the run_dir line" in line
    assert user.read_text() == text + "run_dir: x\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]

    # A run's own config.yaml as a __base__ lends its settings, not its place: a new run elsewhere.
    user.write_text(f"__base__: {finished / 'config.yaml'}\ntag: reuse\n")
    proc = run_script("train.py", str(user), f"output={tmp_path / 'out'}", "epoch=1", *QUIET)
    assert proc.returncode == 0, explain(proc)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    new_run = only_run_dir(tmp_path / "out")
    assert new_run.name.endswith("_reuse") and (new_run / "checkpoints" / "last.pth").is_file()


# ---------------------------------------------------------------------- 4. nothing to resume from
@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_resume_without_a_loadable_checkpoint_is_refused_and_touches_nothing(tmp_path, finished, damage):
    run = copy_run(finished, tmp_path)
    if damage == "deleted":
        shutil.rmtree(run / "checkpoints")
    else:
        for path in (run / "checkpoints").glob("*.pth"):
            os.truncate(path, 1000)
    before = tree(run)
    proc = run_script("train.py", str(run / "config.yaml"), "epoch=3", "logging.progress_bar=false")
    assert proc.returncode == 2, explain(proc)
    line = error_line(proc)
    found = (
        f"{run}/checkpoints does not exist"
        if damage == "deleted"
        else f"none of the 3 checkpoint(s) in {run}/checkpoints loads"
    )
    assert f"cannot resume {run}: {found}" in line, line
    assert "start a fresh run from your experiment config" in line
    assert f"python train.py {run}/config.yaml checkpoint.allow_restart=true" in line
    assert tree(run) == before  # config.yaml, metrics.jsonl, train.log, test/: all as they were


def test_allow_restart_sets_the_old_history_aside_and_trains_from_step_0(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    for path in (run / "checkpoints").glob("*.pth"):
        os.truncate(path, 1000)
    old = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "train.log", "test/metrics.json")}
    proc = run_script(
        "train.py", str(run / "config.yaml"), "checkpoint.allow_restart=true", "logging.progress_bar=false"
    )
    assert proc.returncode == 0, explain(proc)
    aside = [p for p in run.iterdir() if p.name.startswith("restarted_")]
    assert len(aside) == 1, sorted(p.name for p in run.iterdir())
    for name, data in old.items():
        assert (aside[0] / name).read_bytes() == data
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == [
        "best.pth",
        "last.pth",
        "previous.pth",
    ]
    steps = [e["step"] for e in read_metrics(run) if "train_loss" in e]
    assert steps == sorted(set(steps)) and steps[0] <= 4  # one history, from the start, each step once
    assert torch.load(run / "checkpoints" / "last.pth", weights_only=True)["progress"]["global_step"] == 8
    assert "allow_restart: false" in (run / "config.yaml").read_text()  # a one-time permission
    assert (run / "test" / "metrics.json").is_file()


# ---------------------------------------------------------------------- 6. one damaged file, a full disk
def test_truncating_last_pth_in_place_leaves_a_resumable_second_file(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    folder = run / "checkpoints"
    inodes = {p.name: p.stat().st_ino for p in folder.glob("*.pth")}
    assert len(set(inodes.values())) == len(inodes) == 3, inodes  # last, previous, best: three files
    best = torch.load(folder / "best.pth", weights_only=True)
    assert best["progress"]["global_step"] == 8  # best.pth holds the same state as last.pth
    subprocess.run(["truncate", "-s", "1000", str(folder / "last.pth")], check=True)
    assert torch.equal(  # damaging last.pth in place left best.pth whole
        torch.load(folder / "best.pth", weights_only=True)["model"]["classifier.1.weight"],
        best["model"]["classifier.1.weight"],
    )
    proc = run_script("train.py", str(run / "config.yaml"), "epoch=3", "logging.progress_bar=false")
    assert proc.returncode == 0, explain(proc)
    log = proc.stdout + proc.stderr
    assert "last.pth is corrupt or truncated" in log
    assert re.search(r"resuming from (best|previous)\.pth \(last\.pth is missing or damaged\)", log), log[
        -3000:
    ]
    assert torch.load(folder / "last.pth", weights_only=True)["progress"]["epoch"] == 3
    assert f"run_dir: {run}\n" in (run / "config.yaml").read_text()  # a copied run resumes where it now is


def fill(folder: Path, leave: int) -> None:
    """Take the file system's free space down to about `leave` bytes."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_save_that_finds_the_disk_full_leaves_the_previous_generation_intact(tmp_path):
    out = tmp_path / "disk"
    with small_file_system(out, "6m") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a tmpfs (a real full file system)")
        proc = run_script("train.py", DUMMY, f"output={out}", *QUIET)
        assert proc.returncode == 0, explain(proc)
        run = result_dirs(out)[0]
        folder = run / "checkpoints"
        before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in folder.glob("*.pth")}
        fill(out, 100_000)  # a checkpoint of this run is about 0.3 MB
        proc = run_script("train.py", str(run / "config.yaml"), "epoch=3", "logging.progress_bar=false")
        after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in folder.glob("*.pth")}
        leftovers = sorted(p.name for p in folder.glob(".*"))
        epochs = {n: torch.load(folder / n, weights_only=True)["progress"]["epoch"] for n in after}
    assert proc.returncode == 1, explain(proc)
    assert "no space left on the device" in error_line(proc)
    assert after == before  # last, previous and best: the same files, the same bytes
    assert after["last.pth"][0] != after["previous.pth"][0]  # two distinct resumable files
    assert epochs["last.pth"] == 2 and epochs["previous.pth"] == 1
    assert leftovers == []


# ---------------------------------------------------------------------- 8 and 13. NaN weights
def test_skip_policy_stops_when_the_weights_go_non_finite_and_saves_none_of_them(tmp_path):
    out = tmp_path / "out"
    proc = run_script("train.py", DUMMY, f"output={out}", *QUIET, "training.nan_policy=skip",
                      "optimizer.lr=1e6", "checkpoint.save_every_n_steps=1")  # fmt: skip
    assert proc.returncode == 1, explain(proc)
    line = error_line(proc)
    assert "the model's weights became non-finite (NaN/inf)" in line and "lower optimizer.lr" in line
    run = only_run_dir(out)
    assert not (run / "test").exists() and not (run / "summary.txt").exists()
    saved = list((run / "checkpoints").glob("*.pth"))
    assert saved  # steps 1 and 2 saved finite weights before they broke
    for path in saved:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
    assert "the run FAILED; checkpoints kept in" in (run / "train.log").read_text()


def test_a_failure_before_any_checkpoint_says_there_is_none(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *QUIET, "training.nan_policy=skip", "optimizer.lr=1e6"
    )
    assert proc.returncode == 1, explain(proc)
    run = only_run_dir(out)
    log = (run / "train.log").read_text()
    assert "no checkpoint had been saved yet" in error_line(proc)
    assert "the run FAILED before its first checkpoint, so there is nothing to resume" in log
    assert "checkpoints kept in" not in log and not (run / "checkpoints").exists()
    assert f"python train.py {run}/config.yaml checkpoint.allow_restart=true" in log
    proc = run_script("train.py", str(run / "config.yaml"), "logging.progress_bar=false")
    assert proc.returncode == 2 and f"{run}/checkpoints does not exist" in error_line(proc)


def test_a_nan_metric_is_never_best():
    from src.checkpoint.train_state import improved

    assert not improved(float("nan"), None, "min") and not improved(float("nan"), 1.0, "max")
    assert not improved(float("inf"), None, "max") and improved(0.5, None, "min")


# ---------------------------------------------------------------------- 13. a damaged metrics.jsonl line
def test_a_garbage_line_in_metrics_jsonl_is_dropped_with_a_warning(tmp_path, finished):
    run = copy_run(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "\x00\x00garbage{\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    proc = run_script("train.py", str(run / "config.yaml"), "epoch=3", "logging.progress_bar=false")
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"metrics\.jsonl line 2 is not a JSON record and is dropped: '.*garbage", proc.stderr), (
        proc.stderr[-3000:]
    )
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    old = [e for e in events if e["epoch"] <= 2]
    # the checkpoint counted 3 lines (the test's line came after it): the 2 good ones are kept
    assert old == [json.loads(lines[0]), json.loads(lines[2])]
    assert any(e["epoch"] == 3 for e in events)


# A model whose third training forward pass yields a finite loss but NaN gradients:
# d/dw sqrt(|w - w|) is infinite at 0, and 0 * inf is NaN.
NAN_GRAD = """
import torch

from src.models.small import MLP
from src.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class NanGradMLP(MLP):
    calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            NanGradMLP.calls += 1
            if NanGradMLP.calls == 3:
                w = self.net[-1].weight
                out = out + 0.0 * torch.sqrt((w - w.detach()).abs()).sum()
        return out
"""


def test_skip_policy_skips_a_step_whose_gradients_are_nan_though_its_loss_is_finite(tmp_path):
    from tests.helpers import user_module_config

    config, env = user_module_config(tmp_path, "nan_grad", NAN_GRAD, f"""\
        __base__: {DUMMY}
        imports: [nan_grad]
        model: {{name: NanGradMLP, in_features: 768}}
        training: {{nan_policy: skip}}
        """)  # fmt: skip
    proc = run_script("train.py", str(config), f"output={tmp_path / 'out'}", *QUIET, env=env)
    assert proc.returncode == 0, explain(proc)
    assert "non-finite gradient at epoch 1 step 2: step skipped" in proc.stderr, proc.stderr[-3000:]
    run = only_run_dir(tmp_path / "out")
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["progress"]["global_step"] == 7  # 8 windows, one skipped
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_a_sweep_rerun_restarts_a_point_cut_before_its_first_checkpoint(tmp_path):
    """The refusal above must not strand a workflow: its re-run restarts such a point, history set aside."""
    out = tmp_path / "out"
    settings = ["config/dummy.yaml", "optimizer.lr=1e-3,2e-3", f"output={out}", *QUIET, "epoch=1"]
    proc = run_script("script/sweep.py", *settings)
    assert proc.returncode == 0, explain(proc)
    cut = next(p.parent for p in out.glob("*/*_lr2e-3/config.yaml"))
    shutil.rmtree(cut / "checkpoints")  # as if cut during its first epoch, before any save
    (cut / "summary.txt").unlink()
    again = run_script("script/sweep.py", *settings)
    assert again.returncode == 0, explain(again)
    assert "point 1: resuming" in again.stdout and (cut / "summary.txt").is_file()
    assert [p.name.startswith("restarted_") for p in cut.iterdir()].count(True) == 1
