"""What the memorization metrics report: the JSON sections and the flat metric dicts the commands write and the
callbacks log (one naming of logged keys: ``mse/train/sigma_0.59``, ``mem/peak_rate``, ``traj_mem/rate``, ...), and
their figures: curves against sigma, the ratio histogram, the [sample | nearest training image] grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # matplotlib loads in a second: the plotting functions import it
    from matplotlib.figure import Figure

from calmwild.checks import check_threshold, sigma_key
from calmwild.memorization.per_sigma import PerSigmaMemorization, PerSigmaMSE
from calmwild.memorization.ratio import RatioTestResult, TrajectoryMemorization


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
    from matplotlib.figure import Figure

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
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(ratios, bins=np.linspace(0.0, 1.0, 41), color="C0", alpha=0.8)
    ax.axvline(threshold, color="C3", ls="--",
               label=f"threshold {threshold:.3g}: {rate:.1%} of {ratios.size} memorized")
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training image)")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center")
    return fig


def nearest_pairs_grid(
    samples: torch.Tensor, train: torch.Tensor, tests: RatioTestResult, title: str, max_pairs: int = 32
) -> torch.Tensor:
    """The first ``max_pairs`` samples above their nearest training images, each titled with its d1/d2, memorized
    ones in red (:func:`calmwild.grids.pairs_figure`), rendered as a [3, H, W] image; ``tests`` is the ratio test of
    ``samples`` against ``train``."""
    from calmwild.grids import pairs_figure, render

    shown = slice(0, min(max_pairs, samples.shape[0]))
    nearest = train[tests.nearest_index[shown].cpu()]
    return render(pairs_figure(samples[shown], nearest, tests.ratio[shown].tolist(), tests.memorized[shown].tolist(),
                               title, max_pairs))
