"""Per-noise-level evaluations during training: denoising error (paper eq. 5) and one-step memorization (Section 3,
Fig. 2). The computation is :mod:`calmwild.evaluation`'s; these callbacks schedule it, shard it and log it."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure

from calmwild.checks import check_threshold
from calmwild.evaluation import evaluate_per_sigma_memorization, evaluate_per_sigma_mse
from calmwild.memorization.ratio import RATIO_THRESHOLD
from calmwild.settings import PerSigmaSettings
from callbacks.base import Context, Curve, Evaluation, EvaluationCallback


class _PerSigmaCallback(EvaluationCallback):
    """Shared arguments of the per-sigma callbacks: the items (sigma grid, images, seeded noises, batch size)."""

    def __init__(self, per_sigma: PerSigmaSettings, every_n_steps: int, at_train_end: bool, name: str | None):
        super().__init__(every_n_steps=every_n_steps, at_train_end=at_train_end, name=name)
        if not isinstance(per_sigma, PerSigmaSettings):
            raise TypeError(f"per_sigma must be PerSigmaSettings, got {type(per_sigma).__name__}")
        self.per_sigma = per_sigma

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.per_sigma.to_dict().items() if k != "batch_size"}  # batching changes nothing

    @staticmethod
    def at_step(figure: Figure, ctx: Context) -> Figure:
        """The library's per-sigma plot, its title saying which weights it shows."""
        ax = figure.axes[0]
        ax.set_title(f"{ax.get_title()}\nEMA weights at step {ctx.step}", fontsize=10)
        return figure


class PerSigmaMSE(_PerSigmaCallback):
    """Per-noise-level denoising error of the EMA network on training and held-out images (paper eq. 5, per pixel):
    MSE(sigma) = E ||D(x0 + sigma n; sigma) - x0||^2 / d over the first ``per_sigma.num_images`` images of each set,
    with the same seeded noises on both sets. Logs ``mse/train/sigma_X``, ``mse/heldout/sigma_X`` and
    ``mse/gap/sigma_X`` (held-out minus train), X the sigma to 3 significant digits.

    Args:
        per_sigma: the items: noise levels (default EDM's 18-step schedule), images per set, noises per image,
            noise seed, batch size (:class:`calmwild.settings.PerSigmaSettings`).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default per_sigma_mse).
    """

    metric_prefixes = ("mse/",)

    def __init__(self, per_sigma: PerSigmaSettings = PerSigmaSettings(), every_n_steps: int = 1000,
                 at_train_end: bool = True, name: str | None = None):
        super().__init__(per_sigma, every_n_steps, at_train_end, name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        part = evaluate_per_sigma_mse(pl_module.ema_denoiser(), self.cached_train(trainer, ctx),
                                      self.cached_heldout(trainer, ctx), self.per_sigma, ctx.device,
                                      (ctx.rank, ctx.world_size), self.gatherer(pl_module, ctx))
        if ctx.rank != 0:
            return None
        section = part.section
        train, heldout = section["train"]["mse_per_pixel"], section["heldout"]["mse_per_pixel"]
        curve = Curve(xs=section["sigmas"], ys={"train": train, "heldout": heldout,
                                                "gap": [h - t for h, t in zip(heldout, train)]},
                      title="per-pixel MSE", log_values=True)
        return Evaluation(part.metrics, {"per_sigma_mse": section}, figure=self.at_step(part.figure, ctx),
                          curves={"mse/curve": curve})


class PerSigmaMemorization(_PerSigmaCallback):
    """Per-noise-level memorization (paper Section 3): the fraction of (held-out image, noise) pairs whose one-step
    EMA denoising D(x + sigma n; sigma) passes the ratio test d1/d2 < ``threshold`` against the training set.
    Logs ``mem/sigma_X`` per sigma, ``mem/peak_rate`` and ``mem/peak_sigma`` (NaN when nothing is memorized).

    Args:
        per_sigma: the items (:class:`calmwild.settings.PerSigmaSettings`; held-out images only).
        threshold: ratio-test threshold in (0, 1) (paper: 1/3).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default per_sigma_memorization).
    """

    metric_prefixes = ("mem/",)

    def __init__(self, per_sigma: PerSigmaSettings = PerSigmaSettings(), threshold: float = RATIO_THRESHOLD,
                 every_n_steps: int = 1000, at_train_end: bool = True, name: str | None = None):
        super().__init__(per_sigma, every_n_steps, at_train_end, name)
        self.threshold = check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        part = evaluate_per_sigma_memorization(pl_module.ema_denoiser(), self.cached_heldout(trainer, ctx),
                                               self.cached_train(trainer, ctx), self.per_sigma, self.threshold,
                                               ctx.device, (ctx.rank, ctx.world_size), self.gatherer(pl_module, ctx))
        if ctx.rank != 0:
            return None
        curve = Curve(xs=part.section["sigmas"], ys={"rate": part.section["rate"]},
                      title="per-sigma memorization rate")
        return Evaluation(part.metrics, {"per_sigma_memorization": part.section}, figure=self.at_step(part.figure, ctx),
                          curves={"mem/curve": curve})
