"""Per-noise-level evaluations during training: denoising error (paper eq. 5) and one-step memorization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from calmwild.evaluation import (
    check_count,
    check_sigmas,
    first_images,
    memorization_report,
    mse_report,
    plot_per_sigma_memorization,
    plot_per_sigma_mse,
)
from calmwild.memorization import (
    RatioTestResult,
    check_threshold,
    per_sigma_errors,
    per_sigma_ratio_tests,
    summarize_errors,
    summarize_ratio_tests,
)
from callbacks.base import Context, Curve, Evaluation, EvaluationCallback


class _PerSigmaCallback(EvaluationCallback):
    """Shared arguments of the per-sigma callbacks: sigma grid, images, seeded noises, batch size."""

    def __init__(
        self,
        sigmas: Sequence[float] | None,
        num_images: int,
        num_noises: int,
        seed: int,
        batch_size: int,
        every_n_steps: int,
        at_train_end: bool,
        name: str | None,
    ):
        super().__init__(every_n_steps=every_n_steps, at_train_end=at_train_end, name=name)
        self.sigmas = check_sigmas(sigmas)
        self.num_images = check_count(num_images, "num_images")
        self.num_noises = check_count(num_noises, "num_noises")
        self.seed = check_count(seed, "seed", 0)
        self.batch_size = check_count(batch_size, "batch_size")

    def settings(self) -> dict[str, Any]:
        return {"sigmas": [round(s, 6) for s in self.sigmas], "num_images": self.num_images,
                "num_noises": self.num_noises, "seed": self.seed}

    def _items(self, ctx: Context, images: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Total items (image, noise) of ``images`` and this rank's contiguous slice of item ids."""
        total = images.shape[0] * self.num_noises
        start, stop = self.shard(ctx, total)
        return total, torch.arange(start, stop)


class PerSigmaMSE(_PerSigmaCallback):
    """Per-noise-level denoising error of the EMA network on training and held-out images (paper eq. 5, per pixel):
    MSE(sigma) = E ||D(x0 + sigma n; sigma) - x0||^2 / d over the first ``num_images`` images of each set, with the
    same seeded noises on both sets. Logs ``mse/train/sigma_X``, ``mse/heldout/sigma_X`` and ``mse/gap/sigma_X``
    (held-out minus train), X the sigma to 3 significant digits.

    Args:
        sigmas: noise levels; default EDM's 18-step sampling schedule (80 ... 0.002).
        num_images: at most this many images (the first ones) of the training and of the held-out set.
        num_noises: seeded noise draws per image.
        seed: noise seed (the noise of (image i, draw j) depends only on seed, i, j).
        batch_size: denoiser batch size.
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default per_sigma_mse).
    """

    def __init__(
        self,
        sigmas: list[float] | None = None,
        num_images: int = 256,
        num_noises: int = 1,
        seed: int = 0,
        batch_size: int = 256,
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        name: str | None = None,
    ):
        super().__init__(sigmas, num_images, num_noises, seed, batch_size, every_n_steps, at_train_end, name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        denoiser = pl_module.ema_denoiser()
        datamodule = trainer.datamodule
        curves = {}
        for split, images in (("train", datamodule.train_images), ("heldout", datamodule.heldout_images)):
            images = first_images(images, self.num_images)
            total, items = self._items(ctx, images)
            errors = per_sigma_errors(denoiser, images, self.sigmas, self.num_noises, self.seed, self.batch_size,
                                      items=items, device=ctx.device)  # [S, shard]
            errors = self.gather(pl_module, ctx, errors.T.contiguous(), total).T
            curves[split] = summarize_errors(self.sigmas, errors, torch.arange(total), self.num_noises)
        if ctx.rank != 0:
            return None
        section, metrics = mse_report(curves["train"], curves["heldout"])
        snapshot = Curve(xs=section["sigmas"], ys={"train": curves["train"].mse.tolist(),
                                                   "heldout": curves["heldout"].mse.tolist()},
                         title="per-pixel MSE against sigma")
        return Evaluation(metrics, {"per_sigma_mse": section},
                          figure=plot_per_sigma_mse(curves["train"], curves["heldout"]),
                          curves={"mse/curve": snapshot})


class PerSigmaMemorization(_PerSigmaCallback):
    """Per-noise-level memorization (PAPER_NOTES 2): the fraction of (held-out image, noise) pairs whose one-step
    EMA denoising D(x + sigma n; sigma) passes the ratio test d1/d2 < ``threshold`` against the training set.
    Logs ``mem/sigma_X`` per sigma, ``mem/peak_rate`` and ``mem/peak_sigma``.

    Args:
        sigmas: noise levels; default EDM's 18-step sampling schedule (80 ... 0.002).
        num_images: at most this many held-out images (the first ones).
        num_noises: seeded noise draws per image.
        threshold: ratio-test threshold in (0, 1) (paper: 1/3).
        seed: noise seed.
        batch_size: denoiser batch size.
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default per_sigma_memorization).
    """

    def __init__(
        self,
        sigmas: list[float] | None = None,
        num_images: int = 256,
        num_noises: int = 1,
        threshold: float = 1 / 3,
        seed: int = 0,
        batch_size: int = 256,
        every_n_steps: int = 1000,
        at_train_end: bool = True,
        name: str | None = None,
    ):
        super().__init__(sigmas, num_images, num_noises, seed, batch_size, every_n_steps, at_train_end, name)
        self.threshold = check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        datamodule = trainer.datamodule
        heldout = first_images(datamodule.heldout_images, self.num_images)
        train = datamodule.train_images.to(ctx.device)
        total, items = self._items(ctx, heldout)
        tests = per_sigma_ratio_tests(pl_module.ema_denoiser(), heldout, train, self.sigmas, self.num_noises,
                                      self.seed, self.batch_size, self.threshold, items=items, device=ctx.device)
        tests = RatioTestResult(*(self.gather(pl_module, ctx, field.T.contiguous(), total).T for field in tests))
        if ctx.rank != 0:
            return None
        result = summarize_ratio_tests(self.sigmas, tests, torch.arange(total), self.num_noises, self.threshold)
        section, metrics = memorization_report(result)
        snapshot = Curve(xs=section["sigmas"], ys={"rate": section["rate"]},
                         title="memorization rate against sigma")
        return Evaluation(metrics, {"per_sigma_memorization": section}, figure=plot_per_sigma_memorization(result),
                          curves={"mem/curve": snapshot})
