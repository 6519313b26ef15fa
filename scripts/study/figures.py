"""The study's figures: what a reader would rather see than read, each saved as a PNG under ``<out>/figures/``."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from calmwild import stats
from study.configs import ARMS

ARM_COLORS = {arm: f"C{i}" for i, arm in enumerate(ARMS)}


def _log_sigma_axis(ax, zone: list[float] | None = None) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("σ (EDM noise level)")
    ax.grid(True, which="major", alpha=0.3)
    if zone is not None:
        ax.axvspan(*zone, color="red", alpha=0.1, lw=0, label="danger zone (data only)")


def regime_figure(regime: dict) -> Figure:
    """Left: final trajectory memorization against N (Wilson 95% intervals), the N* band shaded and N* marked.
    Right: memorization against training steps, one line per N."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    sizes = sorted(int(n) for n in regime["sizes"])
    rows = [regime["sizes"][str(n)]["trajectory"] for n in sizes]
    rate = np.array([r["rate"] for r in rows])
    low = np.array([r["interval"]["low"] for r in rows])
    high = np.array([r["interval"]["high"] for r in rows])
    left.errorbar(sizes, rate, yerr=[rate - low, high - rate], marker="o", capsize=3, color="C0")
    left.axhspan(*regime["band"], color="green", alpha=0.1, lw=0, label="N* band")
    left.axvline(regime["n_star"], color="k", ls="--", lw=1, label=f"N* = {regime['n_star']}")
    left.set_xscale("log", base=2)
    left.set_xticks(sizes, [str(n) for n in sizes])
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("training-set size N")
    left.set_ylabel("trajectory memorization (d1/d2 < 1/3)")
    left.set_title(f"Memorization -> generalization ({rows[0]['num_samples']} samples per N, 95% Wilson)", fontsize=10)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    for i, n in enumerate(sizes):
        history = regime["sizes"][str(n)]["history"]
        right.plot([h["step"] for h in history], [h["rate"] for h in history], marker="o", ms=3,
                   color=f"C{i % 10}", label=f"N = {n}")
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("training step")
    right.set_ylabel("trajectory memorization")
    right.set_title("During training (callbacks.TrajectoryMemorization)", fontsize=10)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    return fig


def bands_figure(geometry: dict, base_density: tuple[np.ndarray, np.ndarray]) -> Figure:
    """The training noise distribution p(sigma) with the gap band and the placebo bands (their masses in the legend),
    over the max-weight and coverage curves that place the danger zone."""
    fig = Figure(figsize=(8, 4.4), layout="constrained")
    ax = fig.add_subplot()
    sig, density = base_density
    ax.plot(sig, density / density.max(), color="k", lw=1, label="training p(σ) (scaled)")
    ax.plot(geometry["sigmas"], geometry["max_weight"], color="C0", label="max posterior weight (Def. 4.1)")
    ax.plot(geometry["sigmas"], geometry["coverage"], color="C1", label="shell coverage (Def. 4.6)")
    _log_sigma_axis(ax, geometry["zone"])
    ax.axvspan(*geometry["gap_band"], color="red", alpha=0.15, lw=0,
               label=f"gap band (mass {geometry['gap_mass']:.3f})")
    for i, (side, placebo) in enumerate(geometry["placebos"].items()):
        low, high = placebo["sigma"]
        ax.axvspan(low, min(high, max(geometry["sigmas"])), color=f"C{4 + i}", alpha=0.15, lw=0,
                   label=f"placebo {side} (mass {placebo['mass']:.3f}{', capped' if placebo['capped'] else ''})")
    ax.set_ylim(0, 1.05)
    ax.set_title("Where each arm removes training noise levels", fontsize=10)
    ax.legend(fontsize=7, loc="center left")
    return fig


def arms_figure(arms: dict, zone: list[float]) -> Figure:
    """Left: each arm's per-sigma memorization (mean over seeds, thin lines per seed). Right: memorization against
    the Frechet distance per seed (dots) and per arm (mean with t intervals over seeds)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arm, entry in arms.items():
        color = ARM_COLORS[arm]
        curves = np.array([m["per_sigma"]["rate"] for m in entry["models"]])
        sig = entry["models"][0]["per_sigma"]["sigmas"]
        for curve in curves:
            left.plot(sig, curve, color=color, lw=0.5, alpha=0.4)
        left.plot(sig, curves.mean(axis=0), color=color, lw=2, label=arm)
        rates = [m["trajectory"]["rate"] for m in entry["models"]]
        fds = [m["quality"]["fid"] for m in entry["models"]]
        right.scatter(fds, rates, color=color, s=14, alpha=0.5)
        rate_iv, fd_iv = stats.rate_mean_interval(rates), stats.mean_interval(fds)
        right.errorbar([fd_iv.estimate], [rate_iv.estimate], xerr=_error(fd_iv), yerr=_error(rate_iv), color=color,
                       marker="s", capsize=3, label=arm)
    _log_sigma_axis(left, zone)
    left.set_ylim(-0.02, 1.02)
    left.set_ylabel("per-sigma memorization (held-out images)")
    left.set_title("Per-sigma memorization at N* (mean over seeds; thin: each seed)", fontsize=10)
    left.legend(fontsize=7)
    right.set_xlabel("Frechet distance (lower is better)")
    right.set_ylabel("trajectory memorization")
    right.set_ylim(-0.02, 1.02)
    right.set_title("Memorization against quality (95% t intervals over seeds)", fontsize=10)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    return fig


def _error(iv: stats.Interval) -> list[list[float]]:
    """An interval as matplotlib's asymmetric error bar [[below], [above]]."""
    return [[max(iv.estimate - iv.low, 0.0)], [max(iv.high - iv.estimate, 0.0)]]


def arms_training_figure(arms: dict) -> Figure:
    """Trajectory memorization against training steps, each arm's mean over seeds."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for arm, entry in arms.items():
        steps = [h["step"] for h in entry["models"][0]["history"]]
        rates = np.array([[h["rate"] for h in m["history"]] for m in entry["models"]])
        ax.plot(steps, rates.mean(axis=0), marker="o", ms=3, color=ARM_COLORS[arm], label=arm)
        ax.fill_between(steps, rates.min(axis=0), rates.max(axis=0), color=ARM_COLORS[arm], alpha=0.12, lw=0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("trajectory memorization (mean; band: seed range)")
    ax.set_title("Memorization against iterations at N*", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def swap_figure(swap: dict) -> Figure:
    """Trajectory memorization per swapped band (Wilson 95% over all noises), per direction and band scheme."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    for i, (base, other) in enumerate((("memorizing", "generalizing"), ("generalizing", "memorizing"))):
        ax = fig.add_subplot(1, 2, i + 1)
        cells = list(swap["table"][base])
        rates, lows, highs = [], [], []
        for cell in cells:
            flags = swap["table"][base][cell]["memorized"]
            iv = stats.wilson_interval(sum(flags), len(flags))
            rates.append(iv.estimate)
            lows.append(iv.estimate - iv.low)
            highs.append(iv.high - iv.estimate)
        colors = ["gray"] + ["C0"] * 3 + ["C3"] * 3
        ax.bar(range(len(cells)), rates, yerr=[lows, highs], color=colors[: len(cells)], capsize=3)
        ax.set_xticks(range(len(cells)), [c.replace("_", "\n") for c in cells], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("trajectory memorization")
        ax.set_title(f"{swap[base]} base, {swap[other]} inside the band", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    return fig


def risk_figure(risk: dict, scores: dict[str, list[float]]) -> Figure:
    """Reproduction count of each training image against the primary risk score."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    counts = np.asarray(risk["counts"])
    ax.scatter(scores[risk["primary"]], counts, s=14)
    ax.axhline(risk["memorized_samples"] / risk["num_train"], color="k", ls="--", lw=1, label="uniform share M / N")
    ax.set_xlabel(f"risk score: {risk['primary']} (from the data alone)")
    ax.set_ylabel("memorized samples reproducing the image")
    ax.set_title(f"Which images the N* baseline reproduces ({risk['num_models']} seeds pooled)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
