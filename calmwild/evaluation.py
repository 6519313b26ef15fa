"""Evaluate a denoiser: the one entry the ``calmwild evaluate`` command and the training callbacks share.

Each ``evaluate_*`` function computes one metric for one process's share of the work and reduces the gathered
result, returning a :class:`Part` (JSON section, flat metrics with the logged names, figure or image grid):

- :func:`evaluate_per_sigma`: per-noise-level denoising error on training and held-out images (paper eq. 5) and
  one-step denoised held-out images under the ratio test (Section 3, Fig. 2), one held-out pass for both;
- :func:`evaluate_trajectory_memorization`: generated samples under the ratio test (Section 3, Table 1);
- :func:`evaluate_fid`: FID and KID of generated samples against a reference set, with the sample counts.

Work is split by item index into contiguous slices, one per rank (:func:`shard_bounds`); a ``gather`` function
(identity on one process, an all-gather under DDP) concatenates the ranks' rows in rank order. On one process
:func:`evaluate_denoiser` runs all of them and writes ``evaluation.json`` (keys :data:`EVALUATION_KEYS`):

- ``settings``: every setting that changes a number (per-sigma items, sampler, threshold, FID setup).
- ``data``: ``num_train``, ``num_heldout``, ``image_shape``.
- ``per_sigma_mse``: ``sigmas``, ``train`` and ``heldout`` (each ``mse_per_pixel``, ``mse_per_pixel_stderr``,
  ``num_items``), ``gap`` = heldout - train per sigma.
- ``per_sigma_memorization``: ``sigmas``, ``rate``, ``stderr``, ``num_items``, ``threshold``, ``peak_rate``,
  ``peak_sigma`` (null when nothing is memorized: there is no peak).
- ``trajectory_memorization``: ``rate``, ``stderr``, ``num_samples``, ``num_memorized``, ``threshold``.
- ``fid``: ``fid``, ``kid``, ``kid_std``, ``kid_subset_size``, ``kid_subsets`` (KID null for a statistics-file
  reference), ``num_samples``, ``num_reference``, ``feature_extractor``, ``reference``, ``reference_key``; null when
  FID is switched off.
- ``metrics``: the flat scalar dict with the keys the callbacks log; ``files``: the plots (:data:`PLOT_FILES`) and
  ``per_sample.json`` (each generated sample's ``ratio`` d1/d2, ``nearest_index`` in the training set and whether it
  is ``memorized``); ``seconds``: wall time per part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from matplotlib.figure import Figure

from calmwild.checks import check_count, check_threshold
from calmwild.features import build_feature_extractor, extract_features, extractor_identity
from calmwild.fid import ReferenceStats, quality_report, sample_quality
from calmwild.io import save_figure, save_png, write_json
from calmwild.memorization.per_sigma import (
    per_sigma_errors,
    per_sigma_errors_and_ratio_tests,
    summarize_errors,
    summarize_ratio_tests,
)
from calmwild.memorization.ratio import RATIO_THRESHOLD, RatioTestResult, mean_and_stderr, ratio_test
from calmwild.memorization.ratio import TrajectoryMemorization as TrajectoryResult
from calmwild.references import load_reference
from calmwild.memorization.report import (
    memorization_report,
    mse_report,
    nearest_pairs_grid,
    plot_per_sigma_memorization,
    plot_per_sigma_mse,
    plot_ratio_histogram,
    trajectory_report,
)
from calmwild.sampling import generate
from calmwild.settings import FIDSettings, PerSigmaSettings, SamplingSettings

EVALUATION_KEYS = ("settings", "data", "per_sigma_mse", "per_sigma_memorization", "trajectory_memorization", "fid",
                   "metrics", "files", "seconds")
PLOT_FILES = {"per_sigma_mse": "per_sigma_mse.png", "per_sigma_memorization": "per_sigma_memorization.png",
              "nearest_pairs": "nearest_pairs.png", "trajectory_ratios": "trajectory_ratios.png"}
PER_SAMPLE_FILE = "per_sample.json"
Gather = Callable[[torch.Tensor, int], torch.Tensor]


def on_one_process(rows: torch.Tensor, total: int) -> torch.Tensor:
    """The gather of a single process: its rows are all the rows."""
    return rows.cpu()


class Part(NamedTuple):
    """One metric's results: ``section`` (the JSON body), ``metrics`` (scalars, logged names), and a ``figure`` or
    an ``image`` grid ([3, H, W] in [0, 1])."""

    section: dict[str, Any]
    metrics: dict[str, float]
    figure: Figure | None = None
    image: torch.Tensor | None = None


def shard_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice [start, stop) of ``total`` items computed by ``rank``: start = floor(total * rank / world_size).
    Slices are contiguous, in rank order, cover every item once and differ in length by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a world of size {world_size}")
    if total < 0:
        raise ValueError(f"total must be >= 0 items, got {total}")
    return total * rank // world_size, total * (rank + 1) // world_size


def _items(images: torch.Tensor, settings: PerSigmaSettings, shard: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """This rank's item ids of the first ``num_images`` images and the total number of items."""
    total = min(settings.num_images, images.shape[0]) * settings.num_noises
    return torch.arange(*shard_bounds(total, *shard)), total


class PerSigmaParts(NamedTuple):
    """The per-sigma results of :func:`evaluate_per_sigma`: ``mse`` and ``memorization`` (None when not asked)."""

    mse: Part | None
    memorization: Part | None


def evaluate_per_sigma(denoiser, train: torch.Tensor, heldout: torch.Tensor, settings: PerSigmaSettings,
                       threshold: float = RATIO_THRESHOLD, device: str | torch.device | None = None,
                       shard: tuple[int, int] = (0, 1), gather: Gather = on_one_process, mse: bool = True,
                       memorization: bool = True) -> PerSigmaParts:
    """The per-noise-level metrics on the first ``num_images`` images of each set, with the same seeded noises:

    - ``mse``: per-pixel MSE_sigma (eq. 5) on training and held-out images (the gap is paired); logs
      ``mse/{train,heldout,gap}/sigma_X``;
    - ``memorization``: the fraction of held-out items whose one-step denoising D(x + sigma n; sigma) passes the ratio
      test against the training set (Section 3, Fig. 2); logs ``mem/sigma_X``, ``mem/peak_rate``, ``mem/peak_sigma``.

    Both look at the same held-out items, which are denoised once when both are asked for."""
    if not (mse or memorization):
        raise ValueError("evaluate_per_sigma needs mse=True, memorization=True or both")
    threshold = check_threshold(threshold)
    sigmas = settings.sigma_list()
    common = (sigmas, settings.num_noises, settings.seed, settings.batch_size)

    def everyones(columns: torch.Tensor, total: int) -> torch.Tensor:
        """[S, this rank's items] -> [S, total] in item order (``gather`` concatenates rows)."""
        return gather(columns.T.contiguous(), total).T

    def error_curve(images: torch.Tensor, errors: torch.Tensor | None = None):
        """MSE_sigma over the first ``num_images`` images (``errors`` of this rank's items when already computed)."""
        items, total = _items(images, settings, shard)
        if errors is None:
            errors = per_sigma_errors(denoiser, images[: settings.num_images], *common, items=items, device=device)
        return summarize_errors(sigmas, everyones(errors, total), torch.arange(total), settings.num_noises)

    heldout = heldout[: settings.num_images]
    errors, memorization_part = None, None
    if memorization:
        items, total = _items(heldout, settings, shard)
        errors, tests = per_sigma_errors_and_ratio_tests(denoiser, heldout, train, *common, threshold, items=items,
                                                         device=device)
        result = summarize_ratio_tests(sigmas, RatioTestResult(*(everyones(field, total) for field in tests)),
                                       torch.arange(total), settings.num_noises, threshold)
        section, metrics = memorization_report(result)
        memorization_part = Part(section, metrics, figure=plot_per_sigma_memorization(result))
    if not mse:
        return PerSigmaParts(None, memorization_part)
    curves = {"heldout": error_curve(heldout, errors), "train": error_curve(train)}
    section, metrics = mse_report(curves["train"], curves["heldout"])
    mse_part = Part(section, metrics, figure=plot_per_sigma_mse(curves["train"], curves["heldout"]))
    return PerSigmaParts(mse_part, memorization_part)


def evaluate_trajectory_memorization(samples: torch.Tensor, train: torch.Tensor, num_samples: int,
                                     threshold: float = RATIO_THRESHOLD, title: str = "Generated samples",
                                     device: str | torch.device | None = None,
                                     gather: Gather = on_one_process) -> tuple[Part, RatioTestResult]:
    """The fraction of ``num_samples`` generated samples (this rank's ``samples``, gathered) that pass the ratio test
    against the training set, with its binomial standard error; logs ``traj_mem/{rate,stderr,num_samples}``. Also
    returns the gathered per-sample tests (nearest training image of each sample)."""
    tests = ratio_test(samples, train, threshold, device=device)
    tests = RatioTestResult(*(gather(field.cpu(), num_samples) for field in tests))
    rate, stderr = mean_and_stderr(tests.memorized)
    section, metrics = trajectory_report(TrajectoryResult(float(rate), float(stderr), num_samples, tests), threshold)
    return Part(section, metrics, figure=plot_ratio_histogram(tests, threshold, f"{title}: ratio test")), tests


def quality_part(features: torch.Tensor, reference: ReferenceStats, feature_extractor: str, reference_name: str
                 ) -> Part:
    """FID and KID of gathered sample features [N, F] against reference statistics of the same feature space
    (:func:`calmwild.fid.sample_quality`); logs ``fid/*`` and ``kid/*`` (:func:`calmwild.fid.quality_report`)."""
    quality = sample_quality(features, reference, feature_extractor)
    section, metrics = quality_report(quality, reference_name, reference.key)
    return Part(section, metrics)


def evaluate_fid(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, settings: FIDSettings,
                 cache_dir: str | Path, batch_size: int = 256, device: str | torch.device = "cpu") -> Part:
    """FID and KID of ``samples`` against the ``settings.reference`` set (:mod:`calmwild.references`) in the
    ``settings.feature_extractor`` space, with the sample counts. Reference statistics are cached in
    ``settings.cache_dir`` (default ``cache_dir``)."""
    extractor = build_feature_extractor(settings.feature_extractor, in_channels=samples.shape[1],
                                        weights_path=settings.weights_path).to(device)
    cache = Path(settings.cache_dir) if settings.cache_dir is not None else Path(cache_dir)
    reference = load_reference(settings.reference, extractor, {"train": train, "heldout": heldout},
                               tuple(samples.shape[1:]), cache, settings.datasets_root, batch_size, device)
    features = extract_features(samples, extractor, batch_size, device)
    return quality_part(features, reference, extractor_identity(extractor), settings.reference)


def evaluate_denoiser(
    denoiser,
    train: torch.Tensor,
    heldout: torch.Tensor,
    out_dir: str | Path,
    per_sigma: PerSigmaSettings = PerSigmaSettings(),
    sampling: SamplingSettings = SamplingSettings(),
    num_samples: int = 256,
    threshold: float = RATIO_THRESHOLD,
    fid: FIDSettings | None = FIDSettings(feature_extractor="random"),
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Every calmwild metric of ``denoiser`` (a callable D(x [B,C,H,W], sigma [B]) in data space), on one process:
    per-sigma MSE and memorization over ``per_sigma``'s items, and ``num_samples`` samples drawn with ``sampling``:
    their trajectory memorization, a grid of the first 64 beside their nearest training images, and (unless ``fid``
    is None) their Frechet distance to the reference set.

    Writes ``evaluation.json`` (keys :data:`EVALUATION_KEYS`, see the module docstring) and the plots of
    :data:`PLOT_FILES` into ``out_dir`` (created if needed) and returns the JSON content."""
    for name, images in (("train", train), ("heldout", heldout)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    if train.shape[1:] != heldout.shape[1:]:
        raise ValueError(f"train images {tuple(train.shape[1:])} and heldout images {tuple(heldout.shape[1:])} "
                         "differ in shape")
    if train.shape[0] < 2:
        raise ValueError(f"the ratio test needs at least 2 training images, got {train.shape[0]}")
    num_samples = check_count(num_samples, "num_samples", 2)
    threshold = check_threshold(threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_shape = tuple(int(s) for s in train.shape[1:])
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    mse, mem = timed("per_sigma", lambda: evaluate_per_sigma(denoiser, train, heldout, per_sigma, threshold, device))
    samples = timed("sampling", lambda: generate(denoiser, num_samples, image_shape, device=device, progress=progress,
                                                 **sampling.generate_kwargs()))
    traj, tests = timed("trajectory_memorization",
                        lambda: evaluate_trajectory_memorization(samples, train, num_samples, threshold, device=device))
    quality = None if fid is None else timed(
        "fid", lambda: evaluate_fid(samples, train, heldout, fid, out / "fid_cache", sampling.batch_size, device))

    save_figure(mse.figure, out / PLOT_FILES["per_sigma_mse"])
    save_figure(mem.figure, out / PLOT_FILES["per_sigma_memorization"])
    save_png(nearest_pairs_grid(samples, train, tests, f"{num_samples} samples (seed {sampling.seed}) of the denoiser "
                                f"against its {train.shape[0]} training images"), out / PLOT_FILES["nearest_pairs"])
    save_figure(traj.figure, out / PLOT_FILES["trajectory_ratios"])
    write_json({"ratio": tests.ratio, "nearest_index": tests.nearest_index, "memorized": tests.memorized},
               out / PER_SAMPLE_FILE)
    report = {
        "settings": {"per_sigma": per_sigma.to_dict(), "sampling": sampling.to_dict(), "num_samples": num_samples,
                     "threshold": threshold, "device": str(device),
                     "precision": getattr(denoiser, "precision", None),
                     "fid": None if fid is None else fid.to_dict()},
        "data": {"num_train": int(train.shape[0]), "num_heldout": int(heldout.shape[0]),
                 "image_shape": list(image_shape)},
        "per_sigma_mse": mse.section,
        "per_sigma_memorization": mem.section,
        "trajectory_memorization": traj.section,
        "fid": None if quality is None else quality.section,
        "metrics": {**mse.metrics, **mem.metrics, **traj.metrics, **({} if quality is None else quality.metrics)},
        "files": {**PLOT_FILES, "per_sample": PER_SAMPLE_FILE},
        "seconds": seconds,
    }
    write_json(report, out / "evaluation.json")
    return report
