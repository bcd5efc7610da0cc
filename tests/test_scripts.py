"""The script/ tools, run as a user runs them and checked against real runs and hand-built objects."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest
import torch
from torch import nn

from tests.helpers import TINY, explain, read_metrics, result_dirs, run_script

FAST = ["dataset.train_size=64", "batch=16"]  # 4 optimizer steps per epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs in one result root: two that finished with different settings, one that failed."""
    out = tmp_path_factory.mktemp("runs")
    settings = {
        "fast": ["optimizer.lr=0.01", "lr_scheduler=OneCycleLR", "tag=fast", "logging.log_frequency=1"],
        "slow": [
            "optimizer.lr=0.0001",
            "tag=slow",
            "logging.log_frequency=1",
        ],  # CosineAnnealingLR, per epoch
        "nan": ["optimizer.name=SGD", "optimizer.lr=1e30", "tag=nan", "logging.log_frequency=1"],
    }
    found = {}
    for name, extra in settings.items():
        proc = run_script("train.py", "config/dummy.yaml", f"output={out}", *TINY, *extra)
        assert proc.returncode == (1 if name == "nan" else 0), explain(proc)
        found[name] = next(p for p in result_dirs(out) if p.name.endswith(f"_{name}"))
    return out, found


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- show_scheduler.py
def hand_stepped(optimizer, scheduler, epochs: int, steps: int, per_step: bool) -> list[float]:
    """The LR each optimizer step uses, stepping a torch scheduler the textbook way."""
    lrs = []
    for _ in range(epochs):
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    return lrs


@pytest.mark.parametrize("case", ["StepLR per epoch", "OneCycleLR per step with accumulation"])
def test_show_scheduler_curve_matches_the_scheduler_stepped_by_hand(tmp_path, case):
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    if case.startswith("StepLR"):
        args = [*FAST, "epoch=3", "lr_scheduler={name: StepLR, step_size: 1, gamma: 0.5}"]
        expected = hand_stepped(
            optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5), 3, 4, per_step=False
        )
    else:  # 100 samples / batch 16 = 7 batches, 3 per optimizer step -> 3 steps per epoch, 9 in the run
        args = ["dataset.train_size=100", "batch=16", "epoch=3", "training.accumulate_grad_batches=3"]
        args.append("lr_scheduler=OneCycleLR")
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=9)
        expected = hand_stepped(optimizer, schedule, 3, 3, per_step=True)
    png, table = tmp_path / "lr.png", tmp_path / "lr.csv"
    proc = run_script(
        "script/show_scheduler.py", "config/dummy.yaml", "optimizer={name: SGD, lr: 0.1}", *args,
        "--out", str(png), "--csv", str(table),
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    rows = read_csv(table)
    assert [int(r["step"]) for r in rows] == list(range(1, len(expected) + 1))
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100  # a real picture, not an empty file


@pytest.mark.parametrize("tag", ["fast", "slow"])
def test_show_scheduler_steps_like_the_trainer(runs, tmp_path, tag):
    """The trainer logs the LR each optimizer step used, the one the schedule had before that step."""
    _, found = runs
    run = found[tag]
    table = tmp_path / "lr.csv"
    proc = run_script(
        "script/show_scheduler.py",
        str(run / "config.yaml"),
        "--out",
        str(tmp_path / "lr.png"),
        "--csv",
        str(table),
    )
    assert proc.returncode == 0, explain(proc)
    planned = {int(r["step"]): float(r["lr"]) for r in read_csv(table)}
    logged = {e["step"]: e["lr"] for e in read_metrics(run) if "lr" in e}
    assert sorted(planned) == sorted(logged) == list(range(1, 9))  # 2 epochs x 4 steps
    assert [logged[k] for k in range(1, 9)] == pytest.approx([planned[k] for k in range(1, 9)], rel=1e-9)
    if tag == "fast":  # OneCycleLR steps per optimizer step
        assert len(set(planned.values())) == 8
    else:  # per epoch: constant inside an epoch, lower in the second
        assert planned[1] == planned[4] > planned[5] == planned[8]


def test_show_scheduler_bad_name_is_one_line_and_exit_2(tmp_path):
    proc = run_script(
        "script/show_scheduler.py",
        "config/dummy.yaml",
        "lr_scheduler=StepLr",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert proc.returncode == 2
    assert "StepLR" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------- show_model.py
def test_show_model_counts_parameters_like_torch():
    from src import MODEL_REGISTRY

    proc = run_script("script/show_model.py", "config/dummy.yaml", "model.width=8", "--depth", "0")
    assert proc.returncode == 0, explain(proc)
    model = MODEL_REGISTRY.build({"name": "SimpleCNN", "width": 8, "num_classes": 10})
    total = int(re.search(r"^total parameters: ([\d,]+)$", proc.stdout, re.M).group(1).replace(",", ""))
    assert total == sum(p.numel() for p in model.parameters())
    convs = [line for line in proc.stdout.splitlines() if " Conv2d " in line]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


# ---------------------------------------------------------------------- aggregate_results.py
def test_aggregate_results_tables_every_run_with_its_settings_and_metrics(runs, tmp_path):
    out, found = runs
    csv_path, md_path = tmp_path / "all.csv", tmp_path / "all.md"
    proc = run_script(
        "script/aggregate_results.py", "--root", str(out), "--sort", "val_accuracy",
        "--csv", str(csv_path), "--md", str(md_path),
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    rows = read_csv(csv_path)
    by_tag = {r["tag"]: r for r in rows}
    assert set(by_tag) == {"fast", "slow", "nan"}
    for tag in ("fast", "slow"):
        row, run = by_tag[tag], found[tag]
        last_val = [e for e in read_metrics(run) if "val_accuracy" in e][-1]
        test = json.loads((run / "test/metrics.json").read_text())
        assert row["status"] == "finished"
        assert float(row["val_accuracy"]) == last_val["val_accuracy"]
        assert float(row["val_loss"]) == last_val["val_loss"]
        assert float(row["test_accuracy"]) == test["test_accuracy"]
    assert float(by_tag["fast"]["optimizer.lr"]) == 0.01
    assert float(by_tag["slow"]["optimizer.lr"]) == 0.0001
    assert by_tag["nan"]["status"] == "failed" and by_tag["nan"]["optimizer.name"] == "SGD"
    assert "model.width" not in rows[0]  # the same in every run: not a column
    assert by_tag["nan"]["optimizer.weight_decay"] == ""  # differs (naming SGD drops AdamW's keys): a column
    # best val_accuracy first; the run without one last
    accs = [float(r["val_accuracy"]) for r in rows if r["val_accuracy"]]
    assert accs == sorted(accs, reverse=True) and rows[-1]["tag"] == "nan"
    md = md_path.read_text().splitlines()
    assert len(md) == 2 + 3 and md[0].startswith("| run | status |")
    # the terminal gets a compact table that fits 120 characters; every column is in the files
    printed = proc.stdout.splitlines()
    assert len(printed) == 1 + 3 and printed[0].split()[:2] == ["run", "status"]
    assert max(map(len, printed)) <= 120 and "val_accuracy" in printed[0]
    assert len(md[0].split(" | ")) > len(printed[0].split())


def test_aggregate_results_sorts_losses_lowest_first(runs, tmp_path):
    out, _ = runs
    proc = run_script(
        "script/aggregate_results.py", "--root", str(out), "--sort", "test_loss", "--csv", str(tmp_path / "a.csv"),
        "--md", str(tmp_path / "a.md"),
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    losses = [float(r["test_loss"]) for r in read_csv(tmp_path / "a.csv") if r["test_loss"]]
    assert len(losses) == 2 and losses == sorted(losses)
    bad = run_script("script/aggregate_results.py", "--root", str(out), "--sort", "test_acc")
    assert bad.returncode == 2 and "test_accuracy" in bad.stderr


def test_a_debug_run_is_marked_in_its_name_and_mlflow_and_left_out_of_the_table(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    proc = run_script("train.py", "config/dummy.yaml", f"output={out}", "debug=true", "logging.tensorboard=false",
                      "logging.system_metrics=false", env={"MLFLOW_TRACKING_URI": ""})  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    (run,) = [p.parent for p in out.glob("*/*/config.yaml")]
    assert re.fullmatch(r"\d{8}_\d{6}_SimpleCNN_dummy_debug", run.name)
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("SyntheticClassification").experiment_id])
    assert found.data.tags["debug"] == "true"
    assert client.search_runs([found.info.experiment_id], filter_string="tags.debug = 'false'") == []

    table = ["script/aggregate_results.py", "--root", str(out), "--csv", str(tmp_path / "a.csv"),
             "--md", str(tmp_path / "a.md")]  # fmt: skip
    left = run_script(*table)
    assert left.returncode == 1 and "1 debug=true run(s) left out; --include-debug lists them" in left.stderr
    shown = run_script(*table, "--include-debug")
    assert shown.returncode == 0, explain(shown)
    assert [r["run"] for r in read_csv(tmp_path / "a.csv")] == [str(run.relative_to(out))]


# ---------------------------------------------------------------------- clean_result.py
def test_clean_result_lists_useless_runs_and_deletes_only_with_delete(runs, tmp_path):
    out, found = runs
    root = tmp_path / "result"
    shutil.copytree(out, root)
    copy = lambda run: root / run.relative_to(out)  # noqa: E731
    no_ckpt = copy(found["fast"]).with_name(found["fast"].name + "_nockpt")
    shutil.copytree(copy(found["fast"]), no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoints")
    expected = {no_ckpt, copy(found["nan"])}
    keep = {copy(found["fast"]), copy(found["slow"])}

    listed = run_script("script/clean_result.py", "--root", str(root), "--min-age", "0")
    assert listed.returncode == 0, explain(listed)
    named = {line.split("  [")[0] for line in listed.stdout.splitlines() if "  [" in line}
    assert named == {str(p) for p in expected}
    assert "failed" in listed.stdout and "no checkpoint" in listed.stdout
    assert all(p.is_dir() for p in expected | keep)  # listing deletes nothing

    recent = run_script("script/clean_result.py", "--root", str(root), "--delete")  # default --min-age 10
    assert recent.returncode == 0 and all(
        p.is_dir() for p in expected
    )  # runs this fresh may still be starting

    deleted = run_script("script/clean_result.py", "--root", str(root), "--min-age", "0", "--delete")
    assert deleted.returncode == 0, explain(deleted)
    assert not any(p.exists() for p in expected)
    assert all((p / "checkpoints/last.pth").is_file() for p in keep)


# ---------------------------------------------------------------------- show_config.py, show_registers.py
def test_show_config_sources_name_the_file_or_command_line():
    proc = run_script("script/show_config.py", "config/dummy.yaml", "batch=7", "--sources")
    assert proc.returncode == 0, explain(proc)
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert re.search(r"\b7\b.*# the command line", lines["batch"])
    assert lines["epoch"].endswith("# config/dummy.yaml")
    assert lines["seed"].endswith("# config/__base__/config.yaml")


def test_show_registers_lists_builtin_and_custom_components():
    proc = run_script("script/show_registers.py", "lr_scheduler")
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("LR_SCHEDULER_REGISTRY")
    names = set(proc.stdout.split())
    assert {"StepLR", "OneCycleLR", "CosineAnnealingWarmupReduceRestarts"} <= names
    assert "SimpleCNN" not in names
