"""Per-noise-level evaluations during training: denoising error (paper eq. 5) and one-step memorization (Section 3,
Fig. 2). The computation is :mod:`calmwild.evaluation`'s; these callbacks schedule it, shard it and log it.

Both metrics denoise the same held-out items. When a PerSigmaMSE and a PerSigmaMemorization with the same items
evaluate at the same point, the first of them to run computes both results in one pass
(:func:`calmwild.evaluation.evaluate_per_sigma`) and hands the other its result for that point."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure

from calmwild.checks import check_threshold
from calmwild.evaluation import Part, evaluate_per_sigma
from calmwild.memorization.ratio import RATIO_THRESHOLD
from calmwild.settings import PerSigmaSettings
from callbacks.base import Context, Curve, Evaluation, EvaluationCallback


class _PerSigmaCallback(EvaluationCallback):
    """Shared arguments of the per-sigma callbacks (the items: sigma grid, images, seeded noises, batch size) and the
    one held-out pass they share at a common evaluation point."""

    threshold: float | None = None  # the ratio-test threshold of a memorization callback
    computes: ClassVar[str]  # the field of calmwild.evaluation.PerSigmaParts this callback reports

    def __init__(self, per_sigma: PerSigmaSettings, every_n_steps: int, at_train_end: bool, name: str | None):
        super().__init__(every_n_steps=every_n_steps, at_train_end=at_train_end, name=name)
        if not isinstance(per_sigma, PerSigmaSettings):
            raise TypeError(f"per_sigma must be PerSigmaSettings, got {type(per_sigma).__name__}")
        self.per_sigma = per_sigma
        self._handed: tuple[tuple[int, str], Part | None] | None = None  # (point, result) computed by a partner

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.per_sigma.to_dict().items() if k != "batch_size"}  # batching changes nothing

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._handed = None

    @staticmethod
    def at_step(figure: Figure, ctx: Context) -> Figure:
        """The library's per-sigma plot, its title saying which weights it shows."""
        ax = figure.axes[0]
        ax.set_title(f"{ax.get_title()}\nEMA weights at step {ctx.step}", fontsize=10)
        return figure

    def part(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Part | None:
        """This callback's result at ``ctx`` (on every rank): handed over by a partner that computed it at this point,
        else computed here together with what every partner due at this point needs (:meth:`_partners`)."""
        point = (ctx.step, ctx.phase)
        if self._handed is not None and self._handed[0] == point:
            part, self._handed = self._handed[1], None
            return part
        partners = self._partners(trainer, ctx.phase)
        group = [self, *partners]
        thresholds = [cb.threshold for cb in group if cb.threshold is not None]
        parts = evaluate_per_sigma(
            pl_module.ema_denoiser(), self.cached_train(trainer, ctx), self.cached_heldout(trainer, ctx),
            self.per_sigma, thresholds[0] if thresholds else RATIO_THRESHOLD, device=ctx.device,
            shard=(ctx.rank, ctx.world_size), gather=self.gatherer(pl_module, ctx),
            mse=any(cb.computes == "mse" for cb in group), memorization=bool(thresholds))
        for partner in partners:
            partner._handed = (point, getattr(parts, partner.computes))
        return getattr(parts, self.computes)

    def _partners(self, trainer: Trainer, phase: str) -> list[_PerSigmaCallback]:
        """The other per-sigma callbacks of ``trainer`` due at this point with the same items (sigmas, images,
        noises, seed: :meth:`PerSigmaSettings.items_key`) and, among memorization callbacks, the same threshold as
        this one."""
        partners, threshold, items = [], self.threshold, self.per_sigma.items_key()
        for callback in trainer.callbacks:
            if (callback is self or not isinstance(callback, _PerSigmaCallback)
                    or callback.per_sigma.items_key() != items or not callback.due(trainer, phase)):
                continue
            if callback.threshold is not None:
                if threshold is not None and callback.threshold != threshold:
                    continue
                threshold = callback.threshold
            partners.append(callback)
        return partners


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
    computes = "mse"

    def __init__(self, per_sigma: PerSigmaSettings = PerSigmaSettings(), every_n_steps: int = 1000,
                 at_train_end: bool = True, name: str | None = None):
        super().__init__(per_sigma, every_n_steps, at_train_end, name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        part = self.part(trainer, pl_module, ctx)
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
    computes = "memorization"

    def __init__(self, per_sigma: PerSigmaSettings = PerSigmaSettings(), threshold: float = RATIO_THRESHOLD,
                 every_n_steps: int = 1000, at_train_end: bool = True, name: str | None = None):
        super().__init__(per_sigma, every_n_steps, at_train_end, name)
        self.threshold = check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        part = self.part(trainer, pl_module, ctx)
        if ctx.rank != 0:
            return None
        curve = Curve(xs=part.section["sigmas"], ys={"rate": part.section["rate"]},
                      title="per-sigma memorization rate")
        return Evaluation(part.metrics, {"per_sigma_memorization": part.section}, figure=self.at_step(part.figure, ctx),
                          curves={"mem/curve": curve})
