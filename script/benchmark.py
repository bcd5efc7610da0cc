"""How much do the Trainer and its trackers cost over a hand-written PyTorch loop? Measured.

    python script/benchmark.py                           # the default: what each tracker costs (below)
    python script/benchmark.py --preset mlp-cpu          # small MLP on the CPU
    python script/benchmark.py --preset resnet18-cpu
    python script/benchmark.py --preset resnet50-cuda    # bf16 + channels_last; needs CUDA
    python script/benchmark.py --preset resnet50-cuda-resident  # compute-bound: data already on the GPU
    python script/benchmark.py --preset data-path-cuda   # uint8 images converted per sample, loader workers
    python script/benchmark.py --preset mlp-cpu --val-samples 300   # both loops validate every epoch

The default preset, `tracking`, runs a user's default run (every default on: MLflow, TensorBoard,
validation every epoch, a checkpoint every epoch, the test at the end; an MLP 784-512-256-10, 3
epochs of 375 steps of 64) as fresh processes in five settings, in an order that rotates every
round: MLflow on with a new store (the first one on this machine, and a later one) and with an
existing store, MLflow off, and MLflow and TensorBoard off. Per setting, medians over the rounds:
the time to the first step, the mean step of the first and the last epoch, the whole run, and the
CPU seconds of MLflow's child process and of the training process between the first and the last
step. Then each tracker's share of the whole run.

The other presets compare the Trainer with a bare loop in one process.
Both loops train the same model on the same in-memory tensors with the same batch, optimizer
(AdamW) and DataLoader settings, in alternating rounds. The Trainer runs through `train_main` with
its defaults on: logging every 50 steps, TensorBoard, MLflow, the progress bar and a checkpoint at
every epoch end; only validation is off, because the bare loop has none.

Step time is read from the data itself: the clock is stamped when the training loop receives a
batch from its DataLoader, so the time between two stamps is one whole step (loading, forward,
backward, optimizer, and whatever the loop does around them, epoch-end checkpoints included) for
both loops alike. A first round, and the first epoch of every run, are warm-up and not counted.
Every preset reports the mean and the median step ratio, the epoch-boundary gap (the step that
spans an epoch end, less a median step) and the whole-run wall ratio (each loop's call, set-up
included). Then `python train.py` and a bare script are started as subprocesses to compare the
time to the first step and the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE_CONFIG = ROOT / "config" / "__base__" / "config.yaml"


@dataclass
class Preset:
    device: str
    model: dict[str, Any]
    input_shape: tuple[int, ...]
    batch: int
    steps_per_epoch: int
    epochs: int  # the first is warm-up
    rounds: int
    precision: str = "32"
    channels_last: bool = False
    num_classes: int = 10
    bare_model: str = ""  # how the bare start-up script builds the same model
    extra: list[str] = field(default_factory=list)  # further Trainer overrides
    resident: bool = False  # the data lives on the device already (no loader copies, no workers)
    decode: bool = False  # items are uint8 and converted + flipped per sample, as image decoding would be
    workers: int | str = 0  # both loops' num_workers ("auto": the Trainer's rule, the bare loop's own pick)


# The CUDA presets below start from this one: bf16 and channels_last, 3 rounds of 3 epochs of 40 steps.
_RESNET50_CUDA = Preset(
    device="cuda",
    model={"name": "resnet50"},
    input_shape=(3, 224, 224),
    batch=64,
    steps_per_epoch=40,
    epochs=3,
    rounds=3,
    precision="bf16",
    channels_last=True,
    bare_model="__import__('torchvision').models.resnet50(num_classes=10)",
)

PRESETS = {
    "mlp-cpu": Preset(
        device="cpu",
        model={"name": "MLP", "in_features": 784, "hidden": [512, 256]},
        input_shape=(1, 28, 28),
        batch=64,
        steps_per_epoch=938,  # an MNIST-sized epoch: 60 032 samples
        epochs=3,
        rounds=5,
        bare_model=(
            "nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.0), nn.Linear(512, 256), "
            "nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 10))"
        ),
    ),
    "resnet18-cpu": Preset(
        device="cpu",
        model={"name": "resnet18"},
        input_shape=(3, 32, 32),
        batch=32,
        steps_per_epoch=40,
        epochs=3,
        rounds=3,
        bare_model="__import__('torchvision').models.resnet18(num_classes=10)",
    ),
    "resnet50-cuda": _RESNET50_CUDA,
    # Compute-bound: batches are slices of tensors already on the GPU, so any gap is the loop's own.
    "resnet50-cuda-resident": dataclasses.replace(
        _RESNET50_CUDA,
        batch=128,
        resident=True,
        extra=["dataloader.num_workers=0", "dataloader.pin_memory=false"],
    ),
    # The data path: uint8 images turned into floats and flipped per sample in loader workers.
    "data-path-cuda": dataclasses.replace(
        _RESNET50_CUDA,
        model={"name": "resnet18"},
        input_shape=(3, 160, 160),
        batch=128,
        decode=True,
        workers="auto",
        bare_model="__import__('torchvision').models.resnet18(num_classes=10)",
    ),
}


# ---------------------------------------------------------------------- the shared data
class Clock:
    """Wall and main-thread CPU times at which each batch's first item was fetched, per run.

    CPU time of the loop's own thread barely moves when other processes load the machine, so it
    gives a steadier ratio on a shared machine; wall time is the truth on an idle one.
    """

    def __init__(self) -> None:
        self.batch = 1
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self._fetched = 0

    def start(self, batch: int) -> None:
        self.batch, self.stamps, self.cpu_stamps, self._fetched = batch, [], [], 0

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.thread_time())
        self._fetched += 1


def stamp_batches() -> None:
    """Stamp CLOCK whenever any DataLoader hands the loop a batch of the training split.

    In the main process, so loader workers (which run `__getitem__` elsewhere) change nothing.
    """
    from torch.utils.data import dataloader

    base = dataloader._BaseDataLoaderIter
    if getattr(base, "_benchmark_stamped", False):
        return
    inner = base.__next__

    def __next__(self: Any) -> Any:
        batch = inner(self)
        dataset = self._dataset
        while not hasattr(dataset, "stamps_clock") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset  # through wrappers such as SeededItems (per-sample seeds)
        if getattr(dataset, "stamps_clock", False):
            CLOCK.tick()
        return batch

    base.__next__ = __next__  # type: ignore[method-assign]
    base._benchmark_stamped = True  # type: ignore[attr-defined]


CLOCK = Clock()
DATA: dict[str, Any] = {}


def register_dataset() -> None:
    import torch
    from torch.utils.data import Dataset

    from src.data import DATASET_REGISTRY

    class BenchmarkTensors(Dataset):
        """The benchmark's in-memory tensors; the train split stamps the clock on every fetch."""

        def __init__(self, split: str, transform: Any = None) -> None:
            self.split = split
            self.stamps_clock = split == "train"
            self.inputs, self.targets = DATA["inputs"], DATA["targets"]
            if split != "train":  # validation (--val-samples) or a short test phase after training
                n = DATA["val_samples"] or DATA["batch"]
                self.inputs, self.targets = DATA["val_inputs"][:n], DATA["val_targets"][:n]
            self.num_classes = DATA["num_classes"]
            self.decode = DATA["decode"]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.inputs[i]
            if self.decode:  # what an image pipeline does per sample: to float, normalise, flip
                x = x.float().div_(255.0).sub_(0.5)
                if i % 2:
                    x = x.flip(-1)
            return x, self.targets[i]

    if "BenchmarkTensors" not in DATASET_REGISTRY:
        DATASET_REGISTRY.register("BenchmarkTensors")(BenchmarkTensors)


# ---------------------------------------------------------------------- the two loops
def bare_loop(p: Preset, seed: int) -> None:
    """What a researcher would write by hand: no logging, no checkpoints; validation only if asked."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from src.data import DATASET_REGISTRY
    from src.models import MODEL_REGISTRY

    device = torch.device(p.device)
    torch.manual_seed(seed)
    model = MODEL_REGISTRY.build(p.model, num_classes=p.num_classes).to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    dataset = DATASET_REGISTRY.build({"name": "BenchmarkTensors"}, split="train")
    workers = bare_workers(p)
    pin = device.type == "cuda" and not p.resident
    extra: dict[str, Any] = {"persistent_workers": True} if workers else {}
    loader = DataLoader(
        dataset, batch_size=p.batch, shuffle=True, pin_memory=pin, num_workers=workers, **extra
    )
    val = DATASET_REGISTRY.build({"name": "BenchmarkTensors"}, split="val") if DATA["val_samples"] else None
    val_loader = DataLoader(val, batch_size=p.batch, pin_memory=pin) if val is not None else None
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(p.precision)
    model.train()
    for _ in range(p.epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if p.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if val_loader is not None:  # loss and accuracy, as a hand-written loop would report them
            model.eval()
            correct = torch.zeros((), device=device)
            with torch.no_grad():
                for x, y in val_loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                        out = model(x)
                    loss_fn(out.float(), y)
                    correct += (out.argmax(1) == y).sum()
            float(correct)
            model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_workers(p: Preset) -> int:
    """The bare loop's num_workers: a researcher's usual pick for "auto", min(8, cores) on CUDA."""
    if p.workers != "auto":
        return int(p.workers)
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def trainer_overrides(p: Preset, output: Path, dataset: str, seed: int) -> list[str]:
    over = [
        f"output={output}",
        f"seed={seed}",
        f"batch={p.batch}",
        f"epoch={p.epochs}",
        f"dataset.name={dataset}",
        f"model.name={p.model['name']}",
        *(f"model.{k}={v}" for k, v in p.model.items() if k != "name"),
        "optimizer.name=AdamW",
        "optimizer.lr=0.001",
        f"evaluation.frequency={1 if DATA.get('val_samples') else 0}",
        f"dataloader.num_workers={p.workers}",
        f"gpu.device={p.device}",
        f"gpu.precision={p.precision}",
        f"model.channels_last={str(p.channels_last).lower()}",
        *p.extra,
    ]
    return [o.replace(" ", "") for o in over]


def trainer_loop(p: Preset, output: Path, seed: int) -> Path:
    from src.run.main import train_main

    code = train_main(BASE_CONFIG, trainer_overrides(p, output, "BenchmarkTensors", seed))
    if code != 0:
        raise SystemExit(f"the Trainer run failed with exit code {code}")
    runs = sorted(output.glob("BenchmarkTensors/*/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
    return runs[-1].parent


def steady_step_times(p: Preset, cpu: bool = False) -> list[float]:
    """Durations between consecutive batch starts, after the first (warm-up) epoch."""
    stamps = (CLOCK.cpu_stamps if cpu else CLOCK.stamps)[p.steps_per_epoch :]
    return [b - a for a, b in itertools.pairwise(stamps)]


def first_epoch_step_times(p: Preset) -> list[float]:
    """Durations between batch starts inside the first epoch, where start-up work may still run."""
    return [b - a for a, b in itertools.pairwise(CLOCK.stamps[: p.steps_per_epoch])]


def boundary_gaps(p: Preset) -> list[float]:
    """Per epoch end: the step that spans it less a median steady step (what the boundary adds)."""
    median = statistics.median(steady_step_times(p))
    ends = range(p.steps_per_epoch, len(CLOCK.stamps), p.steps_per_epoch)
    return [CLOCK.stamps[i] - CLOCK.stamps[i - 1] - median for i in ends]


def peak_memory_gb(device: str) -> float | None:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------- time to first step
BARE_SCRIPT = """\
import time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.manual_seed(0)
device = torch.device({device!r})
x = torch.randn({n}, *{shape!r})
y = torch.randint(0, 10, ({n},))
loader = DataLoader(TensorDataset(x, y), batch_size={batch}, shuffle=True, pin_memory=device.type == "cuda")
model = {model}.to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
for i, (xb, yb) in enumerate(loader):
    loss = loss_fn(model(xb.to(device)), yb.to(device))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i == 0:
        print(f"first step done, loss={{loss.item():.4f}}", flush=True)
"""


def time_to_first_step(cmd: list[str], marker: str, cwd: Path) -> tuple[float, float]:
    """(seconds from launch until `marker` appears in the output, peak RSS of the process in GB).

    The peak is the kernel's high-water mark (VmHWM), polled until the process ends; the rusage of a
    child would also count the pages it shared with this big process before exec.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = [0.0]

    def watch() -> None:
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, StopIteration):
                status = Path(f"/proc/{proc.pid}/status").read_text()
                kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
                peak[0] = max(peak[0], kib / 2**20)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    seen, tail = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-20:], line]
        if seen is None and marker in line:
            seen = time.perf_counter() - start
    proc.wait()
    watcher.join()
    if proc.returncode != 0 or seen is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{''.join(tail)}")
    return seen, peak[0]


def startup(p: Preset, rounds: int, work: Path) -> dict[str, list[float]]:
    steps = 20
    bare = work / "bare_first_step.py"
    bare.write_text(
        BARE_SCRIPT.format(
            device=p.device, n=steps * p.batch, shape=p.input_shape, batch=p.batch, model=p.bare_model
        )
    )
    shape = "[" + ",".join(str(d) for d in p.input_shape) + "]"
    train_cmd = [
        sys.executable,
        "train.py",
        str(BASE_CONFIG),
        *trainer_overrides(p, work / "startup", "SyntheticClassification", 0),
        f"dataset.input_shape={shape}",
        f"dataset.train_size={steps * p.batch}",
        f"dataset.test_size={p.batch}",
        "epoch=1",
        "logging.log_frequency=1",
    ]
    times: dict[str, list[float]] = {"bare": [], "train.py": [], "bare_rss": [], "train_rss": []}
    for _ in range(rounds):
        t, rss = time_to_first_step([sys.executable, str(bare)], "first step done", ROOT)
        times["bare"].append(t)
        times["bare_rss"].append(rss)
        t, rss = time_to_first_step(train_cmd, "epoch 1 step 1:", ROOT)
        times["train.py"].append(t)
        times["train_rss"].append(rss)
    return times


# ---------------------------------------------------------------------- what each tracker costs
TRACKING_SETTINGS = {
    "MLflow on, first store on this machine": ["logging.mlflow=true"],
    "MLflow on, new store": ["logging.mlflow=true"],
    "MLflow on, existing store": ["logging.mlflow=true"],
    "MLflow off": ["logging.mlflow=false"],
    "MLflow and TensorBoard off": ["logging.mlflow=false", "logging.tensorboard=false"],
}

ONE_RUN = """
import json, sys
sys.path.insert(0, {root!r})
sys.argv = ["train.py"]
try:  # as train.py does: MLflow's child imports MLflow while this process imports torch
    from src.tracking.mlflow_tracker import spawn
    if {spawn!r}:
        spawn({spawn!r})
except ImportError:  # an older checkout (--root) starts it later itself
    pass
import torch
from script import benchmark as b
p = b.PRESETS["mlp-cpu"]
p.steps_per_epoch, p.epochs = {steps}, {epochs}
b.register_dataset()
b.stamp_batches()
gen = torch.Generator().manual_seed(0)
n, v = p.steps_per_epoch * p.batch, {val}
b.DATA.update(inputs=torch.randn(n, *p.input_shape, generator=gen), targets=torch.randint(0, 10, (n,), generator=gen),
              val_inputs=torch.randn(v, *p.input_shape, generator=gen),
              val_targets=torch.randint(0, 10, (v,), generator=gen), val_samples=v, decode=False,
              batch=p.batch, num_classes=10)
b.CLOCK.start(p.batch)
from src.run.main import train_main
code = train_main(b.BASE_CONFIG, b.trainer_overrides(p, __import__("pathlib").Path({out!r}), "BenchmarkTensors", 0) + {extra!r})
print("STAMPS " + json.dumps(b.CLOCK.stamps), flush=True)
sys.exit(code)
"""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from /proc (Linux); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mlflow_child(parent: int) -> int | None:
    """The pid of the MLflow child process `parent` started, if it runs."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent and (
                    b"mlflow_worker" in (entry / "cmdline").read_bytes()
                ):
                    return int(entry.name)
    return None


def one_tracked_run(
    extra: list[str], out: Path, env: dict[str, str], steps: int, epochs: int, root: Path = ROOT
) -> dict[str, float]:
    """One fresh process running train_main in checkout `root`; its CPU and its MLflow child's, every 20 ms."""
    spawn = f"sqlite:///{out.resolve()}/mlflow.db" if "logging.mlflow=true" in extra else ""
    code = ONE_RUN.format(
        root=str(root), steps=steps, epochs=epochs, val=640, out=str(out), extra=extra, spawn=spawn
    )
    start = time.perf_counter()  # CLOCK_MONOTONIC, shared with the child's stamps
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    samples: list[tuple[float, float, float]] = []  # (time, trainer CPU, MLflow child CPU)

    def watch() -> None:
        child, child_cpu = None, 0.0
        for tick in itertools.count():
            if proc.poll() is not None:
                break
            if child is None and "logging.mlflow=true" in extra and tick % 10 == 0:  # /proc scans cost CPU
                child = mlflow_child(proc.pid)
            own = cpu_seconds(proc.pid)
            if child is not None:
                child_cpu = cpu_seconds(child) or child_cpu
            if own is not None:
                samples.append((time.perf_counter(), own, child_cpu))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    whole = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0 or "STAMPS " not in stdout:
        raise SystemExit(f"the run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    stamps = json.loads(stdout.split("STAMPS ", 1)[1])[: epochs * steps]
    step_times = [b - a for a, b in itertools.pairwise(stamps)]

    def at(t: float) -> tuple[float, float]:  # the CPU counters at time t (the sample just before it)
        before = [s for s in samples if s[0] <= t] or samples[:1]
        return before[-1][1], before[-1][2]

    (train0, child0), (train1, child1) = at(stamps[0]), at(stamps[-1])
    return {
        "first step at (s)": stamps[0] - start,
        "first-epoch step (ms)": 1e3 * statistics.fmean(step_times[: steps - 1]),
        "last-epoch step (ms)": 1e3 * statistics.fmean(step_times[(epochs - 1) * steps :]),
        "whole run (s)": whole,
        "training CPU, first to last step (s)": train1 - train0,
        "MLflow child CPU, first to last step (s)": child1 - child0,
        "MLflow child CPU, whole run (s)": max((s[2] for s in samples), default=0.0),
    }


def tracking_cost(rounds: int, steps: int, epochs: int, root: Path = ROOT) -> int:
    """Every setting of TRACKING_SETTINGS once per round, the order rotating; medians and shares."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in TRACKING_SETTINGS}
    print(f"benchmark tracking of {root}: {machine()}", flush=True)
    print(f"  {rounds} rounds x {len(TRACKING_SETTINGS)} settings: MLP 784-512-256-10, {epochs} epochs x {steps} "
          f"steps of 64, validation of 640 samples per epoch, every other default on", flush=True)  # fmt: skip
    names = list(TRACKING_SETTINGS)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", "PYTHONUNBUFFERED": "1"}
        existing = work / "existing"
        one_tracked_run(["logging.mlflow=true"], existing, env, 20, 2, root)  # makes the store (not counted)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                run_env, out = env, work / f"run{r}_{names.index(name)}"
                if name.endswith("existing store"):
                    out = existing
                elif name.endswith("first store on this machine"):  # no cached empty store to copy
                    run_env = {**env, "XDG_CACHE_HOME": str(work / f"cache{r}")}
                results[name].append(
                    one_tracked_run(TRACKING_SETTINGS[name], out, run_env, steps, epochs, root)
                )
                figures = ", ".join(f"{k} {v:.3f}" for k, v in results[name][-1].items())
                print(f"round {r + 1}, {name}: {figures}", flush=True)
    print(f"\n== tracking ({machine()}); medians over {rounds} rounds, (min-max)")
    keys = list(results[names[0]][0])
    print("| | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    median: dict[str, dict[str, float]] = {}
    for name in names:
        median[name] = {k: statistics.median(run[k] for run in results[name]) for k in keys}
        cells = [f"{median[name][k]:.2f} ({min(r[k] for r in results[name]):.2f}-{max(r[k] for r in results[name]):.2f})"
                 for k in keys]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    off, bare = median["MLflow off"], median["MLflow and TensorBoard off"]
    for name in names[:3]:
        on = median[name]
        print(f"{name} / MLflow off: first step {on[keys[0]] - off[keys[0]]:+.2f} s, first epoch "
              f"{on[keys[1]] / off[keys[1]]:.2f}x, last epoch {on[keys[2]] / off[keys[2]]:.2f}x, whole run "
              f"{on[keys[3]] / off[keys[3]]:.2f}x ({on[keys[3]] - off[keys[3]]:+.2f} s); MLflow's child used "
              f"{100 * on[keys[5]] / on[keys[4]]:.1f}% of the training's CPU between the first and last step")  # fmt: skip
    print(f"TensorBoard (MLflow off / both off): first epoch {off[keys[1]] / bare[keys[1]]:.2f}x, last epoch "
          f"{off[keys[2]] / bare[keys[2]]:.2f}x, whole run {off[keys[3]] / bare[keys[3]]:.2f}x "
          f"({off[keys[3]] - bare[keys[3]]:+.2f} s)")  # fmt: skip
    return 0


# ---------------------------------------------------------------------- report
def spread(values: list[float], unit: float = 1e3, fmt: str = "{:.3f}") -> str:
    values = [v * unit for v in values]
    return f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def machine() -> str:
    import platform

    import torch

    where = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{where}; load average {load:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["tracking", *sorted(PRESETS)], default="tracking")
    parser.add_argument("--rounds", type=int, help="alternating rounds of bare loop and Trainer")
    parser.add_argument("--steps", type=int, help="steps per epoch")
    parser.add_argument("--epochs", type=int, help="epochs per run, the first being warm-up (>= 2)")
    parser.add_argument("--startup-rounds", type=int, default=3, help="time-to-first-step runs; 0 skips")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="tracking: the checkout to measure (an older one, say)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the in-process loops")
    parser.add_argument("--val-samples", type=int, default=0,
                        help="validate both loops on this many samples every epoch (default 0: no validation)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.preset == "tracking":
        return tracking_cost(
            args.rounds or 3, args.steps or 375, max(2, args.epochs or 3), args.root.resolve()
        )
    p = PRESETS[args.preset]
    p.rounds = args.rounds or p.rounds
    p.steps_per_epoch = args.steps or p.steps_per_epoch
    p.epochs = max(2, args.epochs or p.epochs)

    import torch

    if p.device == "cuda" and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a CUDA GPU and none is available here; try --preset mlp-cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    register_dataset()
    stamp_batches()
    n = p.steps_per_epoch * p.batch
    gen = torch.Generator().manual_seed(0)
    where = p.device if p.resident else "cpu"

    def make(count: int) -> Any:
        if p.decode:
            return torch.randint(0, 256, (count, *p.input_shape), dtype=torch.uint8, generator=gen).to(where)
        return torch.randn(count, *p.input_shape, generator=gen).to(where)

    n_val = max(args.val_samples, p.batch)
    DATA.update(
        inputs=make(n),
        targets=torch.randint(0, p.num_classes, (n,), generator=gen).to(where),
        val_inputs=make(n_val),
        val_targets=torch.randint(0, p.num_classes, (n_val,), generator=gen).to(where),
        val_samples=args.val_samples,
        decode=p.decode,
        batch=p.batch,
        num_classes=p.num_classes,
    )
    print(f"benchmark {args.preset}: {machine()}", flush=True)
    print(f"  {p.rounds} rounds x {p.epochs} epochs x {p.steps_per_epoch} steps, batch {p.batch}, "
          f"num_workers {p.workers} (bare loop {bare_workers(p)}), data on {where}, "
          f"validation of {args.val_samples} samples per epoch", flush=True)  # fmt: skip

    results: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {"bare": [], "trainer": []}
    reported: list[float] = []
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        work = Path(tmp)
        # A warm-up round, not counted: imports, the MLflow store and the allocator settle first.
        CLOCK.start(p.batch)
        bare_loop(dataclasses.replace(p, epochs=1), seed=0)
        trainer_loop(dataclasses.replace(p, epochs=1), work / "trainer", seed=0)
        for r in range(p.rounds):
            # Alternate who goes first, so a machine getting busier or quieter favours neither.
            for name in ("bare", "trainer") if r % 2 == 0 else ("trainer", "bare"):
                CLOCK.start(p.batch)
                reset_peak(p.device)
                began = time.perf_counter()
                if name == "bare":
                    bare_loop(p, seed=r)
                else:
                    run = trainer_loop(p, work / "trainer", seed=r)
                    reported += [
                        m["step_time"] for m in read_jsonl(run / "metrics.jsonl") if "step_time" in m
                    ]
                results.setdefault(f"{name}_wall", []).append(time.perf_counter() - began)
                results.setdefault(f"{name}_gap", []).append(statistics.fmean(boundary_gaps(p)))
                results.setdefault(f"{name}_first", []).append(statistics.fmean(first_epoch_step_times(p)))
                steps = steady_step_times(p)
                results.setdefault(name, []).append(statistics.fmean(steps))
                results.setdefault(f"{name}_median", []).append(statistics.median(steps))
                results.setdefault(f"{name}_p10", []).append(statistics.quantiles(steps, n=10)[0])
                results.setdefault(f"{name}_cpu", []).append(statistics.fmean(steady_step_times(p, cpu=True)))
                mem = peak_memory_gb(p.device)
                if mem is not None:
                    memory[name].append(mem)
            ratio = results["trainer"][-1] / results["bare"][-1]
            print(f"round {r + 1}: bare {results['bare'][-1] * 1e3:.3f} ms/step, "
                  f"trainer {results['trainer'][-1] * 1e3:.3f} ms/step, ratio {ratio:.3f}", flush=True)  # fmt: skip
        times = startup(p, args.startup_rounds, work) if args.startup_rounds else None

    def ratio_of(key: str) -> list[float]:
        return [t / b for t, b in zip(results[f"trainer{key}"], results[f"bare{key}"], strict=True)]

    ratios = ratio_of("")
    print(f"\n== {args.preset} ({machine()})")
    print(f"bare loop step time    (mean per round, ms): {spread(results['bare'])}")
    print(f"Trainer step time      (mean per round, ms): {spread(results['trainer'])}")
    print(f"mean step-time ratio Trainer/bare (median over rounds): {statistics.median(ratios):.3f}  "
          f"(per round: {', '.join(f'{x:.3f}' for x in ratios)})")  # fmt: skip
    for key, what in (("median", "median step"), ("p10", "10th-percentile step, the quiet ones")):
        per_round = [t / b for t, b in zip(results[f"trainer_{key}"], results[f"bare_{key}"], strict=True)]
        print(f"{what} ratio, epoch ends and log steps left out: {statistics.median(per_round):.3f} "
              f"(per round: {', '.join(f'{x:.3f}' for x in per_round)})")  # fmt: skip
    for key, what in (
        ("_first", "first-epoch mean step"),
        ("_wall", "whole-run wall time (set-up included)"),
    ):
        values = ratio_of(key)
        print(f"{what} ratio Trainer/bare: {statistics.median(values):.3f} "
              f"(per round: {', '.join(f'{x:.3f}' for x in values)})")  # fmt: skip
    print(f"epoch-boundary gap beyond a median step (mean over epoch ends, ms): bare {spread(results['bare_gap'])}, "
          f"Trainer {spread(results['trainer_gap'])}")  # fmt: skip
    cpu = [t / b for t, b in zip(results["trainer_cpu"], results["bare_cpu"], strict=True)]
    print(f"main-thread CPU time per step (ms): bare {spread(results['bare_cpu'])}, "
          f"Trainer {spread(results['trainer_cpu'])}; ratio {statistics.median(cpu):.3f} "
          f"(per round: {', '.join(f'{x:.3f}' for x in cpu)})")  # fmt: skip
    if reported:
        print(f"Trainer's own logged step_time (ms): {spread(reported)}")
    if memory["bare"]:
        print(f"peak device memory (GB): bare {spread(memory['bare'], 1, '{:.2f}')}, "
              f"Trainer {spread(memory['trainer'], 1, '{:.2f}')}")  # fmt: skip
    if times:
        over = [t - b for t, b in zip(times["train.py"], times["bare"], strict=True)]
        print(f"time to first step (s): bare script {spread(times['bare'], 1, '{:.2f}')}, "
              f"python train.py {spread(times['train.py'], 1, '{:.2f}')}")  # fmt: skip
        print(f"train.py start-up overhead over the bare script (s): {spread(over, 1, '{:.2f}')}")
        print(f"peak RSS of the short run (GB): bare script {spread(times['bare_rss'], 1, '{:.2f}')}, "
              f"train.py {spread(times['train_rss'], 1, '{:.2f}')}")  # fmt: skip
    return 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
