"""Evaluations of generated samples during training: trajectory memorization, FID/KID and a nearest-neighbour grid.

All three draw their samples through :meth:`EvaluationCallback.shared_samples`: at one evaluation point, callbacks
with the same sampler settings share one set of samples (sample i from seed + i; a callback asking for fewer
samples reuses the first ones of a larger set on one process). Each rank generates its contiguous slice. The
computation is :mod:`calmwild.evaluation`'s; these callbacks schedule it, shard it and log it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from matplotlib.figure import Figure

from calmwild.checks import check_count, check_threshold
from calmwild.data.base import InMemoryImageDataModule
from calmwild.evaluation import evaluate_trajectory_memorization, quality_part
from calmwild.features import build_feature_extractor, extract_features, extractor_identity
from calmwild.fid import ReferenceStats
from calmwild.references import SPLITS, load_reference
from calmwild.memorization.ratio import RATIO_THRESHOLD, RatioTestResult, ratio_test
from calmwild.memorization.report import nearest_pairs_grid
from calmwild.settings import FIDSettings, SamplingSettings
from callbacks.base import EVALUATED_STAGES, PHASE_TEST, Context, Evaluation, EvaluationCallback


class _SampleCallback(EvaluationCallback):
    """Shared arguments of the sample-based callbacks: how many samples, and the sampler that makes them."""

    def __init__(self, num_samples: int, sampling: SamplingSettings, every_n_steps: int, at_train_end: bool,
                 name: str | None, min_samples: int = 1):
        super().__init__(every_n_steps=every_n_steps, at_train_end=at_train_end, name=name)
        self.num_samples = check_count(num_samples, "num_samples", min_samples)
        if not isinstance(sampling, SamplingSettings):
            raise TypeError(f"sampling must be SamplingSettings, got {type(sampling).__name__}")
        self.sampling = sampling

    def settings(self) -> dict[str, Any]:
        sampler = {k: v for k, v in self.sampling.to_dict().items() if k != "batch_size"}  # batching changes nothing
        return {"num_samples": self.num_samples, **sampler}

    def check_world(self, world_size: int) -> None:
        if self.num_samples < world_size:
            raise ValueError(f"{type(self).__name__}: num_samples={self.num_samples} cannot be split over "
                             f"{world_size} processes; use at least one sample per process")

    def my_samples(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> torch.Tensor:
        """This rank's contiguous slice of the ``num_samples`` samples (CPU float32)."""
        start, stop = self.shard(ctx, self.num_samples)
        return self.shared_samples(trainer, pl_module, ctx, start, stop, self.sampling)


class _RatioTestCallback(_SampleCallback):
    """A sample callback that judges each sample with the ratio test d1/d2 < ``threshold``."""

    def __init__(self, num_samples: int, threshold: float, sampling: SamplingSettings, every_n_steps: int,
                 at_train_end: bool, name: str | None):
        super().__init__(num_samples, sampling, every_n_steps, at_train_end, name)
        self.threshold = check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "threshold": self.threshold}


class TrajectoryMemorization(_RatioTestCallback):
    """Trajectory-level memorization (paper Section 3): the fraction of EMA samples (EDM ODE from pure noise) whose
    d1/d2 against the training set is below ``threshold``, with its binomial standard error. Logs
    ``traj_mem/rate``, ``traj_mem/stderr`` and ``traj_mem/num_samples``; the step's PNG is the d1/d2 histogram.

    Args:
        num_samples: samples per evaluation (split over DDP ranks).
        threshold: ratio-test threshold in (0, 1) (paper: 1/3).
        sampling: the sampler (:class:`calmwild.settings.SamplingSettings`: steps, solver, seed, batch size, ...).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default trajectory_memorization).
    """

    metric_prefixes = ("traj_mem/",)

    def __init__(self, num_samples: int = 1024, threshold: float = RATIO_THRESHOLD,
                 sampling: SamplingSettings = SamplingSettings(), every_n_steps: int = 1000, at_train_end: bool = True,
                 name: str | None = None):
        super().__init__(num_samples, threshold, sampling, every_n_steps, at_train_end, name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        part, _ = evaluate_trajectory_memorization(
            self.my_samples(trainer, pl_module, ctx), self.cached_train(trainer, ctx), self.num_samples,
            self.threshold, f"EMA samples at step {ctx.step}", ctx.device, self.gatherer(pl_module, ctx))
        if ctx.rank != 0:
            return None
        return Evaluation(part.metrics, {"trajectory_memorization": part.section}, figure=part.figure)


class FID(_SampleCallback):
    """Sample quality of the EMA samples against a reference set: the Frechet distance with Inception features (FID)
    and the kernel distance beside it (KID, unbiased: the figure to report at about a thousand samples), logged as
    ``fid/value``, ``fid/num_samples``, ``kid/value``, ``kid/std``, ``kid/num_samples`` and ``kid/subset_size``
    (:func:`calmwild.fid.quality_report`; KID is absent against a ``.npz`` of statistics, which holds no features).

    The reference (``fid.reference``, :mod:`calmwild.references`) is the training or held-out set of the run's
    datamodule, or of ``reference_data`` when given (the paper's 2k-car runs are scored against 5k training cars);
    an image folder; a ``.npz`` of statistics (NVlabs/edm's format); or a dataset registered with torch-fidelity.
    ``calmwild test`` scores against the held-out set where the reference is ``train``.

    Each rank extracts the features of its slice of samples; the features are gathered and FID/KID computed on rank
    0. Reference statistics are computed once (rank 0, first evaluation) and cached on disk under a content key of
    the reference images and the feature extractor; the key is kept in the callback state and a resumed run warns if
    its reference no longer matches. The step's PNG is FID (and KID) against the training step so far.

    Args:
        num_samples: samples per evaluation (split over DDP ranks; at least 2).
        fid: feature extractor, its weights, the reference and the cache directory (default <run dir>/fid_cache)
            (:class:`calmwild.settings.FIDSettings`).
        sampling: the sampler (:class:`calmwild.settings.SamplingSettings`).
        reference_data: a datamodule whose ``train`` / ``heldout`` images are the reference (default: the run's).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default fid).
    """

    metric_prefixes = ("fid/", "kid/")

    def __init__(self, num_samples: int = 1024, fid: FIDSettings = FIDSettings(),
                 sampling: SamplingSettings = SamplingSettings(), reference_data: InMemoryImageDataModule | None = None,
                 every_n_steps: int = 1000, at_train_end: bool = True, name: str | None = None):
        super().__init__(num_samples, sampling, every_n_steps, at_train_end, name, min_samples=2)
        if not isinstance(fid, FIDSettings):
            raise TypeError(f"fid must be FIDSettings, got {type(fid).__name__}")
        if reference_data is not None and not isinstance(reference_data, InMemoryImageDataModule):
            raise TypeError(f"reference_data must be a calmwild datamodule, got {type(reference_data).__name__}")
        self.fid = fid
        self.reference_data = reference_data
        self.reference_key: str | None = None
        self._extractor: torch.nn.Module | None = None
        self._references: dict[str, ReferenceStats] = {}

    def settings(self) -> dict[str, Any]:
        reference_data = None if self.reference_data is None else self.reference_data.configuration()
        return {**super().settings(), "reference": self.fid.reference, "reference_data": reference_data,
                "feature_extractor": self.fid.feature_extractor}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reference_key": self.reference_key}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reference_key = state_dict.get("reference_key")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage in EVALUATED_STAGES and self._extractor is None:  # on every rank now: missing weights fail at once
            self._extractor = build_feature_extractor(self.fid.feature_extractor,
                                                      in_channels=pl_module.image_shape[0],
                                                      weights_path=self.fid.weights_path)

    def reference_name(self, phase: str) -> str:
        """The reference of this evaluation: the configured one, except the held-out set in ``test`` for ``train``."""
        return "heldout" if phase == PHASE_TEST and self.fid.reference == "train" else self.fid.reference

    def _splits(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        data = self.reference_data if self.reference_data is not None else trainer.datamodule
        data.setup("fit")
        return {"train": data.train_images, "heldout": data.heldout_images}

    def _reference(self, trainer: Trainer, ctx: Context, pl_module: LightningModule) -> ReferenceStats:
        name = self.reference_name(ctx.phase)
        if name not in self._references:
            cache = Path(self.fid.cache_dir) if self.fid.cache_dir else Path(trainer.default_root_dir) / "fid_cache"
            splits = self._splits(trainer) if name in SPLITS else {}
            stats = load_reference(name, self._extractor, splits, tuple(pl_module.image_shape), cache,
                                   self.fid.datasets_root, self.sampling.batch_size, ctx.device)
            if name == self.fid.reference:
                if self.reference_key is not None and stats.key != self.reference_key:
                    warnings.warn(f"FID reference statistics changed since the checkpoint (key "
                                  f"{self.reference_key[:16]} -> {(stats.key or '')[:16]}): FID values before and "
                                  "after are not comparable", stacklevel=2)
                self.reference_key = stats.key
            self._references[name] = stats
        return self._references[name]

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        extractor = self._extractor.to(ctx.device)
        samples = self.my_samples(trainer, pl_module, ctx)
        features = extract_features(samples, extractor, batch_size=self.sampling.batch_size, device=ctx.device)
        features = self.gatherer(pl_module, ctx)(features, self.num_samples)
        if ctx.rank != 0:
            return None
        reference = self._reference(trainer, ctx, pl_module)
        part = quality_part(features, reference, extractor_identity(extractor), self.reference_name(ctx.phase))
        history = [h for h in self.history if "fid/value" in h] + [{"step": ctx.step, **part.metrics}]
        figure = _plot_quality_history(history, self.num_samples, part.section["feature_extractor"])
        return Evaluation(part.metrics, {"fid": part.section}, figure=figure)


def _plot_quality_history(history: list[dict[str, Any]], num_samples: int, feature_extractor: str) -> Figure:
    """FID (and KID with its subset spread, on a second axis) against the training step, one point per evaluation."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    steps = np.asarray([h["step"] for h in history])
    ax.plot(steps, [h["fid/value"] for h in history], marker="o", ms=4, color="C0", label="FID")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID ({num_samples} samples)", color="C0")
    with_kid = [h for h in history if "kid/value" in h]
    if with_kid:
        kid_ax = ax.twinx()
        kid_ax.errorbar([h["step"] for h in with_kid], [h["kid/value"] for h in with_kid],
                        yerr=[h["kid/std"] for h in with_kid], marker="s", ms=4, color="C1", capsize=3,
                        label="KID (+- std over subsets)")
        kid_ax.set_ylabel("KID", color="C1")
    ax.set_title(f"sample quality against training step ({feature_extractor})", fontsize=9)
    ax.grid(True, alpha=0.3)
    return fig


class SampleGrid(_RatioTestCallback):
    """A grid of EMA samples above their nearest training images, each titled with its d1/d2, memorized pairs
    (d1/d2 < threshold) in red (:func:`calmwild.grids.pairs_figure`). Written as the step's PNG and logged as an
    image (W&B ``log_image``, TensorBoard ``add_image``) under ``samples/nearest_pairs``; the JSON lists each
    sample's ratio, nearest training index and flag.

    Args:
        num_samples: samples in the grid.
        threshold: ratio-test threshold in (0, 1).
        sampling: the sampler (use the settings of TrajectoryMemorization / FID to share their samples).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default sample_grid).
    """

    def __init__(self, num_samples: int = 64, threshold: float = RATIO_THRESHOLD,
                 sampling: SamplingSettings = SamplingSettings(), every_n_steps: int = 1000, at_train_end: bool = True,
                 name: str | None = None):
        super().__init__(num_samples, threshold, sampling, every_n_steps, at_train_end, name)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        samples = self.gatherer(pl_module, ctx)(self.my_samples(trainer, pl_module, ctx), self.num_samples)
        if ctx.rank != 0:
            return None
        train = self.cached_train(trainer, ctx)
        tests = RatioTestResult(*(field.cpu() for field in ratio_test(samples, train, self.threshold,
                                                                        device=ctx.device)))
        record = {"samples": {"num_samples": self.num_samples, "num_memorized": int(tests.memorized.sum()),
                              "ratio": tests.ratio, "nearest_index": tests.nearest_index,
                              "memorized": tests.memorized}}
        grid = nearest_pairs_grid(samples, trainer.datamodule.train_images, tests,
                                  f"EMA samples at step {ctx.step}", max_pairs=self.num_samples)
        return Evaluation({}, record, image=grid, image_key="samples/nearest_pairs")
