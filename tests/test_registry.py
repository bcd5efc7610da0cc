"""The Registry: decorator forms, duplicates, closest-name errors and checked keyword arguments."""

import pytest

from src.errors import ConfigError
from src.registry import Registry


def make() -> Registry:
    reg = Registry("widget")

    @reg.register()
    class Knob:
        def __init__(self, size: int, color: str = "red") -> None:
            self.size, self.color = size, color

    @reg.register("slider")
    class Slider:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    return reg


def test_register_by_own_name_and_explicit_name():
    reg = make()
    assert reg.names() == ["Knob", "slider"]
    knob = reg.build({"name": "Knob", "size": 3})
    assert (knob.size, knob.color) == (3, "red")
    assert reg.build({"name": "slider", "anything": 1}).kwargs == {"anything": 1}


def test_bare_string_section_and_context():
    reg = make()
    assert reg.build("Knob", size=5).size == 5


def test_duplicate_name_refused():
    reg = make()
    with pytest.raises(KeyError, match="already registered"):

        @reg.register("Knob")
        class Other:
            pass


def test_unknown_name_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown widget 'knob'.*'Knob'"):
        make().build({"name": "knob", "size": 1})


def test_unknown_argument_names_key_and_accepted_ones():
    with pytest.raises(ConfigError) as err:
        make().build({"name": "Knob", "size": 1, "colour": "blue"})
    message = str(err.value)
    assert "'colour'" in message and "'color'" in message and "size" in message


def test_missing_argument_named():
    with pytest.raises(ConfigError, match=r"needs the argument.*size"):
        make().build({"name": "Knob"})


def test_wrong_kind_of_value_is_a_config_error():
    reg = Registry("thing")

    @reg.register()
    def Ranged(n: int) -> range:
        return range(n)

    with pytest.raises(ConfigError, match="rejected its arguments"):
        reg.build({"name": "Ranged", "n": "three"})


def test_src_exposes_all_registries_with_builtins():
    from src import (
        DATASET_REGISTRY,
        EVALUATOR_REGISTRY,
        LOSS_REGISTRY,
        LR_SCHEDULER_REGISTRY,
        MODEL_REGISTRY,
        OPTIMIZER_REGISTRY,
        TRANSFORM_REGISTRY,
    )

    assert {"SimpleCNN", "MLP", "resnet18", "resnet50", "efficientnet_b0", "vit_b_16"} <= set(
        MODEL_REGISTRY.names()
    )
    assert {"SyntheticClassification", "ImageFolder", "CIFAR10", "CIFAR100", "MNIST", "FashionMNIST"} <= set(
        DATASET_REGISTRY.names()
    )
    assert {"RandomCrop", "Normalize", "ToImage"} <= set(TRANSFORM_REGISTRY.names())
    assert {"SGD", "Adam", "AdamW", "Lion", "AdamWScheduleFree", "RAdamScheduleFree"} <= set(
        OPTIMIZER_REGISTRY.names()
    )
    assert {"StepLR", "OneCycleLR", "CosineAnnealingWarmupReduceRestarts"} <= set(
        LR_SCHEDULER_REGISTRY.names()
    )
    assert "classification_evaluator" in EVALUATOR_REGISTRY
    assert {"CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss"} <= set(LOSS_REGISTRY.names())
