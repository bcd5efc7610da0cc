"""Models and losses: shapes, registration of every torchvision classifier and nn loss, head swaps."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from src.errors import ConfigError, RunError
from src.models import LOSS_REGISTRY, MLP, MODEL_REGISTRY, SimpleCNN, find_head, replace_head


@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28), (3, 8), (3, 45)])
def test_simple_cnn_any_image_size(in_channels: int, size: int) -> None:
    model = SimpleCNN(num_classes=7, in_channels=in_channels, width=8)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_simple_cnn_batch_norm_switch_and_dropout() -> None:
    with_bn = SimpleCNN(width=8, dropout=0.5)
    without = SimpleCNN(width=8, batch_norm=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert without(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    with_bn.train()
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(with_bn(x), with_bn(x))  # dropout is active in train mode
    with_bn.eval()
    assert torch.equal(with_bn(x), with_bn(x))


def test_mlp_flattens_and_has_no_batch_norm() -> None:
    model = MLP(in_features=28 * 28, num_classes=5, hidden=[64, 32], dropout=0.1)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 5)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert MLP(in_features=3, hidden=[])(torch.randn(2, 3)).shape == (2, 10)


def test_mlp_wrong_in_features_names_the_fix() -> None:
    with pytest.raises(RunError, match="in_features: 3072"):
        MLP(in_features=784)(torch.randn(2, 3, 32, 32))


def test_registry_builds_own_models_and_checks_keys() -> None:
    model = MODEL_REGISTRY.build({"name": "SimpleCNN", "num_classes": 4, "width": 4})
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    with pytest.raises(ConfigError, match="width"):
        MODEL_REGISTRY.build({"name": "SimpleCNN", "widht": 4})
    with pytest.raises(ConfigError, match="in_features"):
        MODEL_REGISTRY.build({"name": "MLP"})


def test_every_torchvision_classifier_is_registered() -> None:
    names = set(torchvision.models.list_models(module=torchvision.models))
    assert {"resnet18", "resnet50", "efficientnet_b0", "vit_b_16", "mobilenet_v3_small", "swin_t"} <= names
    assert names <= set(MODEL_REGISTRY.names())
    # detection/segmentation/video models are not classifiers and stay out
    assert "fasterrcnn_resnet50_fpn" not in MODEL_REGISTRY


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_builds_with_num_classes(name: str) -> None:
    model = MODEL_REGISTRY.build({"name": name, "num_classes": 10}).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_torchvision_kwargs_pass_through_and_typos_are_config_errors() -> None:
    model = MODEL_REGISTRY.build({"name": "resnet18", "num_classes": 3, "zero_init_residual": True})
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0  # zero_init_residual reached torchvision
    with pytest.raises(ConfigError, match="bogus"):
        MODEL_REGISTRY.build({"name": "resnet18", "bogus": 1})


def _cache_fake_weights(tmp_path, monkeypatch, weights, model: nn.Module) -> None:
    """Put a state dict where torch.hub caches downloads, so building with `weights` needs no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache / weights.url.rsplit("/", 1)[1])


def test_googlenet_returns_plain_logits_in_train_mode(tmp_path, monkeypatch) -> None:
    model = MODEL_REGISTRY.build({"name": "googlenet", "num_classes": 6}).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6)

    fake = torchvision.models.GoogLeNet(aux_logits=True, init_weights=False)
    _cache_fake_weights(tmp_path, monkeypatch, torchvision.models.GoogLeNet_Weights.DEFAULT, fake)
    pretrained = MODEL_REGISTRY.build({"name": "googlenet", "num_classes": 6, "weights": "DEFAULT"}).train()
    assert pretrained.aux1 is None and pretrained.aux2 is None
    out = pretrained(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6)


@pytest.mark.parametrize(
    ("name", "head", "size"),
    [
        ("resnet18", "fc", 224),
        ("efficientnet_b0", "classifier.1", 224),
        ("vit_b_16", "heads.head", 224),
        ("mobilenet_v3_small", "classifier.3", 224),
        ("squeezenet1_0", "classifier.1", 224),
        ("swin_t", "head", 224),
    ],
)
def test_replace_head_finds_the_logit_layer(name: str, head: str, size: int) -> None:
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = torchvision.models.get_model(name, weights=None)
    assert find_head(model)[0] == head
    old = model.get_submodule(head)
    replace_head(model, 7)
    new = model.get_submodule(head)
    assert new is not old and type(new) is type(old)
    assert new.weight.device.type == "meta"
    assert model.eval()(torch.empty(2, 3, size, size, device="meta")).shape == (2, 7)


def test_pretrained_weights_keep_the_backbone_and_replace_the_head(tmp_path, monkeypatch) -> None:
    fake = torchvision.models.resnet18()
    _cache_fake_weights(tmp_path, monkeypatch, torchvision.models.ResNet18_Weights.DEFAULT, fake)

    model = MODEL_REGISTRY.build({"name": "resnet18", "num_classes": 10, "weights": "DEFAULT"})
    assert torch.equal(model.conv1.weight, fake.conv1.weight)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)

    same = MODEL_REGISTRY.build({"name": "resnet18", "weights": "IMAGENET1K_V1"})
    assert torch.equal(same.fc.weight, fake.fc.weight)  # 1000 classes: the pretrained head stays


def test_unknown_weights_name_suggests_the_valid_one() -> None:
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        MODEL_REGISTRY.build({"name": "resnet18", "weights": "IMAGENET"})


def test_every_nn_loss_is_registered() -> None:
    expected = {
        name
        for name, obj in vars(nn).items()
        if isinstance(obj, type) and issubclass(obj, nn.modules.loss._Loss) and not name.startswith("_")
    }
    assert {"CrossEntropyLoss", "MSELoss", "NLLLoss", "BCEWithLogitsLoss", "SmoothL1Loss"} <= expected
    assert expected <= set(LOSS_REGISTRY.names())


def test_losses_build_with_their_arguments_and_return_scalars() -> None:
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 3])
    ce = LOSS_REGISTRY.build({"name": "CrossEntropyLoss", "label_smoothing": 0.2})
    loss = ce(logits, labels)
    assert loss.ndim == 0
    assert torch.allclose(loss, nn.functional.cross_entropy(logits, labels, label_smoothing=0.2))
    mse = LOSS_REGISTRY.build("MSELoss")
    assert torch.allclose(mse(torch.ones(3), torch.zeros(3)), torch.tensor(1.0))
    bce = LOSS_REGISTRY.build({"name": "BCEWithLogitsLoss"})
    assert bce(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(
        float(torch.log(torch.tensor(2.0)))
    )
    with pytest.raises(ConfigError, match="label_smoothing"):
        LOSS_REGISTRY.build({"name": "CrossEntropyLoss", "label_smoothin": 0.1})
