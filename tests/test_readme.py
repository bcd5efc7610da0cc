"""The README's shell commands run: every ```bash block, line by line, in order, as a reader would.

Training on an experiment config gets small-data settings appended (a temporary output folder, tiny
synthetic splits, CPU, no MLflow/TensorBoard); commands on an existing run (`result/.../<run>/...`)
get the run made by the block's earlier training command in place of the placeholder and nothing
appended, since changing a run's settings on resume is refused. Installing and the test suite itself
are not run from here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT, explain, result_dirs, run_shell, shell_env

SKIPPED = ("pip ", "python -m pytest")
SMALL = [
    "gpu.device=cpu",
    "logging.mlflow=false",
    "logging.tensorboard=false",
    "batch=16",
    "dataset.train_size=64",
    "dataset.val_size=32",
    "dataset.test_size=32",
    "dataset.input_shape=[3,16,16]",
]
RUN_PLACEHOLDER = re.compile(r"result/[^\s/]+/<run>")


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comments and blank lines dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
        blocks.append(commands)
    return blocks


BLOCKS = bash_blocks((ROOT / "README.md").read_text())


def test_readme_has_the_expected_blocks():
    """Guards the parser: a README edit that hides commands from these tests shows up here."""
    assert len(BLOCKS) >= 3
    commands = [c for block in BLOCKS for c in block]
    assert "python train.py config/dummy.yaml" in commands
    assert any(c.startswith("./torchrun.sh 2 train.py config/advanced.yaml") for c in commands)
    assert all(not c.startswith("#") for c in commands)


def trains_new_run(argv: list[str]) -> bool:
    """`python train.py CONFIG ...` or `./torchrun.sh N train.py CONFIG ...` on an experiment file."""
    if "train.py" not in argv:
        return False
    config = argv[argv.index("train.py") + 1]
    return not config.endswith("/config.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(index, tmp_path):
    out = tmp_path / "out"
    env = shell_env(tmp_path)
    run: Path | None = None
    ran = 0
    for command in BLOCKS[index]:
        if command.startswith(SKIPPED):
            continue
        if "<run>" in command:
            assert run is not None, f"'{command}' needs a run made earlier in the same block"
            command = RUN_PLACEHOLDER.sub(str(run), command)
        assert not re.search(r"<[a-z_.]+>", command), f"unknown placeholder in README command: {command}"
        argv = shlex.split(command)
        if argv[0] == "./torchrun.sh":
            argv[1] = "2"  # at most 2 processes on the test machine
        new_run = trains_new_run(argv)
        appended = [f"output={out}", *SMALL] if new_run else []
        before = set(result_dirs(out))
        proc = run_shell(shlex.join(argv + appended), env=env)
        assert proc.returncode == 0, f"README command failed: {command}\n{explain(proc)}"
        ran += 1

        made = set(result_dirs(out)) - before
        if new_run:
            assert len(made) == 1, f"'{command}' should make one run directory, made {sorted(made)}"
            run = made.pop()
            assert (run / "test/metrics.json").is_file() and (run / "checkpoints/last.pth").is_file()
        else:
            assert not made, f"'{command}' should not make a new run directory"
        if run is not None and "train.py" in argv and not new_run:  # resumed in place
            epoch = yaml.safe_load((run / "config.yaml").read_text())["epoch"]
            state = torch.load(run / "checkpoints/last.pth", weights_only=True)
            assert state["progress"]["epoch"] == epoch, command
        if "debug=true" in argv:
            state = torch.load(run / "checkpoints/last.pth", weights_only=True)
            assert (state["progress"]["epoch"], state["progress"]["global_step"]) == (2, 2)
        if argv[:2] == ["python", "test.py"]:
            assert (run / "test/metrics.json").stat().st_mtime > (
                run / "checkpoints/last.pth"
            ).stat().st_mtime
    assert ran, f"README block {index} has no command that runs here"


def test_warm_start_with_nothing_left_to_train_is_refused_up_front(tmp_path):
    """A checkpoint already past `epoch` would make a run that trains nothing and has nothing to test."""
    checkpoint = tmp_path / "late.pth"
    torch.save({"model": {}, "progress": {"epoch": 5, "global_step": 20}}, checkpoint)
    out = tmp_path / "out"
    proc = run_shell(
        shlex.join(["python", "train.py", "config/dummy.yaml", "epoch=3", f"checkpoint.resume_from={checkpoint}",
                    f"output={out}", *SMALL]),
        env=shell_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 2, explain(proc)
    assert "has trained 5 epoch(s) and epoch=3" in proc.stderr and "set epoch above 5" in proc.stderr
    assert not result_dirs(out)
