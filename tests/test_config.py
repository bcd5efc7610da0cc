"""Config loading: defaults < __base__ chain < file (__import__) < overrides; aliases; validation."""

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.config import RootConfig, load_config, load_config_with_sources
from src.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_config_documents_exactly_the_schema_defaults():
    documented = OmegaConf.to_container(load_config(ROOT / "config/__base__/config.yaml"))
    defaults = dataclasses.asdict(RootConfig())
    assert documented == defaults


def test_merge_order_and_sources(tmp_path):
    write(tmp_path / "base.yaml", "batch: 8\nepoch: 3\nmodel: {name: SimpleCNN, width: 16}\n")
    exp = write(tmp_path / "exp.yaml", "__base__: base.yaml\nepoch: 5\n")
    cfg, sources = load_config_with_sources(exp, ["epoch=7"])
    assert (cfg.batch, cfg.epoch, cfg.model.width) == (8, 7, 16)
    assert sources["batch"].endswith("base.yaml")
    assert sources["epoch"] == "the command line"
    assert sources["seed"] == "default"


def test_base_list_relative_paths_and_import(tmp_path):
    write(tmp_path / "parts/a.yaml", "batch: 4\n")
    write(tmp_path / "parts/b.yaml", "batch: 6\nseed: 1\n")
    write(tmp_path / "parts/opt.yaml", "optimizer:\n  name: SGD\n  lr: 0.5\n  momentum: 0.9\n")
    exp = write(
        tmp_path / "exp.yaml",
        "__base__: [parts/a.yaml, parts/b.yaml]\noptimizer:\n  __import__: parts/opt.yaml\n  lr: 0.1\n",
    )
    cfg = load_config(exp)
    assert cfg.batch == 6 and cfg.seed == 1
    assert OmegaConf.to_container(cfg.optimizer) == {"name": "SGD", "lr": 0.1, "momentum": 0.9}


def test_component_name_change_drops_old_arguments_keeps_template_keys(tmp_path):
    exp = write(tmp_path / "exp.yaml", "model: {name: SimpleCNN, width: 16, compile: true}\n")
    cfg = load_config(exp, ["model=resnet50"])
    assert OmegaConf.to_container(cfg.model) == {"name": "resnet50", "compile": True}


def test_aliases_fold_into_canonical_keys(tmp_path):
    exp = write(
        tmp_path / "exp.yaml",
        "training:\n  save_frequency: 10\n  validation_frequency: 5\nmodel:\n  name: SimpleCNN\n  precision: bf16\n",
    )
    cfg = load_config(exp)
    assert cfg.checkpoint.save_frequency == 10
    assert cfg.evaluation.frequency == 5
    assert cfg.gpu.precision == "bf16"
    assert "precision" not in cfg.model and "save_frequency" not in cfg.training


def test_alias_and_canonical_disagreeing_in_one_file(tmp_path):
    exp = write(tmp_path / "exp.yaml", "training: {save_frequency: 2}\ncheckpoint: {save_frequency: 3}\n")
    with pytest.raises(ConfigError, match=r"both .training.save_frequency."):
        load_config(exp)


def test_scientific_notation_and_gpu_list_override(tmp_path):
    exp = write(tmp_path / "exp.yaml", "optimizer: {name: SGD, lr: 1e-3, weight_decay: 1e-4}\n")
    cfg = load_config(exp, ["gpu.use=0,1,2,3", "optimizer.lr=2e-2"])
    assert cfg.optimizer.lr == pytest.approx(0.02) and cfg.optimizer.weight_decay == pytest.approx(1e-4)
    assert cfg.gpu.use == "0,1,2,3"


@pytest.mark.parametrize(
    ("text", "override", "words"),
    [
        (
            "training: {acumulate_grad_batches: 2}\n",
            [],
            ["training.acumulate_grad_batches", "exp.yaml", "accumulate_grad_batches"],
        ),
        ("", ["bach=3"], ["'bach'", "the command line", "'batch'"]),
        ("batch: many\n", [], ["'batch'", "integer"]),
        ("", ["gpu.precision=17"], ["gpu.precision", "bf16"]),
        ("", ["epoch=0"], ["'epoch'", ">= 1"]),
        ("", ["optimizer.lr=-1"], ["optimizer.lr", "> 0"]),
        ("", ["checkpoint.mode=maximum"], ["checkpoint.mode", "max"]),
        ("", ["distributed.strategy=fdsp"], ["distributed.strategy", "fsdp"]),
        ("", ["nonsense"], ["malformed override", "key=value"]),
        ("batch: [1\n", [], ["YAML syntax error", "exp.yaml:"]),
    ],
)
def test_bad_input_is_one_clear_config_error(tmp_path, text, override, words):
    exp = write(tmp_path / "exp.yaml", text or "seed: 1\n")  # an empty file is refused on its own
    with pytest.raises(ConfigError) as err:
        load_config(exp, override)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_and_cyclic_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "__base__: b.yaml\n")
    write(tmp_path / "b.yaml", "__base__: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cyclic __base__"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "__base__: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"__base__ 'missing\.yaml'"):
        load_config(tmp_path / "c.yaml")


def test_shipped_configs_load():
    for path in sorted((ROOT / "config").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name and cfg.dataset.name, path
