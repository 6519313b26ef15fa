"""Evaluate one denoiser on everything calmwild measures, on one process: per-sigma MSE on the training and the
held-out set (paper eq. 5), per-sigma memorization of denoised held-out images, trajectory memorization of
generated samples (PAPER_NOTES 2) and FID (with its sample count and feature space named, PAPER_NOTES 6).

The pieces shared with the training callbacks (``callbacks/``) live here once: the sigma naming of logged keys
(:func:`sigma_key`), the JSON sections and flat metric dicts built from the result types of
:mod:`calmwild.memorization` (``*_report``), the per-sigma plots (:func:`plot_sigma_curves` and its two users) and
the nearest-neighbour pair grid (:func:`nearest_pairs_grid`).

``evaluation.json`` (written by :func:`evaluate_denoiser`) has the keys of :data:`EVALUATION_KEYS`:

- ``settings``: every argument that changes a number (sigmas, counts, seeds, sampler, FID setup).
- ``data``: ``num_train``, ``num_heldout``, ``image_shape``.
- ``per_sigma_mse``: ``sigmas``, ``train`` and ``heldout`` (each ``mse_per_pixel``, ``mse_per_pixel_stderr``,
  ``num_items``), ``gap`` = heldout - train per sigma.
- ``per_sigma_memorization``: ``sigmas``, ``rate``, ``stderr``, ``num_items``, ``threshold``, ``peak_rate``,
  ``peak_sigma`` (null when nothing is memorized).
- ``trajectory_memorization``: ``rate``, ``stderr``, ``num_samples``, ``num_memorized``, ``threshold``.
- ``fid``: ``fid``, ``num_samples``, ``num_reference``, ``feature_extractor``, ``reference`` (train / heldout),
  ``reference_key``; null when FID is switched off.
- ``metrics``: the flat scalar dict with the same keys the callbacks log (``mse/train/sigma_0.59``, ``mem/...``,
  ``traj_mem/...``, ``fid/...``).
- ``files``: the plots written beside it (:data:`PLOT_FILES`); ``seconds``: wall time per part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

from calmwild.fid import build_feature_extractor, compute_fid, reference_statistics
from calmwild.images import pair_grid, save_png
from calmwild.memorization import (
    PerSigmaMemorization,
    PerSigmaMSE,
    RatioTestResult,
    TrajectoryMemorization,
    check_threshold,
    per_sigma_memorization,
    per_sigma_mse,
    trajectory_memorization,
)
from calmwild.outputs import write_json
from calmwild.sampling import generate
from calmwild.schedule import edm_sigma_steps

DEFAULT_NUM_SIGMAS = 18  # EDM's sampling schedule (paper App. E.1)
FID_FEATURES = ("random", "inception")
FID_REFERENCES = ("train", "heldout")
EVALUATION_KEYS = ("settings", "data", "per_sigma_mse", "per_sigma_memorization", "trajectory_memorization", "fid",
                   "metrics", "files", "seconds")
PLOT_FILES = {"per_sigma_mse": "per_sigma_mse.png", "per_sigma_memorization": "per_sigma_memorization.png",
              "nearest_pairs": "nearest_pairs.png", "trajectory_ratios": "trajectory_ratios.png"}


# ------------------------------------------------------------------------------------------------ arguments
def check_count(value: object, name: str, minimum: int = 1) -> int:
    """An integer argument >= ``minimum`` (TypeError / ValueError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(value: object, name: str, choices: Sequence[object]) -> Any:
    """``value`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def sigma_key(sigma: float) -> str:
    """The name of one noise level in logged keys: ``sigma_`` + 3 significant digits (``sigma_0.594``, ``sigma_80``)."""
    return f"sigma_{float(sigma):.3g}"


def check_sigmas(sigmas: Sequence[float] | None) -> list[float]:
    """Noise levels as a list of floats; None means EDM's 18-step schedule 80 ... 0.002 (:func:`edm_sigma_steps`).
    Levels must be finite, positive and distinct at 3 significant digits (their logged names, :func:`sigma_key`)."""
    if sigmas is None:
        return edm_sigma_steps(DEFAULT_NUM_SIGMAS).tolist()
    if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, (Sequence, torch.Tensor, np.ndarray)):
        raise TypeError(f"sigmas must be a list of noise levels, got {sigmas!r}")
    values = [float(s) for s in sigmas]
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"sigmas must be a non-empty list of finite positive noise levels, got {values}")
    keys = [sigma_key(s) for s in values]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sigmas {values} are not distinct at 3 significant digits (names {keys})")
    return values


def first_images(images: torch.Tensor, num: int) -> torch.Tensor:
    """The first ``min(num, N)`` images: per-sigma metrics use at most ``num`` images of a set."""
    return images[: min(num, images.shape[0])]


# ------------------------------------------------------------------------------------------------ reports
def mse_report(train: PerSigmaMSE, heldout: PerSigmaMSE) -> tuple[dict, dict[str, float]]:
    """The ``per_sigma_mse`` JSON section and the flat metrics ``mse/{train,heldout,gap}/sigma_X`` (per-pixel MSE,
    eq. 5 divided by d; gap = held-out minus train, positive when the training images are denoised better)."""
    if train.sigmas.tolist() != heldout.sigmas.tolist():
        raise ValueError(f"train and held-out curves use different sigmas: {train.sigmas.tolist()} vs "
                         f"{heldout.sigmas.tolist()}")
    gap = (heldout.mse - train.mse).tolist()
    section = {"sigmas": train.sigmas.tolist(), "train": _without_sigmas(train.to_dict()),
               "heldout": _without_sigmas(heldout.to_dict()), "gap": gap}
    metrics: dict[str, float] = {}
    for name, values in (("train", train.mse.tolist()), ("heldout", heldout.mse.tolist()), ("gap", gap)):
        metrics.update({f"mse/{name}/{sigma_key(s)}": float(v) for s, v in zip(section["sigmas"], values)})
    return section, metrics


def _without_sigmas(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "sigmas"}


def memorization_report(result: PerSigmaMemorization) -> tuple[dict, dict[str, float]]:
    """The ``per_sigma_memorization`` JSON section and the flat metrics ``mem/sigma_X``, ``mem/peak_rate`` and
    ``mem/peak_sigma`` (the noise level of the highest rate, the largest such sigma on ties; NaN -- null in JSON --
    when no item is memorized at any sigma, since there is no peak then)."""
    sigmas, rates = result.sigmas.tolist(), result.rate.tolist()
    peak_rate = max(rates)
    peak_sigma = max(s for s, r in zip(sigmas, rates) if r == peak_rate) if peak_rate > 0 else math.nan
    section = {**result.to_dict(), "peak_rate": peak_rate, "peak_sigma": peak_sigma}
    metrics = {f"mem/{sigma_key(s)}": float(r) for s, r in zip(sigmas, rates)}
    metrics.update({"mem/peak_rate": float(peak_rate), "mem/peak_sigma": float(peak_sigma)})
    return section, metrics


def trajectory_report(result: TrajectoryMemorization, threshold: float) -> tuple[dict, dict[str, float]]:
    """The ``trajectory_memorization`` JSON section and the metrics ``traj_mem/{rate,stderr,num_samples}``."""
    section = {**result.to_dict(), "num_memorized": int(result.result.memorized.sum()),
               "threshold": check_threshold(threshold)}
    metrics = {"traj_mem/rate": float(result.rate), "traj_mem/stderr": float(result.stderr),
               "traj_mem/num_samples": float(result.num_samples)}
    return section, metrics


def fid_report(fid: Mapping[str, Any], reference: str, reference_key: str | None) -> tuple[dict, dict[str, float]]:
    """The ``fid`` JSON section (the dict of :func:`calmwild.fid.compute_fid` plus the reference set's name and
    content key) and the metrics ``fid/value`` and ``fid/num_samples`` -- the count always beside the figure,
    since few-sample FID is biased upwards and comparable only at equal counts (PAPER_NOTES 6)."""
    section = {**fid, "reference": reference, "reference_key": reference_key}
    return section, {"fid/value": float(fid["fid"]), "fid/num_samples": float(fid["num_samples"])}


# ------------------------------------------------------------------------------------------------ plots
def plot_sigma_curves(
    sigmas: Sequence[float],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    ylabel: str,
    title: str,
    log_y: bool = False,
    unit_interval: bool = False,
) -> Figure:
    """Curves against sigma (log x axis), each with a +-2 standard-error band when its stderr is given.

    ``curves`` maps a legend label to (values, stderr or None), one value per sigma. ``log_y``: log y axis, the
    band's lower edge then cut at a tenth of the value (a band reaching 0 cannot be drawn there).
    ``unit_interval``: y axis fixed to [0, 1] with the band clipped to it (rates).
    """
    sig = np.asarray(sigmas, dtype=float)
    order = np.argsort(sig)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    for i, (label, (values, stderr)) in enumerate(curves.items()):
        v = np.asarray(values, dtype=float)
        if v.shape != sig.shape:
            raise ValueError(f"curve {label!r} has {v.size} values for {sig.size} sigmas")
        ax.plot(sig[order], v[order], marker="o", ms=3, lw=1.5, color=f"C{i}", label=label)
        if stderr is None:
            continue
        s = np.nan_to_num(np.asarray(stderr, dtype=float))
        lo, hi = v - 2 * s, v + 2 * s
        if log_y:
            lo = np.maximum(lo, v / 10)
        if unit_interval:
            lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
        ax.fill_between(sig[order], lo[order], hi[order], color=f"C{i}", alpha=0.2, lw=0)
    if unit_interval:
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("σ (EDM noise level)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_per_sigma_mse(train: PerSigmaMSE, heldout: PerSigmaMSE) -> Figure:
    """Train vs held-out per-pixel MSE against sigma (paper eq. 5), log-log, +-2 SE bands."""
    return plot_sigma_curves(
        train.sigmas.tolist(),
        {f"train ({train.num_items} items)": (train.mse.tolist(), train.stderr.tolist()),
         f"held-out ({heldout.num_items} items)": (heldout.mse.tolist(), heldout.stderr.tolist())},
        ylabel="MSE per pixel  E||D(x0 + σn; σ) - x0||² / d", title="Per-noise-level denoising error (eq. 5)",
        log_y=True,
    )


def plot_per_sigma_memorization(result: PerSigmaMemorization) -> Figure:
    """Per-noise-level memorization rate of denoised held-out images against sigma, +-2 SE band."""
    return plot_sigma_curves(
        result.sigmas.tolist(), {f"rate ({result.num_items} items)": (result.rate.tolist(), result.stderr.tolist())},
        ylabel=f"fraction memorized (d1/d2 < {result.threshold:.3g})",
        title="Per-noise-level memorization of one-step denoised held-out images", unit_interval=True,
    )


def plot_ratio_histogram(tests: RatioTestResult, threshold: float, title: str) -> Figure:
    """Histogram of the ratio d1/d2 of each generated sample (values above 1 cannot occur), with the threshold
    marked and the memorized fraction in the legend."""
    ratios = tests.ratio.detach().cpu().double().numpy()
    rate = float(tests.memorized.double().mean()) if ratios.size else float("nan")
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(ratios, bins=np.linspace(0.0, 1.0, 41), color="C0", alpha=0.8)
    ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:.3g}: {rate:.1%} of {ratios.size} memorized")
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training image)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Writes a matplotlib Figure (no pyplot state involved) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def nearest_pairs_grid(
    samples: torch.Tensor, train: torch.Tensor, tests: RatioTestResult, max_pairs: int = 64
) -> torch.Tensor:
    """[sample | nearest training image] pairs of the first ``max_pairs`` samples, memorized ones framed
    (:func:`calmwild.images.pair_grid`); ``tests`` is the ratio test of ``samples`` against ``train``."""
    shown = slice(0, min(max_pairs, samples.shape[0]))
    nearest = train[tests.nearest_index[shown].cpu()]
    return pair_grid(samples[shown], nearest, tests.memorized[shown])


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_denoiser(
    denoiser,
    train: torch.Tensor,
    heldout: torch.Tensor,
    out_dir: str | Path,
    sigmas: Sequence[float] | None = None,
    num_images: int = 256,
    num_noises: int = 1,
    num_samples: int = 256,
    threshold: float = 1 / 3,
    fid_feature: Literal["random", "inception"] | None = "random",
    fid_weights_path: str | None = None,
    fid_reference: Literal["train", "heldout"] = "train",
    fid_cache_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    steps: int = 18,
    solver: Literal["heun", "euler"] = "heun",
    progress: bool = True,
) -> dict:
    """Every calmwild metric of ``denoiser`` (a callable D(x [B,C,H,W], sigma [B]) in data space), on one process.

    - Per-sigma MSE (eq. 5) on the first ``num_images`` training and held-out images, ``num_noises`` seeded noises
      each (the same noises on both sets, so the gap is paired).
    - Per-sigma memorization (PAPER_NOTES 2): the ratio test d1/d2 < ``threshold`` against the whole training set
      of D(x + sigma n; sigma) for the same held-out items.
    - ``num_samples`` samples from EDM's sampler (``steps``, ``solver``; sample i from seed + i): their trajectory
      memorization rate, a grid of the first 64 beside their nearest training images, and the Frechet distance to
      the ``fid_reference`` set in the ``fid_feature`` space ("inception": FID proper, needs the weights file
      ``fid_weights_path`` or $TORCH_HOME; "random": a fixed random conv net, a consistency check only; None: no
      FID). Reference statistics are cached in ``fid_cache_dir`` (default ``<out_dir>/fid_cache``).

    Writes ``evaluation.json`` (keys: :data:`EVALUATION_KEYS`, see the module docstring), ``per_sigma_mse.png``,
    ``per_sigma_memorization.png``, ``nearest_pairs.png`` and ``trajectory_ratios.png`` (histogram of the samples'
    d1/d2) into ``out_dir`` (created if needed) and returns the JSON content.
    """
    for name, images in (("train", train), ("heldout", heldout)):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    if train.shape[1:] != heldout.shape[1:]:
        raise ValueError(f"train images {tuple(train.shape[1:])} and heldout images {tuple(heldout.shape[1:])} "
                         "differ in shape")
    if train.shape[0] < 2:
        raise ValueError(f"the ratio test needs at least 2 training images, got {train.shape[0]}")
    sigma_list = check_sigmas(sigmas)
    num_images, num_noises = check_count(num_images, "num_images"), check_count(num_noises, "num_noises")
    num_samples, steps = check_count(num_samples, "num_samples", 2), check_count(steps, "steps")
    batch_size, seed = check_count(batch_size, "batch_size"), check_count(seed, "seed", 0)
    threshold = check_threshold(threshold)
    check_choice(solver, "solver", ("heun", "euler"))
    check_choice(fid_feature, "fid_feature", (*FID_FEATURES, None))
    check_choice(fid_reference, "fid_reference", FID_REFERENCES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_shape = tuple(int(s) for s in train.shape[1:])
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    mse_train = per_sigma_mse(denoiser, first_images(train, num_images), sigma_list, num_noises, seed, batch_size,
                              device)
    mse_heldout = per_sigma_mse(denoiser, first_images(heldout, num_images), sigma_list, num_noises, seed,
                                batch_size, device)
    mse_section, metrics = mse_report(mse_train, mse_heldout)
    seconds["per_sigma_mse"] = time.perf_counter() - start

    start = time.perf_counter()
    memorization = per_sigma_memorization(denoiser, first_images(heldout, num_images), train, sigma_list, num_noises,
                                          seed, batch_size, threshold, device)
    mem_section, mem_metrics = memorization_report(memorization)
    metrics.update(mem_metrics)
    seconds["per_sigma_memorization"] = time.perf_counter() - start

    start = time.perf_counter()
    samples = generate(denoiser, num_samples, image_shape, seed=seed, batch_size=batch_size, device=device,
                       progress=progress, num_steps=steps, solver=solver)
    seconds["sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    trajectory = trajectory_memorization(samples, train, threshold, device=device)
    traj_section, traj_metrics = trajectory_report(trajectory, threshold)
    metrics.update(traj_metrics)
    seconds["trajectory_memorization"] = time.perf_counter() - start

    fid_section = None
    if fid_feature is not None:
        start = time.perf_counter()
        extractor = build_feature_extractor(fid_feature, in_channels=image_shape[0], weights_path=fid_weights_path)
        extractor = extractor.to(device)
        cache_dir = Path(fid_cache_dir) if fid_cache_dir is not None else out / "fid_cache"
        reference = reference_statistics(train if fid_reference == "train" else heldout, extractor, cache_dir,
                                         name=fid_reference, batch_size=batch_size, device=device)
        fid = compute_fid(samples, reference, extractor, batch_size=batch_size, device=device)
        fid_section, fid_metrics = fid_report(fid, fid_reference, reference.key)
        metrics.update(fid_metrics)
        seconds["fid"] = time.perf_counter() - start

    save_figure(plot_per_sigma_mse(mse_train, mse_heldout), out / PLOT_FILES["per_sigma_mse"])
    save_figure(plot_per_sigma_memorization(memorization), out / PLOT_FILES["per_sigma_memorization"])
    save_png(nearest_pairs_grid(samples, train, trajectory.result), out / PLOT_FILES["nearest_pairs"])
    save_figure(plot_ratio_histogram(trajectory.result, threshold, "Generated samples: nearest-neighbour ratio test"),
                out / PLOT_FILES["trajectory_ratios"])

    report = {
        "settings": {"sigmas": sigma_list, "num_images": num_images, "num_noises": num_noises,
                     "num_samples": num_samples, "threshold": threshold, "seed": seed, "batch_size": batch_size,
                     "device": str(device), "precision": getattr(denoiser, "precision", None), "steps": steps,
                     "solver": solver,
                     "fid": {"feature": fid_feature, "weights_path": fid_weights_path, "reference": fid_reference}},
        "data": {"num_train": int(train.shape[0]), "num_heldout": int(heldout.shape[0]),
                 "image_shape": list(image_shape)},
        "per_sigma_mse": mse_section,
        "per_sigma_memorization": mem_section,
        "trajectory_memorization": traj_section,
        "fid": fid_section,
        "metrics": metrics,
        "files": dict(PLOT_FILES),
        "seconds": seconds,
    }
    write_json(report, out / "evaluation.json")
    return report
