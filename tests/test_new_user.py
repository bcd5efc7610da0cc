"""What a new user trips over (issue 15): each check runs the real scripts, as a user would."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest

from tests.helpers import (
    ROOT,
    TINY,
    explain,
    read_metrics,
    result_dirs,
    run_in_terminal,
    run_script,
    run_shell,
    shell_env,
    small_file_system,
)

DUMMY = str(ROOT / "config" / "dummy.yaml")
NO_TRACKERS = ["logging.mlflow=false", "logging.tensorboard=false"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def imported_torch(stderr: str) -> bool:
    """Whether PYTHONPROFILEIMPORTTIME's report (in stderr) lists torch."""
    return bool(re.search(r"^import time:.*\|\s+torch$", stderr, re.M))


# ---------------------------------------------------------------------- 1. the class count
NO_COUNT_DATASET = """\
import torch
from src import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class NoCountData(torch.utils.data.Dataset):
    '''Items of three classes, but nothing says there are three.'''

    def __init__(self, split, transform=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (16,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
"""


def test_a_dataset_without_a_class_count_stops_with_exit_2_and_leaves_nothing(tmp_path):
    (tmp_path / "no_count_data.py").write_text(NO_COUNT_DATASET)
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    proc = run_script(
        "train.py", DUMMY, f"output={out}", "imports=[no_count_data]", "dataset=NoCountData", "epoch=1",
        "batch=8", "logging.tensorboard=false", f"logging.mlflow_tracking_uri=sqlite:///{store}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, explain(proc)
    last = error_lines(proc.stderr)[-1]
    assert last.startswith("error: dataset 'NoCountData' does not say how many classes it has"), last
    assert "model.num_classes=<n>" in last and "Traceback" not in proc.stderr
    assert result_dirs(out) == [] and not any(out.rglob("*")), list(out.rglob("*"))
    assert not store.exists()  # no MLflow run either
    assert "checkpoints kept in" not in proc.stderr


# ---------------------------------------------------------------------- 4. test.py's input
def test_test_py_checks_its_input_before_importing_torch(tmp_path):
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    plain = run_script("test.py", "config/dummy.yaml", env=env)
    assert plain.returncode == 2, explain(plain)
    assert "--checkpoint" in error_lines(plain.stderr)[-1] and not imported_torch(plain.stderr)
    missing = run_script("test.py", "config/dummy.yaml", "--checkpoint", str(tmp_path / "bets.pth"), env=env)
    assert missing.returncode == 2 and not imported_torch(missing.stderr), explain(missing)
    assert error_lines(missing.stderr)[-1] == f"error: --checkpoint {tmp_path / 'bets.pth'}: no such file"
    helped = run_script("test.py", "--help")
    assert "--checkpoint" in helped.stdout and "experiment YAML together with" in " ".join(
        helped.stdout.split()
    )


# ---------------------------------------------------------------------- 5. show_registers.py
def test_show_registers_unknown_registry_is_one_line_and_exit_2():
    proc = run_script("script/show_registers.py", "modle")
    assert proc.returncode == 2 and proc.stdout == "", explain(proc)
    assert error_lines(proc.stderr) == [
        "error: no registry 'modle' (did you mean 'model'?); choose one of: dataset, evaluator, loss, "
        "lr_scheduler, model, optimizer, transform"
    ]


# ---------------------------------------------------------------------- 6. errors under the launchers
def test_a_config_error_under_the_launchers_is_one_line_and_exit_2(tmp_path):
    env = shell_env(tmp_path)
    for command in (
        "./torchrun.sh 2 train.py config/dummy.yaml batch=abc",
        "./multinode.sh 1 2 job1 0 127.0.0.1:29400 train.py config/dummy.yaml batch=abc",
        "./torchrun.sh 2 train.py config/dumy.yaml",
    ):
        proc = run_shell(command, env=env, timeout=120)
        assert proc.returncode == 2, explain(proc)
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, proc.stderr)
    assert "did you mean 'dummy.yaml'" in lines[0]


@pytest.mark.slow
def test_a_component_error_in_the_workers_ends_torchrun_with_exit_2_and_no_traceback(tmp_path):
    """Found only once the registries load (in the workers): their lines, exit 2, no torchrun report."""
    proc = run_shell("./torchrun.sh 2 train.py config/dummy.yaml optimizer.lrr=1", env=shell_env(tmp_path))
    assert proc.returncode == 2, explain(proc)
    assert "error: optimizer 'AdamW' has no argument 'lrr' (did you mean 'lr'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


# ---------------------------------------------------------------------- 3. the confusion matrix picture
def test_confusion_matrix_picture_is_readable():
    import torch

    from src.engine.tester import confusion_figure

    matrix = torch.tensor([[50, 2, 0], [3, 40, 7], [0, 1, 60]])
    fig = confusion_figure(matrix, ["cat", "dog", "bird"], "run_x: test split, accuracy 0.8947")
    ax = fig.axes[0]
    assert ax.get_title() == "run_x: test split, accuracy 0.8947"
    assert len(fig.axes) == 2  # the colour bar
    colours = {t.get_text(): t.get_color() for t in ax.texts}
    assert colours["60"] == "white" and colours["50"] == "white"  # dark cells
    assert colours["0"] == "black" and colours["2"] == "black"  # light cells
    shares = confusion_figure(matrix, ["cat", "dog", "bird"], "t", normalize=True)
    assert sorted(t.get_text() for t in shares.axes[0].texts)[-1] == "0.98"  # 60 / 61, row-normalised
    many = confusion_figure(torch.randint(0, 9, (120, 120)), [f"class_{i}" for i in range(120)], "many")
    labels = [t for t in many.axes[0].get_xticklabels() if t.get_text()]
    assert len(labels) <= 40 and not many.axes[0].texts  # a label per 3 classes, no cell numbers

    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------- 8. console details in-process
def test_f1_of_perfect_predictions_is_exactly_one():
    import torch

    from src import EVALUATOR_REGISTRY

    targets = torch.tensor([1, 1, 0, 4, 4, 5, 2])  # float32 weighting gave 1.0000001 here
    ev = EVALUATOR_REGISTRY.build(
        {"name": "classification_evaluator", "num_classes": 6, "average": "weighted"}, metrics=["f1_score"]
    )
    ev.update(torch.nn.functional.one_hot(targets, 6).float(), targets)
    assert ev.compute()["f1_score"] == 1.0


def test_an_epochs_one_step_window_is_timed_with_the_next():
    from src.engine.throughput import RateWindow

    rates = RateWindow(log_every=5)
    full = {"train_loss": 1.0, "samples_per_sec": 100.0, "step_time": 0.16, "data_wait_share": 0.0}
    assert rates.settle(dict(full), 5, short_ok=True)["samples_per_sec"] == pytest.approx(100.0)
    short = {"train_loss": 0.9, "samples_per_sec": 3900.0, "step_time": 0.004, "data_wait_share": 0.5}
    held = rates.settle(dict(short), 1, short_ok=False)
    assert held == {"train_loss": 0.9}  # one step alone says nothing about throughput
    merged = rates.settle(dict(full), 5, short_ok=True)
    assert list(merged) == list(full)  # same keys, same order
    assert merged["samples_per_sec"] == pytest.approx((100 * 0.8 + 3900 * 0.004) / 0.804)


def test_missing_config_file_suggests_the_near_one_and_overrides_are_optional():
    proc = run_script("train.py", "config/dumy.yaml")
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: config file not found: config/dumy.yaml (did you mean 'dummy.yaml'")
    bare = run_script("train.py")
    assert (
        bare.returncode == 2
        and "required: config" in bare.stderr
        and "overrides" not in bare.stderr.split("required:")[1]
    )


# ---------------------------------------------------------------------- a run on a terminal, then resumed
@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory):
    """A first run (MLflow on) on a 0x0 terminal with output=out (relative), then resumed through a pipe."""
    if not sys.platform.startswith("linux"):
        pytest.skip("pseudo-terminals as on Linux")
    work = tmp_path_factory.mktemp("terminal")
    small = ["epoch=2", "batch=16", "dataset.train_size=16", "dataset.val_size=16", "dataset.test_size=16",
             "logging.tensorboard=false", "logging.progress_bar=true"]  # fmt: skip
    argv = [sys.executable, str(ROOT / "train.py"), DUMMY, "output=out", *small]
    text = run_in_terminal(argv, rows=0, cols=0, cwd=work)  # 0x0, as some CI terminals report
    run = result_dirs(work / "out")[0]
    first_metrics = read_metrics(run)
    resumed = run_script(
        "train.py", str(run.relative_to(work) / "config.yaml"), "epoch=3", "logging.mlflow=false", cwd=work
    )
    return work, run, text, first_metrics, resumed


def test_a_terminal_gets_colour_and_a_bar_even_at_size_0x0_and_the_log_file_stays_plain(terminal_run):
    _, run, text, _, _ = terminal_run
    assert re.search(r"\repoch 1/2: +\d+%\|", text), text[-3000:]  # a bar of 80 columns, not none
    assert "\x1b[36m" in text and "\x1b[33mepoch 1\x1b[0m" in text  # cyan time, yellow epoch
    assert re.search(r"\x1b\[35mval_accuracy\x1b\[0m=\x1b\[33m[\d.]+", text)  # magenta val, yellow value
    log = (run / "train.log").read_text()
    assert "\x1b" not in log and "| INFO | epoch 1 step 1: train_loss=" in log


def test_console_lines_read_plainly(terminal_run):
    _, _, text, first_metrics, _ = terminal_run
    assert "fp32 precision" in text and "1 step per epoch, 2 epochs" in text
    assert "mlflow.store" not in text and "Creating initial MLflow database" not in text
    # one step per epoch, logged every 5: epoch 1's lone step is timed together with epoch 2's
    ends = [e for e in first_metrics if "train_epoch_loss" in e]
    assert [e["epoch"] for e in ends] == [1, 2]
    assert "samples_per_sec" not in ends[0] and ends[1]["samples_per_sec"] > 0


def test_a_resumed_run_prints_paths_as_the_first_run_did_and_pipes_get_no_colour(terminal_run):
    work, run, _, _, resumed = terminal_run
    assert resumed.returncode == 0, explain(resumed)
    relative = run.relative_to(work)
    assert f"| result directory: {relative}\n" in resumed.stderr
    assert f"resume:     python train.py {relative}/config.yaml" in resumed.stderr
    assert str(work) not in resumed.stderr and "\x1b" not in resumed.stderr


def test_test_py_evaluates_any_checkpoint_with_an_experiment_config(terminal_run):
    _, run, _, _, _ = terminal_run
    checkpoint = run / "checkpoints" / "last.pth"
    small = ["batch=16", "dataset.test_size=16", "logging.mlflow=false"]
    proc = run_script("test.py", DUMMY, "--checkpoint", str(checkpoint), *small)
    assert proc.returncode == 0, explain(proc)
    out = run / "checkpoints" / "test_last"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1
    assert (out / "confusion_matrix.png").is_file() and (out / "confusion_matrix_normalized.png").is_file()


# ---------------------------------------------------------------------- 2. aggregate_results.py
def test_aggregate_results_counts_epochs_trained_and_fits_a_terminal(terminal_run, tmp_path):
    _, run, _, _, resumed = terminal_run
    assert resumed.returncode == 0
    root = tmp_path / "result"
    for i, lr in enumerate(["0.003", "0.001", "0.0003"]):  # three runs that differ in several settings
        copy = root / "SyntheticClassification" / f"{run.name}_{i}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
        config = (copy / "config.yaml").read_text().replace("lr: 0.003", f"lr: {lr}")
        (copy / "config.yaml").write_text(config.replace("seed: 42", f"seed: {i}"))
    tested = json.loads(
        [line for line in (run / "metrics.jsonl").read_text().splitlines() if "test_" in line][-1]
    )
    proc = run_script("script/aggregate_results.py", "--root", str(root))
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 120, proc.stdout
    header = lines[0].split()
    row = dict(zip(header, lines[1].split(), strict=True))
    assert row["epochs_done"] == "3", (row, tested["epoch"])  # 3 trained, whatever epoch the test used
    assert "test_accuracy" in header and "optimizer.lr" in header
    assert len((root / "results.md").read_text().splitlines()[0].split(" | ")) > len(header)
    chosen = run_script("script/aggregate_results.py", "--root", str(root), "--columns", "run,test_loss")
    assert chosen.stdout.splitlines()[0].split() == ["run", "test_loss"]
    bad = run_script("script/aggregate_results.py", "--root", str(root), "--columns", "run,test_los")
    assert bad.returncode == 2 and "did you mean 'test_loss'" in bad.stderr


# ---------------------------------------------------------------------- 7. the README's FSDP example
@pytest.mark.slow
def test_the_readme_fsdp_example_shards_blocks_and_says_which(tmp_path):
    proc = run_shell(
        f"./torchrun.sh 2 train.py config/advanced.yaml epoch=1 distributed.strategy=fsdp output={tmp_path} "
        + " ".join(
            [
                *TINY[:2],
                "batch=8",
                "dataset.train_size=32",
                "dataset.val_size=16",
                "dataset.test_size=16",
                "training.accumulate_grad_batches=1",
            ]
        ),
        env=shell_env(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, explain(proc)
    line = re.search(r"FSDP2: .*", proc.stderr).group(0)
    assert line.startswith("FSDP2: 2 block(s) sharded (full_shard), mesh (2,): features.4 (Conv2d, 18,432), "
                           "features.8 (Conv2d, 73,728)"), line  # fmt: skip
    assert "distributed.fsdp_min_params=10000" in line


# ---------------------------------------------------------------------- 10. a full disk while saving
def test_a_full_disk_while_saving_is_one_line_exit_1_and_no_partial_file(tmp_path):
    """On an 800 KB tmpfs (as root: the epoch-1 save, last.pth and its best.pth copy, fits) the epoch-2 save
    finds the disk full; elsewhere a file size limit
    (RLIMIT_FSIZE, the kernel's EFBIG) makes the first save fail the same way: real failed writes."""
    out = tmp_path / "small"
    args = ["train.py", DUMMY, f"output={out}", *NO_TRACKERS, "epoch=2", "batch=16", "dataset.train_size=32",
            "dataset.val_size=16", "dataset.test_size=16"]  # fmt: skip
    with small_file_system(out, "800k") as mounted:
        if mounted:
            proc = run_script(*args)
        else:
            limit = 200_000  # a checkpoint is about 320 KB; the config, log and metrics are a few KB
            proc = subprocess.run(
                [sys.executable, *[str(ROOT / args[0]), *args[1:]]], cwd=ROOT, capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
            )  # fmt: skip
        run = result_dirs(out)[0]
        leftovers = sorted(p.name for p in (run / "checkpoints").glob(".*"))
        log = (run / "train.log").read_text()
        last_epoch = None
        if mounted:
            import torch

            last_epoch = torch.load(run / "checkpoints/last.pth", weights_only=True)["progress"]["epoch"]
    assert proc.returncode == 1, explain(proc)
    assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr
    line = error_lines(proc.stderr)[-1]
    assert re.match(r"error: cannot save checkpoint best\.pth, last\.pth in \S+/checkpoints: ", line), line
    why = "no space left on the device" if mounted else "the file size limit (ulimit -f) was reached"
    assert re.search(
        why.replace("(", r"\(").replace(")", r"\)") + r" \(it needs about [\d.]+ MB, [\d.]+ MB free\)", line
    )
    assert f"then resume with: python train.py {run}/config.yaml" in line
    assert leftovers == []  # the partial .tmp-<pid>.pth is gone
    assert "the run FAILED" in log
    if mounted:
        assert f"the last good checkpoint is {run}/checkpoints/last.pth" in line and last_epoch == 1
    else:
        assert "no checkpoint had been saved yet" in line
