"""Ray Train as a launcher: `python script/ray_train.py CONFIG [key=value ...] --workers N`.

Ray's TorchTrainer starts N worker actors, makes their process group (gloo on CPUs, NCCL on GPUs)
and calls `_worker` in each, in a thread. `_worker` runs the template's own `train_main`: it wraps
the model (DDP/FSDP2) and shards the data itself, so Ray's prepare_model/prepare_data_loader are not
used. What the worker tells the engine, by environment variable:

    TEMPLATE_RUN_KEY          one key per launch: a worker group Ray restarts before the first report
                              finds its result directory by it (the marker file of run_dir.elastic_marker)
    TEMPLATE_RESUME_COMMAND   the command the run's hints and summary print to resume it
    TEMPLATE_CPUS_PER_PROCESS the CPUs Ray gave the worker (dataloader.num_workers: auto)
    TEMPLATE_CUDA_DEVICE      the GPU Ray gave the worker, as an index into CUDA_VISIBLE_DEVICES

At each epoch's end, once the checkpoint is written, every rank calls `ray.train.report` with the
epoch's metrics and a Ray checkpoint that names the result directory (or, with
--portable-checkpoints, carries config.yaml and last.pth); a worker group restarted by
FailureConfig(max_failures) resumes that directory in place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUN_FILE = "template_run.json"  # inside a Ray checkpoint: which result directory it belongs to


def require_ray() -> Any:
    try:
        import ray
        import ray.train.torch
    except ImportError:
        from src.errors import ConfigError

        raise ConfigError('Ray Train is an optional extra: pip install -e ".[ray]"') from None
    return ray


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="script/ray_train.py",
        description="Train CONFIG on a Ray cluster (a local one by default) with N workers under DDP/FSDP2.",
    )
    parser.add_argument("config", help="experiment YAML, or result/<...>/config.yaml of a run to resume")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value settings applied last")
    parser.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    parser.add_argument(
        "--max-failures", type=int, default=0, help="restarts of the worker group after a failure (default 0)"
    )
    parser.add_argument(
        "--storage", help="Ray's storage_path for its checkpoints and state (default <output>/.ray)"
    )
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument(
        "--portable-checkpoints",
        action="store_true",
        help="Ray checkpoints carry config.yaml and last.pth (nodes without a shared output folder)",
    )
    parser.add_argument("--traceback", action="store_true", help="show Python tracebacks of errors")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str]) -> int:
    from src.run.cli import run_cli

    args = parse(argv)
    return run_cli(lambda: launch(args), args.traceback)


def launch(args: argparse.Namespace) -> int:
    """Check the config here (a bad one answers before Ray starts), then run the TorchTrainer."""
    from src.config import load_config
    from src.engine.build import preflight
    from src.errors import ConfigError, RunError
    from src.user_modules import import_user_modules

    if args.workers < 1 or args.cpus_per_worker <= 0 or args.gpus_per_worker < 0 or args.max_failures < 0:
        raise ConfigError(
            "--workers must be at least 1, --cpus-per-worker above 0, --gpus-per-worker and --max-failures "
            "at least 0"
        )
    config = Path(args.config).resolve()
    overrides = list(args.overrides)
    cfg = load_config(config, overrides)
    import_user_modules(list(cfg.imports))
    preflight(cfg)
    if str(cfg.distributed.strategy).lower() == "dp":
        raise ConfigError("distributed.strategy=dp is one process; under Ray use ddp or fsdp (or leave auto)")
    if not cfg.run_dir and not Path(str(cfg.output)).is_absolute():  # Ray runs workers in another folder
        overrides.append(f"output={Path(str(cfg.output)).resolve()}")
        cfg = load_config(config, overrides)
    ray = require_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    key = uuid.uuid4().hex[:12]
    storage = Path(args.storage or Path(str(cfg.output)) / ".ray").resolve()
    options = [f"--workers {args.workers}"]
    for flag, value, default in (("--cpus-per-worker", args.cpus_per_worker, 1.0),
                                 ("--gpus-per-worker", args.gpus_per_worker, 0.0)):  # fmt: skip
        if value != default:
            options.append(f"{flag} {value:g}")
    if args.address:
        options.append(f"--address {args.address}")
    if args.portable_checkpoints:
        options.append("--portable-checkpoints")
    resume = "python script/ray_train.py {config} " + " ".join(options)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    if args.address:
        ray.init(address=args.address, runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    else:  # a local cluster with just the resources the workers ask for (logical: Ray pins no cores)
        ray.init(
            num_cpus=max(1, round(args.workers * args.cpus_per_worker)),
            num_gpus=round(args.workers * args.gpus_per_worker) or None,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": python_path}},
        )
    backend = str(cfg.distributed.backend).lower()
    resources = {
        "CPU": args.cpus_per_worker,
        **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {}),
    }
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "config": str(config),
            "overrides": overrides,
            "key": key,
            "resume": resume,
            "cwd": os.getcwd(),
            "portable": bool(args.portable_checkpoints),
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpus_per_worker > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(
            backend=None if backend == "auto" else backend,
            timeout_s=int(cfg.distributed.timeout_minutes) * 60,
        ),
        run_config=RunConfig(
            name=f"template_{key}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray's TrainingFailedError: the worker's own error is printed above it
        raise RunError(f"Ray Train failed: {str(err).splitlines()[0]}") from None
    finally:
        ray.shutdown()
    run_dir = run_dir_of(result.checkpoint) if result.checkpoint is not None else None
    print(f"Ray Train finished: {run_dir or 'no checkpoint reported'}", flush=True)
    if run_dir is not None and (run_dir / "summary.txt").is_file():
        print((run_dir / "summary.txt").read_text(), end="", flush=True)
    return 0


def run_dir_of(checkpoint: Any) -> Path:
    """The result directory a Ray checkpoint of this launcher names."""
    with checkpoint.as_directory() as folder:
        return Path(json.loads((Path(folder) / RUN_FILE).read_text())["run_dir"])


# ---------------------------------------------------------------------- in each Ray worker
def _worker(config: dict[str, Any]) -> None:
    """One training process: the template's train_main, resumed in place when Ray restarts the group."""
    import ray
    import ray.train
    import ray.train.torch

    from src.run.main import train_main

    os.chdir(config["cwd"])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["TEMPLATE_RUN_KEY"] = config["key"]
    os.environ["TEMPLATE_RESUME_COMMAND"] = config["resume"]
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        os.environ["TEMPLATE_CPUS_PER_PROCESS"] = str(max(1, int(cpus)))
    device = ray.train.torch.get_device()
    if device.type == "cuda" and device.index is not None:
        os.environ["TEMPLATE_CUDA_DEVICE"] = str(device.index)
    config_path, overrides = config["config"], list(config["overrides"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a report: resume that result directory in place
        with checkpoint.as_directory() as folder:
            run_dir = Path(json.loads((Path(folder) / RUN_FILE).read_text())["run_dir"])
            if config["portable"] and not (run_dir / "config.yaml").is_file():
                _unpack(Path(folder), run_dir)
        config_path, overrides = str(run_dir / "config.yaml"), []
    rank = ray.train.get_context().get_world_rank()

    def report(run_dir: Path, epoch: int, metrics: dict[str, float]) -> None:
        folder = tempfile.mkdtemp(prefix="template_ckpt_") if rank == 0 else None
        try:
            ckpt = None
            if folder is not None:
                run_dir = run_dir.resolve()
                (Path(folder) / RUN_FILE).write_text(
                    json.dumps({"run_dir": str(run_dir), "epoch": epoch + 1})
                )
                if config["portable"]:
                    shutil.copy2(run_dir / "config.yaml", Path(folder) / "config.yaml")
                    shutil.copy2(run_dir / "checkpoints" / "last.pth", Path(folder) / "last.pth")
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**metrics, "epoch": epoch + 1}, checkpoint=ckpt)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    code = train_main(config_path, overrides, on_epoch_end=report)
    if code != 0:
        raise RuntimeError(f"training stopped with exit code {code}")


def _unpack(folder: Path, run_dir: Path) -> None:
    """A portable checkpoint on a node that lacks the result directory: config.yaml and last.pth back in place."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for source, target in ((folder / "last.pth", run_dir / "checkpoints" / "last.pth"),
                           (folder / "config.yaml", run_dir / "config.yaml")):  # fmt: skip
        tmp = target.with_name(
            f".{target.name}.{os.getpid()}"
        )  # every worker of the node unpacks: atomically
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
