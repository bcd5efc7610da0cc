"""Where a run lives: a new timestamped result directory, or the one being resumed in place."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.config.sections import flatten, to_plain
from src.errors import ConfigError

# Settings that may change when a run is resumed: they do not alter what the run computes.
# (dataloader.drop_last is not among them: it changes the batches of every epoch; nor are
# checkpoint.monitor and checkpoint.mode: the stored best would be compared with another metric.)
HARMLESS_ON_RESUME = (
    "epoch", "debug", "logging.", "evaluation.", "profiling.", "checkpoint.save_", "dataloader.num_workers",
    "dataloader.pin_memory", "dataloader.persistent_workers", "dataloader.prefetch_factor",
    "checkpoint.allow_config_change", "checkpoint.allow_restart", "training.early_stopping.",
    "training.stop_signals", "training.nan_policy", "distributed.timeout_minutes", "distributed.backend",
    "gpu.use", "gpu.device", "run_dir",
)  # fmt: skip


def run_dir_of(config_path: Path) -> Path:
    """The folder of a run's config.yaml, spelled as the user gave it (relative stays relative).

    A run started with output=result prints result/...; its resume prints the same, not an absolute path.
    """
    folder = config_path.resolve().parent
    if config_path.is_absolute():
        return folder
    try:
        relative = folder.relative_to(Path.cwd().resolve())
    except ValueError:
        return folder
    return relative if relative.parts else folder


def new_run_dir(cfg: DictConfig) -> Path:
    """result/<dataset>/<YYYYMMDD_HHMMSS>_<model>[_<tag>][_fold<k>][_debug]/, made unique if two runs start in
    one second. `_debug` marks a debug=true smoke test, which aggregate_results.py leaves out."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    name = f"{stamp}_{_slug(cfg.model.name)}" + (f"_{_slug(cfg.tag)}" if cfg.tag else "")
    if cfg.dataset.get("fold") is not None:  # a cross-validation fold (ImageFolder with splits/)
        name += f"_fold{_slug(cfg.dataset.fold)}"
    if cfg.get("debug"):
        name += "_debug"
    parent = Path(cfg.output) / _slug(cfg.dataset.name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"output '{cfg.output}' is not writable ({err.strerror}); set output=<a writable folder>"
        ) from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output '{cfg.output}' is not writable; set output=<a writable folder>")
    for i in range(1000):
        path = parent / (name if i == 0 else f"{name}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a result directory under {parent}")


def _slug(text: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)) or "run"


def save_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The complete config, with `run_dir` set so that running the file resumes this run.

    `checkpoint.allow_restart` is a one-time permission: saved as false, so a later resume that
    finds no checkpoint asks again.
    """
    cfg = OmegaConf.merge(cfg, {"run_dir": str(run_dir), "checkpoint": {"allow_restart": False}})
    header = (
        "# Complete configuration of this run; every default is written out.\n"
        f"# Resume or extend it:  {resume_command(run_dir)} [epoch=N]\n"
        f"# Evaluate it:          python test.py {run_dir}/config.yaml\n"
    )
    from src.results.atomic_files import atomic_write

    path = run_dir / "config.yaml"
    atomic_write(path, header + OmegaConf.to_yaml(cfg, resolve=True))  # a full disk leaves no config.yaml.tmp
    return path


def resume_command(run_dir: Path | str) -> str:
    """The command that continues this run under the launcher it runs under (read from torchrun's
    environment): `python train.py ...`, `./torchrun.sh N train.py ...` or `./multinode.sh ...`."""
    config = f"{run_dir}/config.yaml"
    if os.environ.get("TEMPLATE_RESUME_COMMAND"):  # another launcher (Ray Train) says how it resumes
        return os.environ["TEMPLATE_RESUME_COMMAND"].replace("{config}", config)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return f"python train.py {config}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    if per_node >= world:
        return f"./torchrun.sh {world} train.py {config}"
    nodes = -(-world // per_node)
    return f"./multinode.sh {nodes} {per_node} <job-id> <node-rank> <host:port> train.py {config}"


def config_changes(saved: DictConfig, current: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every leaf that differs."""
    a = flatten(to_plain(saved))
    b = flatten(to_plain(current))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def refuse_harmful_changes(changes: list[tuple[str, Any, Any]], allowed: bool) -> list[tuple[str, Any, Any]]:
    """Changes that would silently alter a resumed run are an error unless explicitly allowed."""
    harmful = [c for c in changes if not c[0].startswith(HARMLESS_ON_RESUME)]
    if harmful and not allowed:
        key, old, new = harmful[0]
        more = (
            f" (and {len(harmful) - 1} more: {', '.join(c[0] for c in harmful[1:4])})"
            if len(harmful) > 1
            else ""
        )
        raise ConfigError(
            f"resuming with '{key}' changed from {old!r} to {new!r}{more} would silently change the run; "
            "drop the override, or add checkpoint.allow_config_change=true to accept it"
        )
    return harmful


def elastic_marker(cfg: DictConfig) -> Path | None:
    """Under torchrun (or Ray Train, which passes TEMPLATE_RUN_KEY), a file naming this job's result
    directory, so a restarted worker finds it.

    torchrun's default rendezvous id is the literal "none", shared by unrelated jobs; then the key
    is the torchrun agent (host and pid), which stays the same across its restarts of the workers.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("TEMPLATE_RUN_KEY")
    if not run_id:
        return None
    if run_id == "none":
        import socket

        run_id = f"none-{socket.gethostname()}-{os.getppid()}"
    return Path(cfg.output) / ".elastic" / f"{_slug(run_id)}.txt"
