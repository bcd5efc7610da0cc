"""Differentially private training (`training.privacy`) with Opacus: DP-SGD on one process.

Each step draws a Poisson batch (every sample joins independently with probability q = batch / N),
clips every sample's gradient to `max_grad_norm`, adds Gaussian noise of std
`noise_multiplier x max_grad_norm` to the sum and divides by the expected batch. An RDP accountant
turns (noise, q, steps) into the epsilon spent so far, logged every epoch.

Resume is exact without saving a sampler: an epoch's draws are a function of (seed, epoch) only, so a
resumed run redraws them and skips the batches already trained; the noise comes from torch's global
generator, which every checkpoint saves; the accountant's history is saved beside it. So whoever holds
the seed or a checkpoint can recompute the noise: `secure_mode` draws it instead from a generator that
nothing saved can reproduce (torchcsprng where installed, as Opacus does; otherwise reseeded from the
OS's entropy before every step), with Opacus' noise formula that resists floating-point attacks.
An empty draw (probability (1 - q)^N, about e^-batch) takes no step; the accountant still counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from src.errors import ConfigError
from src.models.private import opacus as _opacus

log = logging.getLogger("template")


def privacy_enabled(section: Any) -> bool:
    """`section`: the config's training.privacy, or None where the config has none."""
    return bool(section is not None and section.get("enabled", False))


def check_privacy(
    *,
    training: Any,
    model_cfg: Any,
    optimizer: Any,
    gpu: Any,
    distributed: Any,
    distillation: Any,
    model: nn.Module | None = None,
) -> None:
    """Refuse, before a result directory exists, what DP-SGD cannot do here; `model` may be on meta.

    DP-SGD rules out settings all over the config, so each section it reads comes by its name (the
    config's training, model, optimizer, gpu, distributed and distillation; distillation may be None).
    """
    if not privacy_enabled(training.get("privacy")):
        return
    _opacus()
    from src.config.schema import PRECISIONS
    from src.distributed.process_group import launched_by_torchrun

    strategy = str(distributed.strategy)
    gpus = [g for g in str(gpu.use).split(",") if g.strip()]
    refusals = [
        (launched_by_torchrun() or strategy in ("dp", "ddp", "fsdp"),
         f"distributed training (distributed.strategy={strategy}); train on one process"),
        (strategy == "auto" and len(gpus) > 1 and not launched_by_torchrun(),
         f"DataParallel over gpu.use={gpu.use}; use one GPU"),
        (int(training.accumulate_grad_batches) != 1,
         "training.accumulate_grad_batches > 1; raise batch instead (the expected Poisson batch)"),
        (float(training.gradient_clip_norm) > 0,
         "training.gradient_clip_norm (per-sample clipping is training.privacy.max_grad_norm); set it to 0"),
        (training.nan_policy == "skip",
         "training.nan_policy=skip (a data-dependent skip leaks); use nan_policy=stop"),
        (bool(model_cfg.get("compile", False)), "model.compile; set model.compile=false"),
        (bool(training.unfreeze) or bool(training.freeze_backbone_epochs),
         "training.unfreeze / freeze_backbone_epochs; freeze with model.freeze only"),
        (distillation is not None and bool(distillation.get("teacher")),
         "distillation (the teacher's view of the data is not accounted); set distillation.teacher=null"),
        (PRECISIONS.get(str(gpu.get("precision")).lower()) == "16",
         "fp16 precision (its loss scaling bypasses per-sample clipping); use gpu.precision=bf16 or 32"),
        ("schedulefree" in str(optimizer.get("name", "")).lower(),
         f"the schedule-free optimizer {optimizer.get('name')}; use e.g. SGD or AdamW"),
    ]  # fmt: skip
    for bad, what in refusals:
        if bad:
            raise ConfigError(f"training.privacy does not support {what}")
    if model is not None:  # the numbers' ranges are checked with the rest of the config (schema RANGES)
        validate_model(model)  # build_model already applied fix_model


def validate_model(model: nn.Module) -> None:
    """Opacus needs per-sample gradients: BatchNorm mixes samples, and some layers have no grad sampler."""
    from opacus.validators import ModuleValidator

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            "training.privacy: the model has BatchNorm, which mixes samples and so breaks per-sample "
            "privacy; set training.privacy.fix_model=true (Opacus swaps in GroupNorm) or use a GroupNorm model"
        )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"training.privacy: Opacus cannot train this model: {errors[0]}")


@dataclass
class PoissonDraws:
    """One epoch's Poisson batches (non-empty ones) and how many draws came out empty."""

    batches: list[torch.Tensor]
    empty: int


class PoissonSampler:
    """Stands where the trainer keeps its sampler: set_epoch, set_start (in samples) and a length.

    The DataLoader iterates `batch_sampler()`, a view of the same draws. The length is in
    samples (non-empty batches x batch) so the trainer counts the right number of batches.
    """

    def __init__(self, num_samples: int, batch: int, seed: int) -> None:
        self.num_samples, self.batch, self.seed = num_samples, batch, seed
        self.sample_rate = min(1.0, batch / num_samples)
        self.steps = max(1, num_samples // batch)  # draws per epoch: an epoch sees N samples on average
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, PoissonDraws] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, samples: int) -> None:
        self.start = samples // self.batch  # batches already trained this epoch

    def draws(self, epoch: int) -> PoissonDraws:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches, empty = [], 0
            for _ in range(self.steps):
                chosen = (torch.rand(self.num_samples, generator=g) < self.sample_rate).nonzero().flatten()
                if len(chosen):
                    batches.append(chosen)
                else:
                    empty += 1
            self._cache = (epoch, PoissonDraws(batches, empty))
        return self._cache[1]

    @property
    def total(self) -> int:
        """This epoch's samples from its first batch, in the trainer's units (batches x batch)."""
        return len(self.draws(self.epoch).batches) * self.batch

    def __len__(self) -> int:
        return max(0, len(self.draws(self.epoch).batches) - self.start) * self.batch

    def batch_sampler(self) -> _BatchView:
        return _BatchView(self)


class _BatchView:
    def __init__(self, sampler: PoissonSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        s = self.sampler
        for chosen in s.draws(s.epoch).batches[s.start :]:
            yield chosen.tolist()

    def __len__(self) -> int:
        return self.sampler.steps


class Privacy:
    """DP-SGD pieces for the trainer; each method is one hook in src/engine/trainer.py."""

    def __init__(self, section: Any, num_samples: int, batch: int, seed: int, epochs: int) -> None:
        """`section`: training.privacy; `batch` (the expected Poisson batch), `seed` and `epochs` of the run."""
        from opacus.accountants import RDPAccountant

        self.max_grad_norm = float(section.max_grad_norm)
        self.delta = float(section.target_delta)
        self.sampler = PoissonSampler(num_samples, int(batch), int(seed))
        self.batch = int(batch)
        self.noise_multiplier = float(section.noise_multiplier)
        self.secure = bool(section.get("secure_mode", False))
        self.generator: torch.Generator | None = None  # secure_mode: made beside the parameters
        self.reseeding = False  # the generator is a plain torch one, given OS entropy before each step
        if section.get("target_epsilon") is not None:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=float(section.target_epsilon), target_delta=self.delta,
                sample_rate=self.sampler.sample_rate, steps=self.sampler.steps * int(epochs), accountant="rdp",
            )  # fmt: skip
        self.accountant = RDPAccountant()
        log.info(
            "private training: noise multiplier %.4g, max grad norm %g, Poisson sample rate %.4g, delta %g%s",
            self.noise_multiplier, self.max_grad_norm, self.sampler.sample_rate, self.delta,
            ", secure noise (not reproducible: a resume is not bit-exact)" if self.secure else "",
        )  # fmt: skip

    # --- hooks, in the order the trainer calls them
    def check_model(self, model: nn.Module) -> None:
        """Right after build_model (which already applied fix_model): a layer Opacus cannot train is refused."""
        validate_model(model)

    def poisson_split(self, split: Any) -> Any:
        """The train split with a Poisson batch sampler in a loader that keeps the worker settings."""
        import dataclasses

        old = split.loader
        extra = {"persistent_workers": old.persistent_workers, "prefetch_factor": old.prefetch_factor}
        loader = torch.utils.data.DataLoader(
            split.dataset, batch_sampler=self.sampler.batch_sampler(), num_workers=old.num_workers,
            collate_fn=old.collate_fn, pin_memory=old.pin_memory, worker_init_fn=old.worker_init_fn,
            generator=old.generator, **(extra if old.num_workers else {}),
        )  # fmt: skip
        return dataclasses.replace(split, sampler=self.sampler, loader=loader)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """After prepare_model: per-sample gradients (the raw model and its state dict stay as they are)."""
        import warnings

        from opacus import GradSampleModule

        # The first layer's input needs no gradient, so torch says its backward hook sees outputs only: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return GradSampleModule(model, batch_first=True, loss_reduction="mean")

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """After the scheduler is built: clip per sample, add noise, count the step."""
        from opacus.optimizers import DPOptimizer

        if self.secure:
            device = next(p.device for group in optimizer.param_groups for p in group["params"])
            self.generator, self.reseeding = secure_generator(device)
        dp = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.batch, loss_reduction="mean", generator=self.generator,
            secure_mode=self.secure,
        )  # fmt: skip
        dp.attach_step_hook(lambda _: self._stepped())
        return dp

    def _stepped(self) -> None:
        """After a step's noise: count the step; a secure generator gets fresh entropy for the next one."""
        self._account(1)
        if self.reseeding:
            reseed(self.generator)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Count the epoch's empty draws (no step was taken for them) and report epsilon."""
        self._account(self.sampler.draws(epoch).empty)
        return {"epsilon": self.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.accountant.history]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            from src.errors import RunError

            raise RunError(
                "this checkpoint was not written by a private run; resume it without training.privacy"
            )
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]

    # --- accounting
    def _account(self, draws: int) -> None:
        for _ in range(draws):
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sampler.sample_rate)

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(delta=self.delta)) if self.accountant.history else 0.0

    def summary(self) -> str:
        return (
            f"epsilon = {self.epsilon():.4g} at delta = {self.delta:g} "
            f"(noise multiplier {self.noise_multiplier:.4g}, max grad norm {self.max_grad_norm:g})"
        )


def secure_generator(device: torch.device) -> tuple[torch.Generator, bool]:
    """(generator, whether to reseed it each step) for noise that neither the seed nor a checkpoint
    reproduces: torchcsprng's /dev/urandom generator, which Opacus' PrivacyEngine uses for secure_mode,
    or else a torch generator on `device` reseeded from the OS's entropy."""
    try:
        import torchcsprng  # type: ignore[import-not-found]

        return torchcsprng.create_random_device_generator("/dev/urandom"), False
    except ImportError:  # no build of it for current torch releases
        return reseed(torch.Generator(device=device)), True


def reseed(generator: torch.Generator) -> torch.Generator:
    """Fresh 64 bits from the operating system: the next draws follow from nothing the run saved."""
    import os

    return generator.manual_seed(int.from_bytes(os.urandom(8), "little"))


def build_privacy(
    section: Any, num_samples: int, precision: str, batch: int, seed: int, epochs: int
) -> Privacy | None:
    """None unless training.privacy (`section`) is enabled; `precision` is the one resolved for this device.

    The settings are checked with `check_privacy` first, by the caller that holds the whole config
    (src/engine/build.py's `build_privacy`: a resumed config may differ from the one checked before).
    """
    if not privacy_enabled(section):
        return None
    if precision == "16":  # gpu.mixed_precision chose fp16 on this GPU
        raise ConfigError("training.privacy does not support fp16 precision; set gpu.precision=bf16 or 32")
    return Privacy(section, num_samples, batch, seed, epochs)
