"""Private training (training.privacy): DP-SGD through Opacus.

In-process checks use the real Opacus wrappers: per-sample clipping equals a hand-computed mean of
clipped gradients, noise has the promised scale, refusals are one-line config errors. One SIGKILL +
resume test runs train.py mid-epoch and compares the end state and the logged epsilon bit for bit,
and checks epsilon against Opacus's own accountant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")

import src  # noqa: F401  (registers the built-in components)
from src.config import load_config
from src.engine.build import privacy_checked_sections
from src.errors import ConfigError
from src.models import build_model
from src.techniques.privacy import PoissonSampler, Privacy, check_privacy
from tests.helpers import (
    ROOT,
    TINY,
    assert_same_states,
    explain,
    only_run_dir,
    read_metrics,
    run_script,
    sigkill_after,
    slow_mlp_source,
    start_script,
    user_module_config,
    wait_for_step,
)

BASE = ROOT / "config" / "__base__" / "config.yaml"


def private_cfg(*overrides: str) -> object:
    return load_config(BASE, ["training.privacy.enabled=true", *overrides])


def mlp_private(noise: float, clip: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    cfg = private_cfg(
        "model.name=MLP", "model.in_features=6", "model.hidden=[5]", "batch=4",
        f"training.privacy.noise_multiplier={noise}", f"training.privacy.max_grad_norm={clip}",
    )  # fmt: skip
    torch.manual_seed(0)
    raw = build_model(cfg.model, num_classes=3, privacy=cfg.training.privacy)
    privacy = Privacy(cfg.training.privacy, num_samples=40, batch=cfg.batch, seed=cfg.seed, epochs=cfg.epoch)
    model = privacy.wrap_model(raw)
    optimizer = privacy.wrap_optimizer(torch.optim.SGD(raw.parameters(), lr=0.0))
    return raw, model, optimizer


def test_gradients_are_clipped_per_sample_then_noised():
    x, y = torch.randn(6, 6) * 10, torch.tensor([0, 1, 2, 0, 1, 2])
    clip = 0.05  # far below every sample's gradient norm, so every sample is clipped
    raw, model, optimizer = mlp_private(noise=0.0, clip=clip)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    got = [p.grad.clone() for p in raw.parameters()]
    # By hand: each sample's gradient scaled to norm `clip`, summed, divided by the expected batch (4).
    expected = [torch.zeros_like(p) for p in raw.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(raw(x[i : i + 1]), y[i : i + 1]),
                                    list(raw.parameters()))  # fmt: skip
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip
        for e, g in zip(expected, grads, strict=True):
            e += g * (clip / (norm + 1e-6)) / 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # With noise: the difference to the clean gradient is Gaussian with std noise x clip / batch.
    raw, model, optimizer = mlp_private(noise=2.0, clip=clip)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    diff = torch.cat([(p.grad - e).flatten() for p, e in zip(raw.parameters(), expected, strict=True)])
    assert diff.std().item() == pytest.approx(2.0 * clip / 4, rel=0.3)


def test_poisson_draws_depend_on_seed_and_epoch_only():
    a, b = PoissonSampler(200, 20, seed=3), PoissonSampler(200, 20, seed=3)
    sizes = [len(t) for t in a.draws(0).batches]
    assert len(sizes) == 10 and len(set(sizes)) > 1 and 120 < sum(sizes) < 280  # variable, ~N per epoch
    b.set_epoch(0)
    b.set_start(3 * 20)  # a resume after 3 batches continues with the 4th
    assert list(b.batch_sampler()) == [t.tolist() for t in a.draws(0).batches[3:]]
    assert len(b) == 7 * 20
    assert not torch.equal(a.draws(1).batches[0], a.draws(0).batches[0])


def test_refusals_are_one_line_config_errors(monkeypatch):
    cfg = private_cfg()  # the default SimpleCNN has BatchNorm
    with pytest.raises(ConfigError, match=r"BatchNorm.*fix_model=true"):
        check_privacy(
            **privacy_checked_sections(cfg), model=build_model(cfg.model, 10, privacy=cfg.training.privacy)
        )
    fixed = private_cfg("training.privacy.fix_model=true")
    model = build_model(fixed.model, num_classes=10, privacy=fixed.training.privacy)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    check_privacy(**privacy_checked_sections(fixed), model=model)
    for override, words in [
        ("training.accumulate_grad_batches=2", "accumulate_grad_batches"),
        ("training.gradient_clip_norm=1.0", "gradient_clip_norm"),
        ("distributed.strategy=ddp", "distributed"),
        ("training.nan_policy=skip", "nan_policy"),
        ("gpu.precision=16", "fp16"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_privacy(**privacy_checked_sections(private_cfg(override)))
    with pytest.raises(ConfigError, match=r"'training.privacy.max_grad_norm' must be > 0"):
        private_cfg("training.privacy.max_grad_norm=0")
    monkeypatch.setitem(sys.modules, "opacus", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[privacy\]"'):
        check_privacy(**privacy_checked_sections(private_cfg()))


def test_train_py_refuses_a_batchnorm_model_before_writing_anything(tmp_path):
    proc = run_script("train.py", str(BASE), f"output={tmp_path}", *TINY, "training.privacy.enabled=true")
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fix_model=true" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_privacy_settings_without_enabled_are_refused_before_anything_is_written(tmp_path):
    """A user who writes a privacy setting expects privacy: training without it would be the silent lie."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        f"__base__: {ROOT / 'config' / 'dummy.yaml'}\ntraining:\n  privacy:\n    noise_multiplier: 2.0\n"
    )
    out = tmp_path / "out"
    proc = run_script("train.py", str(exp), f"output={out}", *TINY)
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for words in (
        "'training.privacy.noise_multiplier' is set (in",
        "exp.yaml",
        "enabled=true",
        "enabled: false",
    ):
        assert words in errors[0], errors[0]
    assert not out.exists()
    # Saying so is a choice: enabled false beside the setting (as the template's defaults and every
    # saved config.yaml write the section), or enabled true.
    assert not load_config(exp, ["training.privacy.enabled=false"]).training.privacy.enabled
    exp.write_text(exp.read_text() + "    enabled: false\n")
    assert load_config(exp).training.privacy.noise_multiplier == 2.0
    with pytest.raises(
        ConfigError, match=r"'training.privacy.target_epsilon' is set \(in the command line\)"
    ):
        load_config(exp, ["training.privacy.target_epsilon=3"])  # later than the file's enabled: false
    assert load_config(BASE, ["training.privacy.enabled=true", "training.privacy.noise_multiplier=2"])


def _one_noisy_step(secure: bool, noise: float = 1.0) -> list[torch.Tensor]:
    """The gradient after one DP step with noise from the same global RNG state every time."""
    cfg = private_cfg("model.name=MLP", "model.in_features=6", "model.hidden=[5]", "batch=4",
                      f"training.privacy.noise_multiplier={noise}", f"training.privacy.secure_mode={secure}")  # fmt: skip
    torch.manual_seed(0)
    raw = build_model(cfg.model, num_classes=3, privacy=cfg.training.privacy)
    privacy = Privacy(cfg.training.privacy, num_samples=40, batch=cfg.batch, seed=cfg.seed, epochs=cfg.epoch)
    model = privacy.wrap_model(raw)
    optimizer = privacy.wrap_optimizer(torch.optim.SGD(raw.parameters(), lr=0.0))
    torch.manual_seed(1)
    torch.nn.functional.cross_entropy(model(torch.ones(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    return [p.grad.clone() for p in raw.parameters()]


def test_secure_mode_noise_cannot_be_recomputed_from_the_seed():
    plain = [_one_noisy_step(secure=False) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*plain, strict=True))  # reproducible: the seed gives it away
    secure = [_one_noisy_step(secure=True) for _ in range(2)]
    assert not any(torch.equal(a, b) for a, b in zip(*secure, strict=True))
    clean = _one_noisy_step(secure=False, noise=0.0)
    noise = torch.cat([(a - b).flatten() for a, b in zip(secure[0], clean, strict=True)])
    scale = 1.0 * 1.0 / 4  # the same as without secure_mode: noise multiplier x clip / expected batch
    assert noise.std().item() == pytest.approx(scale, rel=0.5)


# ---------------------------------------------------------------------- exact resume mid-epoch
PARTS = slow_mlp_source("PRIVACY_TEST_SLEEP")

# 48 samples, expected batch 8: 6 Poisson draws per epoch (q = 1/6); killed at step 8, in epoch 2.
CONFIG = f"""
__base__: {BASE}
imports: [privacy_parts]
epoch: 3
batch: 8
model: {{name: SlowMLP, in_features: 16, hidden: [16], dropout: 0.2}}
dataset: {{name: SyntheticClassification, input_shape: [16], train_size: 48, val_size: 16, test_size: 16}}
optimizer: {{name: SGD, lr: 0.1, momentum: 0.9}}
training: {{privacy: {{enabled: true, noise_multiplier: 1.1, max_grad_norm: 1.0}}}}
checkpoint: {{save_every_n_steps: 1}}
logging: {{log_frequency: 1, mlflow: false, tensorboard: false, progress_bar: false}}
"""


def epsilons(run: Path) -> list[float]:
    return [m["epsilon"] for m in read_metrics(run) if "epsilon" in m]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_exact_with_the_same_epsilon(tmp_path):
    from opacus.accountants import RDPAccountant

    config, env = user_module_config(tmp_path, "privacy_parts", PARTS, CONFIG)

    ref_out = tmp_path / "ref"
    proc = run_script("train.py", str(config), f"output={ref_out}", env=env)
    assert proc.returncode == 0, explain(proc)
    ref = only_run_dir(ref_out)
    # Epsilon grows every epoch and is Opacus's RDP accountant over every Poisson draw so far.
    logged = epsilons(ref)
    assert len(logged) == 3 and logged[0] < logged[1] < logged[2]
    for epoch, eps in enumerate(logged, start=1):
        accountant = RDPAccountant()
        accountant.history = [(1.1, 8 / 48, 6 * epoch)]
        assert eps == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert f"epsilon = {logged[-1]:.4g} at delta = 1e-05" in (ref / "summary.txt").read_text()

    out = tmp_path / "killed"
    out.mkdir()
    run = start_script("train.py", str(config), f"output={out}", "logging.mlflow=true", "logging.tensorboard=true",
                       log_file=out / "console.log", env={**env, "PRIVACY_TEST_SLEEP": "0.1"})  # fmt: skip
    sigkill_after(run, lambda: wait_for_step(run, out, 8))
    killed = only_run_dir(out)
    assert len(epsilons(killed)) == 1  # killed inside epoch 2
    proc = run_script("train.py", str(killed / "config.yaml"), env=env)
    assert proc.returncode == 0, explain(proc)

    def ckpt(run: Path) -> dict:
        return torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)

    got, want = ckpt(killed), ckpt(ref)
    assert_same_states(got, want, ("model", "optimizer", "privacy", "rng"))
    assert epsilons(killed)[-2:] == logged[-2:]

    # The same epsilon per epoch, each once, in MLflow and TensorBoard across the kill.
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (mlflow_run,) = client.search_runs(
        [client.get_experiment_by_name("SyntheticClassification").experiment_id]
    )
    history = sorted(client.get_metric_history(mlflow_run.info.run_id, "epsilon"), key=lambda m: m.step)
    assert [m.value for m in history] == logged
    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("epsilon")] == pytest.approx(logged, rel=1e-6)


def test_target_epsilon_picks_the_noise_that_spends_it_by_the_last_epoch():
    cfg = private_cfg("epoch=3", "batch=8", "training.privacy.target_epsilon=2.0")
    privacy = Privacy(cfg.training.privacy, num_samples=48, batch=cfg.batch, seed=cfg.seed, epochs=cfg.epoch)
    assert privacy.noise_multiplier > 1.1
    privacy._account(3 * 6)  # every draw of three epochs
    assert privacy.epsilon() == pytest.approx(2.0, abs=0.02)
    assert privacy.epsilon() <= 2.0
