"""Cross-validation splits, fold training, sweeps and comparison, on a generated raw/ tree of PNGs.

docs/workflows.md is run block by block as a user types it (it is the end-to-end test of every
command, MLflow parent and child runs included); the kill-and-rerun behaviour of a sweep uses a real
SIGKILL of the sweep process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, explain, run_script, run_shell, shell_env, start_script


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "script" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory) -> Path:
    """3 classes x 12 images of 8x8 pixels under <root>/raw/."""
    root = tmp_path_factory.mktemp("demo")
    assert load_script("make_demo_images").main([str(root), "--per-class", "12"]) == 0
    return root / "raw"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_make_splits_stratified_disjoint_and_complete(demo_raw, tmp_path, capsys):
    root = tmp_path / "data"
    (root).mkdir()
    os.symlink(demo_raw, root / "raw")
    make_splits = load_script("make_splits").main
    assert make_splits([str(root / "raw"), "--folds", "3", "--test-fraction", "0.25", "--seed", "1"]) == 0
    splits = root / "splits"
    every = {p.relative_to(demo_raw).as_posix() for p in demo_raw.rglob("*.png")}
    test = lines(splits / "test.txt")
    vals = [lines(splits / f"fold_{k}_val.txt") for k in range(3)]
    assert len(test) == 9 and {t.split("/")[0] for t in test} == {"class_0", "class_1", "class_2"}
    assert sum(map(len, vals)) == len(set().union(*map(set, vals))), "val sets overlap"
    assert set(test) | set().union(*map(set, vals)) == every and not set(test) & set().union(*map(set, vals))
    for k in range(3):
        train = set(lines(splits / f"fold_{k}_train.txt"))
        assert train == every - set(test) - set(vals[k])
        counts = [sum(v.startswith(f"class_{c}/") for v in vals[k]) for c in range(3)]
        assert max(counts) - min(counts) <= 1, counts  # stratified
    info = json.loads((splits / "info.json").read_text())
    assert info["classes"] == ["class_0", "class_1", "class_2"] and info["folds"] == 3

    before = (splits / "test.txt").read_text()
    assert make_splits([str(root / "raw"), "--folds", "3"]) == 2  # exists, no --force
    assert "add --force" in capsys.readouterr().err and (splits / "test.txt").read_text() == before
    assert make_splits([str(root / "raw"), "--folds", "20", "--force"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: class 'class_0'") and "remain for --folds 20" in err and err.count("\n") == 1
    )
    assert (splits / "test.txt").read_text() == before, "a refused --force must not touch the splits"
    assert make_splits([str(tmp_path / "nothing" / "raw")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert make_splits([str(root / "raw"), "--folds", "2", "--force", "--seed", "1"]) == 0
    assert len(list(splits.glob("fold_*_val.txt"))) == 2


@pytest.mark.parametrize(
    "fraction, words",
    [
        ("0", ["--test-fraction must be above 0 and below 1, got 0.0", "--test-fraction 0.15"]),
        ("0.01", ["--test-fraction 0.01", "rounds to no test image", "smallest class has 12", "0.083"]),
    ],
)
def test_make_splits_refuses_a_test_fraction_that_leaves_no_test_image(demo_raw, tmp_path, fraction, words):
    """Every fold ends with a test on the held-out list: an empty list would fail each fold at its end."""
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(demo_raw, root / "raw")
    proc = run_script("script/make_splits.py", str(root / "raw"), "--folds", "3", "--test-fraction", fraction)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, explain(proc)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["raw"]  # no splits/, no half-written temp folder


def test_make_splits_refuses_existing_splits_before_importing_torch(tmp_path):
    (tmp_path / "raw" / "a").mkdir(parents=True)
    (tmp_path / "splits").mkdir()
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['make_splits.py', {str(tmp_path / 'raw')!r}]\n"
        "try:\n    runpy.run_path('script/make_splits.py', run_name='__main__')\n"
        "except SystemExit as stop:\n    print(stop.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], explain(proc)
    assert proc.stderr == (
        f"error: splits already exist at {tmp_path / 'splits'}; add --force to replace them (runs trained on "
        "them would no longer match)\n"
    )


def test_image_folder_fold_and_run_dir_name(demo_raw, tmp_path):
    from omegaconf import OmegaConf

    from src.data.datasets import ImageFolder
    from src.errors import RunError
    from src.results.run_dir import new_run_dir
    from src.workflows.splits import make_splits

    root = tmp_path / "data"
    root.mkdir()
    os.symlink(demo_raw, root / "raw")
    make_splits(root / "raw", folds=3, test_fraction=0.2)
    for split, name in [("train", "fold_1_train.txt"), ("val", "fold_1_val.txt"), ("test", "test.txt")]:
        data = ImageFolder(str(root), split, fold=1)
        assert len(data) == len(lines(root / "splits" / name)) and data.num_classes == 3
        x, y = data[0]
        assert x.shape == (3, 8, 8) and x.dtype.is_floating_point and y == data.targets[0]
    with pytest.raises(RunError, match=r"dataset\.fold=3 but .* holds folds 0\.\.2"):
        ImageFolder(str(root), "train", fold=3)
    with pytest.raises(RunError, match=r"choose a fold, e\.g\. dataset\.fold=0"):
        ImageFolder(str(root), "train")
    cfg = OmegaConf.create({"output": str(tmp_path / "out"), "tag": "x", "model": {"name": "M"},
                            "dataset": {"name": "ImageFolder", "fold": 2}})  # fmt: skip
    assert re.fullmatch(r"\d{8}_\d{6}_M_x_fold2", new_run_dir(cfg).name)


def test_compare_matches_scipy_and_judges(tmp_path):
    from scipy.stats import ttest_rel

    from src.workflows.compare import compare

    def summary(name: str, acc: list[float]) -> Path:
        path = tmp_path / f"{name}.csv"
        rows = [[k, f"r{k}", a, 1 - a] for k, a in enumerate(acc)]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(
                [["fold", "run", "test_accuracy", "test_loss"], *rows, ["mean", "", 0, 0]]
            )
        return path

    a = summary("a", [0.70, 0.72, 0.69, 0.71, 0.70])
    b = summary("b", [0.75, 0.76, 0.74, 0.77, 0.74])
    rows, verdict = compare(str(a), str(b))
    acc = next(r for r in rows if r["metric"] == "test_accuracy")
    assert acc["diff"] == pytest.approx(0.048)
    assert acc["p_value"] == pytest.approx(
        ttest_rel([0.75, 0.76, 0.74, 0.77, 0.74], [0.70, 0.72, 0.69, 0.71, 0.70]).pvalue
    )
    assert verdict.startswith("B is better at alpha=0.05 on test_accuracy")
    assert compare(str(a), str(b), metric="test_loss")[1].startswith("B is better")  # lower loss wins
    c = summary("c", [0.71, 0.70, 0.70, 0.72, 0.69])
    assert compare(str(a), str(c))[1].startswith("no significant difference")
    proc = run_script("script/compare.py", str(a), str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def cv_summary(path: Path, acc: list[float]) -> Path:
    """A cross-validation directory holding only its cv_summary.csv (fold rows, then mean)."""
    path.mkdir(parents=True)
    with open(path / "cv_summary.csv", "w", newline="") as f:
        rows = [[k, f"r{k}", a] for k, a in enumerate(acc)]
        csv.writer(f).writerows([["fold", "run", "test_accuracy"], *rows, ["mean", "", 0]])
    return path


def test_compare_prints_t_and_each_folds_difference_and_no_verdict_where_the_test_is_degenerate(tmp_path):
    from scipy.stats import ttest_rel

    a = cv_summary(tmp_path / "a", [0.80, 0.81, 0.81])
    b = cv_summary(tmp_path / "b", [0.83, 0.80, 0.84])
    proc = run_script("script/compare.py", str(a), str(b))
    assert proc.returncode == 0, explain(proc)
    want = ttest_rel([0.83, 0.80, 0.84], [0.80, 0.81, 0.81])
    assert "| metric | mean A | mean B | B - A | t | p (paired t) |" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        "no significant difference at alpha=0.05 on test_accuracy: B - A = +0.0167 (fold 0 +0.0300, "
        f"fold 1 -0.0100, fold 2 +0.0300), t = {want.statistic:.3f}, p = {want.pvalue:.4g} (paired t-test over 3 folds)"
    )
    # Every fold +0.05: zero variance, no t statistic; before, this printed "B is better ... p = 0".
    same = cv_summary(tmp_path / "same", [0.85, 0.86, 0.86])
    proc = run_script("script/compare.py", str(a), str(same), "--json")
    assert proc.returncode == 0, explain(proc)
    out = json.loads(proc.stdout)
    assert out["metrics"][0]["t"] is None and out["metrics"][0]["p_value"] is None
    assert out["verdict"].startswith("no verdict on test_accuracy: B - A = +0.0500 (fold 0 +0.0500")
    assert out["verdict"].endswith(
        "the same difference on every fold, so the paired t-test is undefined (zero variance)"
    )
    table = run_script("script/compare.py", str(a), str(same)).stdout
    assert "| undefined | undefined |" in table
    # Two shared folds: a t-test with one degree of freedom gives no verdict.
    two = cv_summary(tmp_path / "two", [0.90, 0.85])
    line = run_script("script/compare.py", str(a), str(two)).stdout.strip().splitlines()[-1]
    assert line.startswith("no verdict on test_accuracy") and line.endswith(
        "a paired t-test needs at least 3 folds"
    )


def test_summary_directories_of_two_workflows_never_share_a_name_and_one_is_found_again(tmp_path):
    from omegaconf import OmegaConf

    from src.workflows import runs

    cfg = OmegaConf.create({"output": str(tmp_path), "tag": None, "model": {"name": "SimpleCNN"},
                            "dataset": {"name": "ImageFolder"}})  # fmt: skip
    first = runs.summary_dir(cfg, "cv", "aaaaaa0123456789")
    other = runs.summary_dir(cfg, "cv", "bbbbbb0123456789")  # other overrides, same model, no tag
    assert re.fullmatch(r"\d{8}_\d{6}_cv_aaaaaa_SimpleCNN", first.name)
    assert re.fullmatch(r"\d{8}_\d{6}_cv_bbbbbb_SimpleCNN", other.name)
    assert runs.summary_dir(cfg, "cv", "aaaaaa0123456789") == first  # the same workflow again


def test_compare_names_the_candidates_when_a_pattern_matches_several_and_latest_takes_the_newest(tmp_path):
    old = cv_summary(tmp_path / "20260101_120000_cv_aaaaaa_SimpleCNN", [0.80, 0.81, 0.81])
    new = cv_summary(tmp_path / "20260102_120000_cv_bbbbbb_SimpleCNN", [0.70, 0.70, 0.72])
    wide = cv_summary(tmp_path / "20260101_130000_cv_cccccc_SimpleCNN_wide", [0.83, 0.80, 0.84])
    proc = run_shell(f"python script/compare.py {tmp_path}/*_cv_*_SimpleCNN {tmp_path}/*_cv_*_SimpleCNN_wide")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"error: A matches 2: {old}, {new}; name one directory per side, or add --latest to take the "
        "newest of each\n"
    )
    proc = run_shell(
        f"python script/compare.py {tmp_path}/*_cv_*_SimpleCNN {tmp_path}/*_cv_*_SimpleCNN_wide --latest"
    )
    assert proc.returncode == 0, explain(proc)
    assert "B - A = +0.1167" in proc.stdout.splitlines()[-1]  # the newest A (mean 0.7067) against wide
    proc = run_script("script/compare.py", str(old), str(new), str(wide), str(tmp_path / "x"))
    assert (
        proc.returncode == 2 and "do not split into A and B" in proc.stderr and proc.stderr.count("\n") == 1
    )


def test_sweep_points_equal_on_the_metric_are_ranked_by_the_monitored_loss(tmp_path):
    """Three points at val_accuracy 1.0 list the lowest val_loss first, and the header says so."""
    from omegaconf import OmegaConf

    from src.search.sweep import tie_breaker, write_summary
    from src.workflows import runs

    base = OmegaConf.create({"checkpoint": {"monitor": "val_loss", "mode": "min"}})
    jobs = []
    for lr, acc, loss in (("1e-3", 1.0, 0.26), ("1e-2", 0.9, 0.01), ("3e-2", 1.0, 0.15), ("1e-1", 1.0, 0.20)):
        run = tmp_path / f"run_lr{lr}"
        (run / "test").mkdir(parents=True)
        OmegaConf.save(base, run / "config.yaml")
        (run / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "val_accuracy": acc, "val_loss": loss}) + "\n"
        )
        (run / "test" / "metrics.json").write_text(json.dumps({"test_accuracy": acc}))
        jobs.append(runs.Job(f"lr={lr}", [], base, run_dir=run, extra={"point": [("optimizer.lr", lr)]}))
    assert tie_breaker(base, "val_accuracy") == "val_loss" and tie_breaker(base, "val_loss") is None
    write_summary(
        tmp_path, [("optimizer.lr", [])], jobs, "val_accuracy", "max", tie_breaker(base, "val_accuracy")
    )
    with open(tmp_path / "sweep_summary.csv", newline="") as f:
        assert [r["optimizer.lr"] for r in csv.DictReader(f)] == ["3e-2", "1e-1", "1e-3", "1e-2"]
    text = (tmp_path / "sweep_summary.md").read_text()
    assert text.startswith("# Sweep: 4 point(s), sorted by val_accuracy (max), ties by val_loss (min)\n")


def bash_blocks(text: str) -> list[str]:
    commands = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        commands += [
            " ".join(line.split()) for line in body.splitlines() if line.strip() and not line.startswith("#")
        ]
    return commands


@pytest.mark.slow
def test_workflows_doc_runs_end_to_end(tmp_path):
    """Every command of docs/workflows.md, in order, in a fresh folder; then the results are checked."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("train.py", "test.py", "script", "config", "src"):
        os.symlink(ROOT / name, work / name)
    env = shell_env(tmp_path, MLFLOW_TRACKING_URI="")
    commands = bash_blocks((ROOT / "docs" / "workflows.md").read_text())
    assert len(commands) == 8 and commands[-1].startswith("python script/compare.py")
    outputs = []
    for command in commands:
        command = command.replace(
            "--folds 3", "--folds 2"
        )  # the doc's 3 folds, cut to 2 to keep the suite quick
        proc = subprocess.run(["bash", "-c", command], cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{command}\n{explain(proc)}"
        outputs.append(proc.stdout)
    folder = work / "result" / "ImageFolder"
    runs = sorted(p.name for p in folder.glob("*/config.yaml"))
    assert len(runs) == 1 + 2 + 1 + 2, runs  # fold 0 of the first CV reuses the quick fold-0 run
    assert "fold 0: finished in" in outputs[4] and "skipped" in outputs[4]

    cv = next(p for p in folder.iterdir() if re.fullmatch(r"\d{8}_\d{6}_cv_[0-9a-f]{6}_SimpleCNN", p.name))
    wide = next(
        p for p in folder.iterdir() if re.fullmatch(r"\d{8}_\d{6}_cv_[0-9a-f]{6}_SimpleCNN_wide", p.name)
    )
    assert sorted(p.name for p in (wide / "logs").iterdir()) == [
        "fold_0.out",
        "fold_1.out",
    ]  # --gpus: side by side
    assert "test_accuracy" in (wide / "logs" / "fold_1.out").read_text()
    with open(cv / "cv_summary.csv", newline="") as f:
        rows = {r["fold"]: r for r in csv.DictReader(f)}
    tests = [json.loads((Path(rows[str(k)]["run"]) if Path(rows[str(k)]["run"]).is_absolute()
                         else work / rows[str(k)]["run"]).joinpath("test/metrics.json").read_text())
             for k in range(2)]  # fmt: skip
    for k in range(2):
        assert rows[str(k)]["run"].endswith(f"_fold{k}")
    for metric in ("test_accuracy", "test_loss"):
        values = [t[metric] for t in tests]
        assert float(rows["mean"][metric]) == pytest.approx(statistics.mean(values), abs=1e-12)
        assert float(rows["std"][metric]) == pytest.approx(statistics.stdev(values), abs=1e-12)  # ddof=1
    # two folds here (the doc has three): too few pairs for a verdict, and the line says so
    assert outputs[-1].strip().splitlines()[-1].startswith("no verdict on test_accuracy: B - A = ")
    assert outputs[-1].strip().endswith(("a paired t-test needs at least 3 folds", "(zero variance)"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'result' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ImageFolder")
    every = client.search_runs([experiment.experiment_id], max_results=100)
    parent_id = json.loads((cv / "cv.json").read_text())["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["workflow"] == "cross_validation" and parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(float(rows["mean"]["test_accuracy"]))
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent_id]
    # fold 0 was trained before the cross-validation existed (without MLflow): only fold 1 ran under it
    assert [r.data.tags["fold"] for r in children] == ["1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert len(every) == 2, "only the cross-validation that asked for MLflow logs to it"


def point_dirs(out: Path) -> dict[str, Path]:
    return {p.parent.name.split("_", 2)[2]: p.parent for p in out.glob("*/*/config.yaml")}


@pytest.mark.slow
def test_sweep_killed_and_rerun_finishes_only_missing_points(tmp_path):
    out = tmp_path / "out"
    settings = ["config/dummy.yaml", "optimizer.lr=1e-3,2e-3,3e-3", f"output={out}", "logging.mlflow=false",
                "logging.tensorboard=false", "logging.progress_bar=false", "logging.log_frequency=5", "epoch=2",
                "batch=8", "dataset.train_size=800", "dataset.val_size=16", "dataset.test_size=16",
                "dataset.input_shape=[3,8,8]", "model.width=4", "lr_scheduler=null"]  # fmt: skip
    proc = start_script("script/sweep.py", *settings, log_file=tmp_path / "sweep.log")
    deadline = time.monotonic() + 240
    child = None
    while time.monotonic() < deadline:  # wait until point 0 finished and point 1 logged a few steps
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()
        dirs = point_dirs(out)
        first, second = dirs.get("SimpleCNN_dummy_lr1e-3"), dirs.get("SimpleCNN_dummy_lr2e-3")
        started = second is not None and (second / "metrics.jsonl").exists()
        if (
            first
            and (first / "summary.txt").exists()
            and started
            and "train_loss" in (second / "metrics.jsonl").read_text()
        ):
            child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
            break
        time.sleep(0.02)
    assert child is not None, "point 1 never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text():
        time.sleep(0.05)  # the training process got SIGTERM from its parent's death and saved a checkpoint
    dirs = point_dirs(out)
    first, second = dirs["SimpleCNN_dummy_lr1e-3"], dirs["SimpleCNN_dummy_lr2e-3"]
    assert not (second / "summary.txt").exists() and (second / "checkpoints" / "last.pth").exists()
    assert "SimpleCNN_dummy_lr3e-3" not in dirs
    stamp = (first / "summary.txt").stat().st_mtime_ns

    # One SLURM array task (no sbatch here: the task branch of the script runs directly) resumes point 1.
    env = shell_env(tmp_path, SLURM_ARRAY_TASK_ID="1")
    task = run_shell("bash script/slurm_sweep.sh " + " ".join(shlex.quote(s) for s in settings), env=env)
    assert task.returncode == 0, explain(task)
    assert "point 1: resuming" in task.stdout and (second / "summary.txt").exists()
    assert "resum" in (second / "train.log").read_text()

    again = run_script("script/sweep.py", *settings)
    assert again.returncode == 0, explain(again)
    assert "point 0: finished in" in again.stdout and "point 1: finished in" in again.stdout
    dirs = point_dirs(out)
    assert sorted(dirs) == ["SimpleCNN_dummy_lr1e-3", "SimpleCNN_dummy_lr2e-3", "SimpleCNN_dummy_lr3e-3"]
    assert dirs["SimpleCNN_dummy_lr2e-3"] == second and (first / "summary.txt").stat().st_mtime_ns == stamp
    summary = next(out.glob("*/*_sweep_*_SimpleCNN_dummy/sweep_summary.csv"))
    with open(summary, newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["optimizer.lr"] for r in table) == ["1e-3", "2e-3", "3e-3"]
    losses = [float(r["val_loss"]) for r in table]
    assert losses == sorted(losses)  # checkpoint.monitor=val_loss, min: best first

    # Submitting from outside a job counts the points and hands the array to sbatch.
    bin_dir = tmp_path / "bin"
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$SBATCH_LOG"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = shell_env(tmp_path, SBATCH_LOG=str(tmp_path / "sbatch.txt"))
    submit = run_shell("bash script/slurm_sweep.sh " + " ".join(shlex.quote(s) for s in settings), env=env)
    assert submit.returncode == 0, explain(submit)
    assert (
        (tmp_path / "sbatch.txt")
        .read_text()
        .startswith("--array=0-2 script/slurm_sweep.sh config/dummy.yaml")
    )


def test_workflow_commands_refuse_bad_input_before_running(tmp_path, monkeypatch, capsys):
    """One `error:` line and exit 2, and nothing written, for each kind of bad command line."""
    monkeypatch.chdir(tmp_path)
    dummy = str(ROOT / "config" / "dummy.yaml")
    cross_validate, sweep = load_script("cross_validate").main, load_script("sweep").main
    cases = [
        (
            cross_validate,
            [dummy, "--folds", "0,1"],
            "dataset 'SyntheticClassification' has no argument 'fold'",
        ),
        (cross_validate, [dummy], "cross-validation needs --folds, or dataset.root"),
        (cross_validate, [dummy, "--folds", "0,x"], "--folds takes fold numbers"),
        (cross_validate, [dummy, "--gpus", "a"], "--gpus takes GPU ids"),
        (sweep, [dummy, "batch=4"], "nothing to sweep"),
        (sweep, [dummy, "model=Nope,SimpleCNN"], "unknown model 'Nope'"),
        (sweep, [dummy, "batch=4,8", "--metric", "accuracy"], "--metric must be a val_ or test_ metric"),
        (sweep, [dummy, "batch=4,8", "--index", "5"], "--index 5 is outside the sweep's 2 points"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "result").exists()
