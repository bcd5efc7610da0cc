"""Shared helpers for tests that run train.py / test.py as real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings appended to a command so a run takes seconds on a CPU.
TINY = [
    "logging.mlflow=false",
    "logging.tensorboard=false",
    "epoch=2",
    "batch=16",
    "dataset.train_size=64",
    "dataset.val_size=32",
    "dataset.test_size=32",
]


def run_script(
    script: str, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repository root and return the finished process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_dirs(output: Path) -> list[Path]:
    """Every run directory under an output root (<output>/<dataset>/<run>/)."""
    return sorted(p.parent for p in Path(output).glob("*/*/config.yaml"))


def only_run_dir(output: Path) -> Path:
    runs = result_dirs(output)
    assert len(runs) == 1, f"expected one run under {output}, found {runs}"
    return runs[0]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def start_script(script: str, *args: str, log_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python <script> args...` in the background, output to `log_file` (a pipe could fill up)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_file, "w") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def logged_steps(output: Path) -> list[int]:
    """Steps of the train_loss events in the metrics.jsonl of the one run under `output`."""
    files = list(Path(output).glob("*/*/metrics.jsonl"))
    if not files:
        return []
    lines = files[0].read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
    return [e["step"] for e in events if "train_loss" in e]


def wait_for_step(proc: subprocess.Popen, output: Path, step: int, timeout: float = 180.0) -> None:
    """Block until the run has logged `step` (so a signal sent now lands right after it)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before logging step {step}")
        if step in logged_steps(output):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not logged within {timeout:.0f} s")


SLOW_MLP = """
import os
import time

from src.models.small import MLP
from src.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class SlowMLP(MLP):
    def forward(self, x):
        if self.training:
            time.sleep(float(os.environ.get("SLEEP_ENV", "0")))
        return super().forward(x)
"""


def slow_mlp_source(sleep_env: str) -> str:
    """A user module registering SlowMLP: an MLP whose training steps sleep `$sleep_env` s, so a kill lands mid-epoch."""
    return SLOW_MLP.replace("SLEEP_ENV", sleep_env)


def user_module_config(tmp_path: Path, module: str, source: str, config: str) -> tuple[Path, dict[str, str]]:
    """Write `module`.py into tmp_path/pkg and the config to exp.yaml (both dedented).

    Returns the config path and the env (PYTHONPATH) under which train.py imports the module.
    """
    import textwrap

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{module}.py").write_text(textwrap.dedent(source))
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(config))
    python_path = os.pathsep.join(p for p in (str(tmp_path / "pkg"), os.environ.get("PYTHONPATH", "")) if p)
    return path, {"PYTHONPATH": python_path}


def wait_for_line(proc: subprocess.Popen, log_file: Path, text: str, timeout: float = 120.0) -> None:
    """Block until `text` appears in the run's console log; fails if the run ends first.

    After `timeout` s it returns anyway (the caller's kill then lands wherever the run is).
    """
    import time

    deadline = time.monotonic() + timeout
    while text not in log_file.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log_file.read_text()
        time.sleep(0.01)


def sigkill_after(proc: subprocess.Popen, wait: Callable[[], None]) -> None:
    """Call `wait` (until the moment to kill), then SIGKILL the run and check it died of it.

    The run is killed and reaped even when `wait` fails, so no orphan outlives the test.
    """
    try:
        wait()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_same_states(got: dict, want: dict, keys: tuple[str, ...]) -> None:
    """Each of `keys` in two loaded checkpoints is bit-identical (a resumed run against an uninterrupted one)."""
    for key in keys:
        diffs = state_differences(got[key], want[key])
        assert not diffs, (key, diffs[:5])


def state_differences(a: object, b: object, where: str = "") -> list[str]:
    """Paths inside two nested checkpoint structures whose tensors or values are not identical."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return [] if same else [where or "/"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)}"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in state_differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def shell_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a documented shell command: `python` (and torchrun.sh's $PYTHON) is this interpreter.

    A wrapper script rather than a symlink, so that a virtual environment's interpreter still finds
    its packages.
    """
    import shlex

    bin_dir = Path(tmp_path) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable, **extra}


def run_shell(command: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one shell command line with bash from the repository root, as a user types it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_in_terminal(argv: list[str], rows: int, cols: int, cwd: Path = ROOT, timeout: float = 300.0) -> str:
    """Run a command with stdout and stderr on a rows x cols pseudo-terminal; all it wrote there.

    The environment is a colour terminal's (TERM=xterm, NO_COLOR unset), so the run draws bars and
    colours as it would for a user. It must exit 0 within `timeout` s, or it is killed and the test fails.
    """
    import contextlib
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd
    )
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        # select, so that a run which hangs without writing still ends at the deadline
        while select.select([main_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text[-4000:]}"
    return text


@contextlib.contextmanager
def small_file_system(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only); yields False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None
    if mounted:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until its file system has no room left: a real full disk, on demand."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Still a live process (a zombie no one reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts each worker in a session of its own, so a kill of the
    agent's group alone leaves them running."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found
