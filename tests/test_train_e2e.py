"""train.py and test.py end to end, as a user runs them: result directory contract, test metrics, imports."""

import json
import textwrap

import pytest
import torch

from tests.helpers import ROOT, TINY, explain, only_run_dir, read_metrics, run_script


@pytest.fixture(scope="module")
def dummy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dummy")
    proc = run_script("train.py", "config/dummy.yaml", f"output={out}", "logging.mlflow=false")
    assert proc.returncode == 0, explain(proc)
    return only_run_dir(out), proc


def test_result_directory_contract(dummy_run):
    run_dir, _ = dummy_run
    assert run_dir.parent.name == "SyntheticClassification"
    assert run_dir.name.endswith("_SimpleCNN_dummy")
    for name in ["config.yaml", "train.log", "metrics.jsonl", "summary.txt", "checkpoints/last.pth",
                 "checkpoints/best.pth", "test/metrics.json", "test/classification_report.txt",
                 "test/confusion_matrix.png"]:  # fmt: skip
        assert (run_dir / name).is_file(), name
    saved = (run_dir / "config.yaml").read_text()
    assert "__base__" not in saved and f"run_dir: {run_dir}" in saved
    state = torch.load(run_dir / "checkpoints/best.pth", weights_only=True)
    from src import MODEL_REGISTRY

    model = MODEL_REGISTRY.build({"name": "SimpleCNN", "width": 16, "num_classes": 10})
    model.load_state_dict(state["model"])  # the plain model state dict


def test_metrics_history_and_learning(dummy_run):
    run_dir, _ = dummy_run
    events = read_metrics(run_dir)
    assert all({"epoch", "step"} <= set(e) for e in events)
    val = [e for e in events if "val_accuracy" in e]
    assert [e["epoch"] for e in val] == [1, 2, 3]
    assert val[-1]["val_accuracy"] > 0.5  # chance is 0.1
    train_steps = [e["step"] for e in events if "train_loss" in e]
    assert train_steps == sorted(set(train_steps))
    test = json.loads((run_dir / "test/metrics.json").read_text())
    assert set(test) == {"test_accuracy", "test_f1_score", "test_loss"}


def test_test_py_reproduces_train_py_test_metrics(dummy_run):
    run_dir, _ = dummy_run
    before = json.loads((run_dir / "test/metrics.json").read_text())
    (run_dir / "test/metrics.json").unlink()
    proc = run_script("test.py", str(run_dir / "config.yaml"))
    assert proc.returncode == 0, explain(proc)
    after = json.loads((run_dir / "test/metrics.json").read_text())
    assert after == before


def test_debug_runs_one_batch_for_two_epochs(tmp_path):
    proc = run_script("train.py", "config/dummy.yaml", f"output={tmp_path}", "debug=true", *TINY[:2])
    assert proc.returncode == 0, explain(proc)
    events = read_metrics(only_run_dir(tmp_path))
    assert max(e["step"] for e in events) == 2
    assert max(e["epoch"] for e in events) == 2


PACKAGE = textwrap.dedent(
    '''
    """A user's own components, registered without editing src/."""
    from torch import nn

    from src import DATASET_REGISTRY, MODEL_REGISTRY
    from src.data.datasets import ImageFolder


    @DATASET_REGISTRY.register("shapes")
    class Shapes(ImageFolder):
        """The user's dataset: an ImageFolder of PNGs under `root`."""


    @MODEL_REGISTRY.register()
    class TinyNet(nn.Module):
        def __init__(self, num_classes: int = 2, width: int = 8):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(x))
    '''
)


def make_image_folder(root, per_class: dict[str, int]) -> None:
    """Red-ish squares vs blue-ish circles, with noise: easy to learn, not trivial to memorise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label in ("circle", "square"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 60, size=(24, 24, 3), dtype=np.uint8)
                yy, xx = np.mgrid[:24, :24]
                cx, cy = rng.integers(8, 16, size=2)
                if label == "circle":
                    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 36
                    img[mask] = [30, 60, 220]
                else:
                    mask = (abs(xx - cx) < 6) & (abs(yy - cy) < 6)
                    img[mask] = [220, 60, 30]
                Image.fromarray(img).save(folder / f"{i}.png")


def test_user_package_registers_dataset_and_model_via_imports(tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PACKAGE)
    data = tmp_path / "data"
    make_image_folder(data, {"train": 48, "val": 16})
    config = tmp_path / "exp.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            __base__: {ROOT}/config/__base__/config.yaml
            imports: [userpkg]
            dataset: {{name: shapes, root: {data}}}
            model: {{name: TinyNet, width: 8}}
            optimizer: {{name: AdamW, lr: 0.01}}
            batch: 16
            epoch: 4
            output: {tmp_path / "result"}
            logging: {{mlflow: false, tensorboard: false}}
            """
        )
    )
    proc = run_script("train.py", str(config), env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, explain(proc)
    run_dir = only_run_dir(tmp_path / "result")
    assert run_dir.parent.name == "shapes" and "_TinyNet" in run_dir.name
    best_val = max(e["val_accuracy"] for e in read_metrics(run_dir) if "val_accuracy" in e)
    assert best_val >= 0.8, best_val  # chance is 0.5
    # no test split: tested on val
    assert json.loads((run_dir / "test/metrics.json").read_text())["test_accuracy"] >= 0.8
