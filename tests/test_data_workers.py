"""`dataloader.num_workers: auto` and the warning when the training loop waits for data."""

from __future__ import annotations

import pytest

from src.config import load_config
from src.data import build_dataset, build_loader
from src.data.workers import DataWaitWatch, auto_num_workers, cpu_cores
from src.errors import ConfigError
from tests.helpers import ROOT

SYNTH = {"name": "SyntheticClassification", "train_size": 16, "val_size": 8, "input_shape": [2]}


def test_auto_is_the_default_and_means_no_workers_on_a_cpu_run() -> None:
    cfg = load_config(ROOT / "config" / "dummy.yaml", [])
    assert cfg.dataloader.num_workers == "auto"
    loader = build_loader(build_dataset(SYNTH, "train", None), 4, None, cfg.dataloader, 0, "cpu")
    assert loader.num_workers == 0 and loader.pin_memory is False


def test_auto_on_cuda_gives_persistent_workers_per_local_process(monkeypatch: pytest.MonkeyPatch) -> None:
    auto_num_workers.cache_clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    expected = max(1, min(8, cpu_cores()))
    loader = build_loader(
        build_dataset(SYNTH, "train", None), 4, None, {"num_workers": "auto", "pin_memory": True}, 0, "cuda"
    )
    assert loader.num_workers == expected and loader.persistent_workers is True
    assert loader.pin_memory is True and loader.prefetch_factor == 2
    auto_num_workers.cache_clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * cpu_cores()))  # more processes than cores
    assert auto_num_workers("cuda") == 1
    auto_num_workers.cache_clear()


def test_num_workers_accepts_a_number_or_auto_only() -> None:
    cfg = load_config(ROOT / "config" / "dummy.yaml", ["dataloader.num_workers=3"])
    assert cfg.dataloader.num_workers == 3
    with pytest.raises(ConfigError, match=r"'dataloader.num_workers'.*use a number of workers or auto"):
        load_config(ROOT / "config" / "dummy.yaml", ["dataloader.num_workers=many"])
    with pytest.raises(ConfigError, match=r"dataloader.num_workers"):
        load_config(ROOT / "config" / "dummy.yaml", ["dataloader.num_workers=-1"])


def test_data_wait_warning_names_the_setting_once_when_the_share_stays_high() -> None:
    watch = DataWaitWatch(configured=0, workers=0)
    assert watch.observe({"data_wait_share": 0.5}, elapsed=10.0) is None
    assert watch.observe({"data_wait_share": 0.1}, elapsed=10.0) is None  # a dip restarts the count
    assert watch.observe({"train_epoch_loss": 1.0}, elapsed=10.0) is None  # windows without the figure
    messages = [watch.observe({"data_wait_share": 0.45}, elapsed=10.0) for _ in range(5)]
    assert messages[:2] == [None, None] and messages[3:] == [None, None]
    assert "raise dataloader.num_workers (now 0), or set it to auto" in messages[2] and "45%" in messages[2]
    assert "(14 s over the last 3 logging windows)" in messages[2]


def test_data_wait_is_not_worth_a_warning_when_it_costs_no_real_time() -> None:
    """A tiny synthetic set: the loop waits half of windows that last milliseconds."""
    watch = DataWaitWatch(configured="auto", workers=0)
    assert all(watch.observe({"data_wait_share": 0.5}, elapsed=0.05) is None for _ in range(200))
    # The same share over longer windows: 3 x 0.5 x 4 s = 6 s waited, worth saying.
    assert [watch.observe({"data_wait_share": 0.5}, elapsed=4.0) for _ in range(3)][-1] is not None


def test_data_wait_advice_with_auto_says_what_auto_chose_and_why_instead_of_asking_for_auto() -> None:
    cpu = DataWaitWatch(configured="auto", workers=0)
    said = [cpu.observe({"data_wait_share": 0.5}, elapsed=10.0) for _ in range(3)][-1]
    assert (
        "dataloader.num_workers=auto chose 0 (workers would take the cores training uses on a CPU-only "
        in said
    )
    assert "set it to auto" not in said and "set a number instead (dataloader.num_workers=4)" in said
    gpu = DataWaitWatch(configured="auto", workers=8)
    said = [gpu.observe({"data_wait_share": 0.5}, elapsed=10.0) for _ in range(3)][-1]
    assert "auto chose 8 (min(8, this process's share of the CPU cores))" in said
