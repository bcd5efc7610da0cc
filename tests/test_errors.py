"""Every bad input gets one clear line and the right exit code, and nothing is created or lost.

Each category (config, registry, data, checkpoints, devices and launch, training, security) has at
least one real `train.py`/`test.py` subprocess proving: exit code (2 for configuration, 1 for run
failures), one `error:` line naming the culprit and the fix, no Python traceback, and no result
directory for a refused start (or untouched checkpoints where files already existed). The many
variants of each category are checked in-process, where they are cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from src import register_builtins
from src.checkpoint.checkpointer import load_checkpoint
from src.config import load_config
from src.engine.build import preflight
from src.errors import ConfigError, RunError, did_you_mean, one_line
from src.user_modules import import_user_modules
from tests.helpers import (
    ROOT,
    TINY,
    explain,
    fill_disk,
    only_run_dir,
    read_metrics,
    result_dirs,
    run_script,
    run_shell,
    shell_env,
    small_file_system,
)

register_builtins()

DUMMY = "config/dummy.yaml"


# ---------------------------------------------------------------------- helpers
def error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one `error:` line of a refused run, after checking the exit code and the absence of a traceback."""
    assert proc.returncode == code, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, explain(proc)
    return lines[0]


def assert_words(line: str, *words: str) -> None:
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refused_in_process(tmp_path: Path, text: str, overrides: list[str]) -> str:
    """The ConfigError message for an experiment file `text` (inheriting dummy.yaml) plus overrides."""
    exp = write(tmp_path / "exp.yaml", f"__base__: {ROOT / DUMMY}\n{text}")
    with pytest.raises(ConfigError) as err:
        preflight(load_config(exp, overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run whose checkpoints the checkpoint cases read (and must leave untouched)."""
    out = tmp_path_factory.mktemp("trained")
    proc = run_script("train.py", DUMMY, f"output={out}", *TINY, "epoch=1")
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(out)


# ---------------------------------------------------------------------- config
def test_unknown_key_exits_2_with_one_line_and_no_result_dir(tmp_path):
    out = tmp_path / "out"
    line = error_line(run_script("train.py", DUMMY, f"output={out}", *TINY, "batchh=3"), 2)
    assert_words(line, "unknown key 'batchh'", "the command line", "did you mean 'batch'")
    assert not out.exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    exp = write(tmp_path / "exp.yaml", f"__base__: {ROOT / DUMMY}\nbatch: 4\nmodel: [SimpleCNN\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert_words(str(err.value), "YAML syntax error", f"{exp}:4:1", "while parsing a flow sequence at line 3")


@pytest.mark.parametrize(
    "text, overrides, words",
    [
        ("", ["optimzer.lr=0.1"], ["unknown key 'optimzer'", "'optimizer'"]),
        (
            "training:\n  gradient_clip: 1.0\n",
            [],
            ["'training.gradient_clip'", "exp.yaml", "gradient_clip_norm"],
        ),
        ("", ["epoch=ten"], ["'epoch'", "integer", "'ten'"]),
        ("", ["logging.mlflow=maybe"], ["'logging.mlflow'", "true or false"]),
        ("", ["gpu.precision=17"], ["gpu.precision", "bf16"]),
        ("", ["distributed.strategy=fdsp"], ["distributed.strategy", "fsdp"]),
        ("", ["checkpoint.mode=maximum"], ["checkpoint.mode", "min, max"]),
        ("", ["training.early_stopping.mode=up"], ["training.early_stopping.mode", "min, max"]),
        ("", ["distributed.sharding_strategy=full"], ["distributed.sharding_strategy", "full_shard"]),
        ("", ["batch=0"], ["'batch'", ">= 1", "got 0"]),
        ("", ["epoch=-3"], ["'epoch'", ">= 1"]),
        ("", ["optimizer.lr=0"], ["'optimizer.lr'", "> 0"]),
        ("", ["evaluation.frequency=-1"], ["'evaluation.frequency'", ">= 0"]),
        ("", ["logging.log_frequency=0"], ["'logging.log_frequency'", ">= 1"]),
        ("", ["checkpoint.save_frequency=-2"], ["'checkpoint.save_frequency'", ">= 0"]),
        ("", ["gpu=3"], ["'gpu'", "mapping"]),
        ("", ["model.name=3"], ["'model.name'", "string"]),
        ("", ["tag=${oops"], ["cannot resolve 'tag'", "interpolation"]),
        ("", ["tag=!!python/object/apply:os.system [ls]"], ["refused", "python/object/apply:os.system"]),
        ("", ["=3"], ["malformed override '=3'"]),
        ("", ["a.=3"], ["malformed override"]),
        ("", ["seed=[1,"], ["override 'seed=[1,'", "expected"]),
    ],
)
def test_config_error_table(tmp_path, text, overrides, words):
    assert_words(refused_in_process(tmp_path, text, overrides), *words)


def test_missing_config_and_missing_or_cyclic_base(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "__base__: b.yaml\n")
    write(tmp_path / "b.yaml", "__base__: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cyclic __base__: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "__base__: gone.yaml\n")
    with pytest.raises(
        ConfigError, match=r"__base__ 'gone.yaml' in .*c.yaml not found \(looked for .*gone.yaml\)"
    ):
        load_config(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", "__base__: 42\n")
    with pytest.raises(ConfigError, match=r"__base__ in .*d.yaml must be a file name"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    "config, overrides, words",
    [
        (DUMMY, ["training.stop_signals=[SIGKILL]"],
         ["training.stop_signals: 'SIGKILL'", "cannot be caught", "[SIGTERM, SIGINT, SIGUSR1]"]),
        (DUMMY, [f"seed={2**70}"], ["'seed' must be >= 0 and <= 4294967295", str(2**70), "the command line"]),
        (DUMMY, [f"epoch={10**20}"], ["'epoch' must be >= 1 and <= 1000000", str(10**20)]),
        (DUMMY, [f"batch={10**20}"], ["'batch' is too large", "64 bits"]),
        ("recursive.yaml", [], ["recursive YAML anchor in", "recursive.yaml", "'model.self'", "write the values out"]),
        ("empty.yaml", [], ["config file", "empty.yaml is empty", "built-in defaults", "config/dummy.yaml"]),
        ("folder", [], ["config path", "folder is a directory, not a YAML file", "folder/config.yaml"]),
    ],
)  # fmt: skip
def test_unusable_config_exits_2_in_one_line_and_writes_nothing(tmp_path, config, overrides, words):
    write(tmp_path / "recursive.yaml", "model: &m {name: SimpleCNN, self: *m}\n")
    write(tmp_path / "empty.yaml", "# nothing but a comment\n")
    write(tmp_path / "folder" / "config.yaml", "")
    before = sorted(tmp_path.rglob("*"))
    path = config if config == DUMMY else str(tmp_path / config)
    out = tmp_path / "out"
    line = error_line(run_script("train.py", path, f"output={out}", *TINY, *overrides), 2)
    assert_words(line, *words)
    assert sorted(tmp_path.rglob("*")) == before  # no result directory, nothing else


def test_component_given_by_name_and_argument_in_either_order():
    for args in (["dataset=CIFAR10", "dataset.root=/x"], ["dataset.root=/x", "dataset=CIFAR10"]):
        cfg = load_config(ROOT / DUMMY, args)
        assert (cfg.dataset.name, cfg.dataset.root) == ("CIFAR10", "/x")
        assert "train_size" not in cfg.dataset  # the synthetic set's arguments went with its name


def test_messages_stay_on_one_line_and_suggestions_are_close():
    assert one_line("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"
    assert str(ConfigError("key 'x\ny'")) == "key 'x\\ny'"
    assert "'batch'" in did_you_mean("bacth", ["batch", "epoch", "seed"])
    assert did_you_mean("zzzz", ["batch", "epoch"]) == ""


# ---------------------------------------------------------------------- registry
def test_unknown_model_name_suggests_registered_ones(tmp_path):
    out = tmp_path / "out"
    line = error_line(run_script("train.py", DUMMY, f"output={out}", *TINY, "model=ResNet18"), 2)
    assert_words(line, "unknown model 'ResNet18'", "'resnet18'", "show_registers.py")
    assert not out.exists()


def test_imports_module_that_fails_shows_its_own_error(tmp_path):
    write(tmp_path / "pkg" / "badmod.py", "import math\n\nraise ValueError('no config for the widget')\n")
    out = tmp_path / "out"
    proc = run_script(
        "train.py",
        DUMMY,
        f"output={out}",
        *TINY,
        "imports=[badmod]",
        env={"PYTHONPATH": str(tmp_path / "pkg")},
    )
    line = error_line(proc, 2)
    assert_words(line, "imports: module 'badmod'", "ValueError: no config for the widget", "badmod.py:3")
    assert not out.exists()


@pytest.mark.parametrize(
    "module, words",
    [
        ("no_such_module_xyz", ["no module named 'no_such_module_xyz'", "PYTHONPATH"]),
        ("mypkg/models.py", ["not a module name", "mypkg.models"]),
    ],
)
def test_imports_that_cannot_be_found(module, words):
    with pytest.raises(ConfigError) as err:
        import_user_modules([module])
    assert_words(str(err.value), *words)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.widht=8"], ["model 'SimpleCNN' has no argument 'widht'", "'width'", "accepts:"]),
        (["lr_scheduler=StepLR"], ["lr_scheduler 'StepLR' needs the argument(s) step_size"]),
        (["dataset=ImageFolder"], ["dataset 'ImageFolder' needs the argument(s) root"]),
        (["model.width=wide"], ["model 'SimpleCNN'", "'width' must be int", "'wide'"]),
        (["dataset.download=maybe", "dataset=CIFAR10"], ["'download' must be bool", "'maybe'"]),
        (["lr_scheduler=CosineAnnealing"], ["unknown lr_scheduler 'CosineAnnealing'", "CosineAnnealingLR"]),
        (["loss=CrossEntropy"], ["unknown loss 'CrossEntropy'", "CrossEntropyLoss"]),
        (["transform.train=[RandomFlip]"], ["unknown transform 'RandomFlip'"]),
    ],
)
def test_component_argument_errors_before_anything_is_built(tmp_path, overrides, words):
    assert_words(refused_in_process(tmp_path, "", overrides), *words)


# ---------------------------------------------------------------------- data
def test_missing_dataset_root_says_where_and_how_to_download(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "train.py",
        DUMMY,
        f"output={out}",
        "logging.mlflow=false",
        "dataset=CIFAR10",
        f"dataset.root={tmp_path / 'data'}",
    )
    line = error_line(proc, 1)
    assert_words(line, "CIFAR10", str(tmp_path / "data" / "cifar-10-batches-py"), "dataset.download=true")
    assert result_dirs(out) == [] and not (out / "CIFAR10").exists()
    # said once (no ERROR log line repeating it), and the directory printed at the start is said to be gone
    assert proc.stderr.count("dataset files not found") == 1 and "ERROR" not in proc.stderr, proc.stderr
    made = re.search(r"\| result directory: (\S+)\n", proc.stderr).group(1)
    assert f"| removed {made}: the run stopped before its first step\n" in proc.stderr


def test_model_output_size_not_matching_the_classes(tmp_path):
    out = tmp_path / "out"
    line = error_line(run_script("train.py", DUMMY, f"output={out}", *TINY, "model.num_classes=4"), 2)
    assert_words(line, "outputs 4 classes", "has 10", "model.num_classes=10")
    assert result_dirs(out) == []


def test_model_that_cannot_take_the_inputs():
    from src.data import build_dataset
    from src.models.build import build_model, check_output_size

    cfg = load_config(ROOT / DUMMY, ["dataset.input_shape=[1,16,16]"])
    dataset = build_dataset(cfg.dataset, split="val", transform=None)
    with pytest.raises(ConfigError) as err:
        check_output_size(
            build_model(cfg.model, 10), dataset, 10, torch.device("cpu"), cfg.model.name, cfg.dataset.name
        )
    assert_words(str(err.value), "cannot take the inputs", "(1, 16, 16)", "3 channels")


def test_empty_dataset_and_missing_image_folder():
    from src.data import build_dataset
    from src.distributed.process_group import DistContext
    from src.engine.build import build_split

    cfg = load_config(ROOT / DUMMY, ["dataset.train_size=0"])
    with pytest.raises(RunError, match="no samples in its train split"):
        build_split(cfg, "train", DistContext("none", torch.device("cpu")), shuffle=True, transforms={})
    with pytest.raises(RunError, match=r"dataset.root '.*nowhere' does not exist \(expected root/"):
        build_dataset({"name": "ImageFolder", "root": "/nowhere"}, split="train", transform=None)


# ---------------------------------------------------------------------- checkpoints
def test_resume_from_together_with_in_place_resume(trained):
    before = {p.name: digest(p) for p in (trained / "checkpoints").glob("*.pth")}
    runs = result_dirs(trained.parents[1])
    proc = run_script(
        "train.py", str(trained / "config.yaml"), f"checkpoint.resume_from={trained}/checkpoints/last.pth"
    )
    assert_words(error_line(proc, 2), "checkpoint.resume_from", "in place", "both")
    assert {p.name: digest(p) for p in (trained / "checkpoints").glob("*.pth")} == before
    assert result_dirs(trained.parents[1]) == runs


def test_checkpoint_of_another_model_summarises_the_mismatch(trained, tmp_path):
    source = trained / "checkpoints" / "last.pth"
    before = digest(source)
    out = tmp_path / "out"
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *TINY, f"checkpoint.resume_from={source}", "model.width=8"
    )
    line = error_line(proc, 1)
    assert_words(line, "does not fit model 'SimpleCNN'", "shape mismatch", "(16, 3, 3, 3) vs (8, 3, 3, 3)")
    assert digest(source) == before
    assert result_dirs(out) == []


def test_truncated_resume_from_file(trained, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes((trained / "checkpoints" / "last.pth").read_bytes()[:50_000])
    out = tmp_path / "out"
    proc = run_script("train.py", DUMMY, f"output={out}", *TINY, f"checkpoint.resume_from={bad}")
    assert_words(error_line(proc, 1), str(bad), "corrupt or truncated", "previous.pth")
    assert not out.exists()
    assert bad.stat().st_size == 50_000


def test_corrupt_checkpoint_file(tmp_path):
    bad = tmp_path / "noise.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(RunError, match=r"noise.pth is corrupt or truncated"):
        load_checkpoint(bad)


def test_test_py_with_a_damaged_checkpoint_leaves_the_run_alone(trained, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes((trained / "checkpoints" / "best.pth").read_bytes()[:1000])
    before = {p.name: digest(p) for p in (trained / "checkpoints").glob("*.pth")}
    proc = run_script("test.py", str(trained / "config.yaml"), "--checkpoint", str(bad))
    assert_words(error_line(proc, 1), str(bad), "corrupt or truncated")
    assert {p.name: digest(p) for p in (trained / "checkpoints").glob("*.pth")} == before


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(RunError, match=r"checkpoint not found: .*gone.pth \(the folder .* does not exist"):
        load_checkpoint(tmp_path / "nowhere" / "gone.pth")
    with pytest.raises(RunError, match=r"checkpoint not found: .*gone.pth$"):
        load_checkpoint(tmp_path / "gone.pth")


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(RunError, match="not a checkpoint of this template"):
        load_checkpoint(tmp_path / "foreign.pth")


# ---------------------------------------------------------------------- security
class _Payload:
    """Pickles to a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(RunError, match=r"refused: it holds a Python object \(\S*system\).*could run code"):
        load_checkpoint(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file is a working exploit: an unsafe load runs it
    assert marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    exp = write(
        tmp_path / "exp.yaml",
        f"__base__: {ROOT / DUMMY}\ntag: !!python/object/apply:os.system ['touch {marker}']\n",
    )
    out = tmp_path / "out"
    line = error_line(run_script("train.py", str(exp), f"output={out}"), 2)
    assert_words(line, "unsafe YAML", f"{exp}:2", "python/object/apply:os.system", "refused")
    assert not marker.exists() and not out.exists()


def test_config_values_are_never_code(tmp_path):
    marker = tmp_path / "PWNED"
    text = f"__import__('os').system('touch {marker}')"
    cfg = load_config(ROOT / DUMMY, [f"tag={text}", "model.width=__import__('os').getpid()"])
    assert cfg.tag == text and cfg.model.width == "__import__('os').getpid()"
    with pytest.raises(ConfigError, match="'width' must be int"):
        preflight(cfg)
    assert not marker.exists()


def test_mlflow_ui_script_binds_to_localhost_unless_told(tmp_path):
    fake = write(tmp_path / "bin" / "mlflow", '#!/bin/sh\necho "mlflow $*"\n')
    fake.chmod(0o755)
    write(tmp_path / "result" / "mlflow.db", "")
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HOST", None)
    script = str(ROOT / "script" / "run_mlflow.sh")
    default = subprocess.run(
        ["bash", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert default.returncode == 0, default.stderr
    assert "--host 127.0.0.1" in default.stdout
    told = subprocess.run(
        ["bash", script],
        cwd=tmp_path,
        env={**env, "HOST": "0.0.0.0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "--host 0.0.0.0" in told.stdout


# ---------------------------------------------------------------------- devices and launch
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path):
    out = tmp_path / "out"
    line = error_line(run_script("train.py", DUMMY, f"output={out}", *TINY, "gpu.device=cuda"), 2)
    assert_words(line, "gpu.device=cuda", "CUDA is not available", "gpu.device=cpu")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_id_out_of_range(tmp_path):
    count = torch.cuda.device_count()
    out = tmp_path / "out"
    line = error_line(run_script("train.py", DUMMY, f"output={out}", *TINY, f"gpu.use={count}"), 2)
    assert_words(line, f"gpu.use id {count} is out of range", f"{count} CUDA device(s)")
    assert not out.exists()


def test_ddp_without_torchrun(monkeypatch):
    from src.distributed.process_group import setup

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"distributed.strategy=ddp needs torchrun: ./torchrun.sh"):
        cfg = load_config(ROOT / DUMMY, ["distributed.strategy=ddp", "gpu.device=cpu"])
        setup(cfg.distributed, cfg.gpu)


def test_result_root_not_writable(tmp_path):
    blocker = write(tmp_path / "afile", "a regular file where a folder should be\n")
    proc = run_script("train.py", DUMMY, f"output={blocker}/sub", *TINY)
    assert_words(error_line(proc, 2), f"output '{blocker}/sub' is not writable", "output=")
    assert blocker.read_text() == "a regular file where a folder should be\n"


def test_traceback_switch_shows_the_traceback(tmp_path):
    out = tmp_path / "out"
    proc = run_script("train.py", DUMMY, f"output={out}", "epoch=1", "--traceback", "batchh=1")
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" in proc.stderr and "src.errors.ConfigError" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "error: unknown key 'batchh' in the command line (did you mean 'batch'?)"
    )


def test_traceback_environment_switch(monkeypatch, capsys):
    from src.run.cli import run_cli

    def refuse() -> int:
        raise RunError("the widget broke; fix the widget")

    monkeypatch.delenv("TEMPLATE_TRACEBACK", raising=False)
    assert run_cli(refuse, show_traceback=False) == 1
    assert capsys.readouterr().err == "error: the widget broke; fix the widget\n"
    monkeypatch.setenv("TEMPLATE_TRACEBACK", "1")
    assert run_cli(refuse, show_traceback=False) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: the widget broke; fix the widget\n")


# ---------------------------------------------------------------------- a full disk outside a checkpoint save
def test_full_disk_at_start_up_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "small"
    with small_file_system(out, "64k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a tmpfs")
        fill_disk(out / "filler")
        proc = run_script("train.py", DUMMY, f"output={out}", *TINY)
        left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    line = error_line(proc, 1)
    assert_words(line, "cannot write", "config.yaml: no space left on the device (it needs about ",
                 " KB, 0.0 KB free); free some space, then run the same command again")  # fmt: skip
    assert left == ["filler"]  # no result directory, no config.yaml.tmp


def test_full_disk_at_start_up_under_torchrun_leaves_no_result_directory(tmp_path):
    out = tmp_path / "small"
    with small_file_system(out, "64k") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a tmpfs")
        fill_disk(out / "filler")
        proc = run_shell(
            f"./torchrun.sh 2 train.py {DUMMY} output={out} {' '.join(TINY)}", env=shell_env(tmp_path)
        )
        left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert proc.returncode != 0, explain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, explain(proc)
    assert_words(lines[0], "cannot write", "no space left on the device", "then run the same command again")
    assert left == [".elastic", "filler"]  # an empty folder of torchrun markers; no run, no temporary file


FILLS_AT_TEST = """
import os

from src.data.datasets import SyntheticClassification
from src.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class FillsDiskAtTest(SyntheticClassification):
    \"\"\"The synthetic set; building its test split first fills the file system holding $FILL_AT_TEST.\"\"\"

    def __init__(self, split, **kwargs):
        super().__init__(split=split, **kwargs)
        if split == "test" and os.environ.get("FILL_AT_TEST"):
            from tests.helpers import fill_disk

            fill_disk(os.environ["FILL_AT_TEST"])
"""


def test_full_disk_while_writing_the_test_results_is_one_line_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "small"
    write(tmp_path / "pkg" / "fills.py", FILLS_AT_TEST)
    env = {"PYTHONPATH": f"{tmp_path / 'pkg'}{os.pathsep}{ROOT}"}
    with small_file_system(out, "2m") as mounted:
        if not mounted:
            pytest.skip("needs root to mount a tmpfs")
        proc = run_script("train.py", DUMMY, f"output={out}", *TINY, "epoch=1", "imports=[fills]",
                          "dataset.name=FillsDiskAtTest", env={**env, "FILL_AT_TEST": str(out / "filler")})  # fmt: skip
        run = only_run_dir(out)
        left = sorted(p.name for p in run.iterdir())
        tested_alone = run_script("test.py", str(run / "config.yaml"), env=env)  # still full
        (out / "filler").unlink()  # room again: the same command only tests
        again = run_script("train.py", str(run / "config.yaml"), env=env)
        tested = sorted(p.name for p in (run / "test").iterdir()) if (run / "test").is_dir() else []
    line = error_line(proc, 1)
    assert_words(line, f"cannot write {run}/test/ (metrics.json, classification_report.txt, confusion_matrix.png",
                 "no space left on the device (it needs about 0.", " MB, 0.0 KB free); free some space",
                 f"then finish the test with: python train.py {run}/config.yaml")  # fmt: skip
    assert proc.stderr.count("Traceback") == 0 and "Logging error" not in proc.stderr
    half = [n for n in left if n.startswith(".") and n != ".lock"]  # .lock: the run's lock file
    assert "test" not in left and not half, left  # nothing half-written
    assert_words(error_line(tested_alone, 1), f"cannot write {run}/test/", "no space left on the device")
    assert again.returncode == 0, explain(again)
    assert tested == ["classification_report.txt", "confusion_matrix.png", "confusion_matrix_normalized.png",
                      "metrics.json"]  # fmt: skip


def test_full_disk_under_torchrun_names_the_torchrun_command_to_resume_with(tmp_path):
    """`python train.py` would be refused for a 2-process run: the line names the launcher it ran under."""
    out = tmp_path / "small"
    with small_file_system(out, "560k") as mounted:  # room for one checkpoint of about 0.30 MB, not two
        if not mounted:
            pytest.skip("needs root to mount a tmpfs")
        proc = run_shell(
            f"./torchrun.sh 2 train.py {DUMMY} output={out} logging.mlflow=false logging.tensorboard=false "
            "epoch=2 batch=16 dataset.train_size=32 dataset.val_size=16 dataset.test_size=16",
            env=shell_env(tmp_path),
            timeout=300,
        )
        run = only_run_dir(out)
    assert proc.returncode != 0, explain(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, explain(proc)
    assert_words(lines[0], "cannot save checkpoint", "no space left on the device (it needs about 0.",
                 f"free some space, then resume with: ./torchrun.sh 2 train.py {run}/config.yaml")  # fmt: skip
    assert "python train.py" not in lines[0]


# ---------------------------------------------------------------------- training: non-finite losses
NAN_MODULE = '''
"""A linear classifier whose training output turns NaN on chosen forward calls (counted from 1)."""
import torch
from torch import nn

from src.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class NanOnCalls(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 768, nan_calls: list = ()):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                out = out * float("nan")
        return out
'''


def _nan_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    write(tmp_path / "pkg" / "nanmodel.py", NAN_MODULE)
    out = tmp_path / "out"
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *TINY, "imports=[nanmodel]", "model=NanOnCalls", *args,
        env={"PYTHONPATH": str(tmp_path / "pkg")},
    )  # fmt: skip
    return proc, out


@pytest.mark.slow
def test_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_marks_it_failed(tmp_path):
    # 4 steps an epoch; step 5 (epoch 2) goes NaN. A checkpoint is due after every step, so the
    # NaN is caught there, before its weights could replace last.pth.
    proc, out = _nan_run(
        tmp_path,
        "model.nan_calls=[5]",
        "checkpoint.save_every_n_steps=1",
        "logging.log_frequency=50",
        "logging.mlflow=true",
    )
    line = error_line(proc, 1)
    assert_words(
        line, "training loss became nan", "epoch 2, step 5", "last good checkpoint", "nan_policy=skip"
    )
    run = only_run_dir(out)
    last = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert last["progress"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert "FAILED" in (run / "train.log").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.status for r in client.search_runs(experiments)] == ["FAILED"]


def test_nan_policy_skip_skips_the_step_and_finishes(tmp_path):
    proc, out = _nan_run(tmp_path, "model.nan_calls=[2,6]", "training.nan_policy=skip")
    assert proc.returncode == 0, explain(proc)
    run = only_run_dir(out)
    log = (run / "train.log").read_text()
    assert log.count("non-finite loss") == 2 and "step skipped" in log
    last = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert last["progress"]["global_step"] == 8 - 2  # two epochs of 4 steps, two skipped
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert (run / "test" / "metrics.json").is_file()


def test_nan_policy_skip_drops_only_the_bad_step_from_the_logged_losses(tmp_path):
    # 4 batches, logged every 2 steps; the 4th batch is NaN. Steps 1-2 are logged at step 2; the
    # good step 3 shares its logging window with the skipped one and must still be counted.
    proc, out = _nan_run(
        tmp_path, "model.nan_calls=[4]", "training.nan_policy=skip", "logging.log_frequency=2", "epoch=1"
    )
    assert proc.returncode == 0, explain(proc)
    events = read_metrics(only_run_dir(out))
    train = {e["step"]: e["train_loss"] for e in events if "train_loss" in e}
    assert sorted(train) == [2, 3]  # step 3 is the epoch's last, partial window
    epoch_loss = next(e["train_epoch_loss"] for e in events if "train_epoch_loss" in e)
    assert epoch_loss == pytest.approx((2 * train[2] + train[3]) / 3, rel=1e-6)  # 16 samples a step


def test_huge_learning_rate_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "train.py", DUMMY, f"output={out}", *TINY, "optimizer.lr=1e30", "logging.log_frequency=1"
    )
    assert_words(error_line(proc, 1), "training loss became", "epoch 1, step", "lower optimizer.lr")
    assert "FAILED" in (only_run_dir(out) / "train.log").read_text()
