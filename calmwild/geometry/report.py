"""The dataset-only geometry report (paper Section 4, Fig. 3 / Fig. 8): posterior weight and shell coverage along
the noise schedule, Theorem 4.8's bounds, Theorem 4.2's thresholds and the danger zone -- computed before any
training -- written as ``geometry.json`` (stable keys, :data:`GEOMETRY_KEYS`) and ``geometry.png``; and the
per-training-image risk scores (:mod:`calmwild.geometry.risk`) as ``risk.json`` and ``risk.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from calmwild.checks import check_sigmas
from calmwild.geometry.risk import PRIMARY_SCORE, danger_zone_bandwidth, risk_scores
from calmwild.geometry.shells import (CoverageBounds, CoverageCurve, coverage_bounds, shell_coverage,
                                      shell_probability_bound, shell_radii)
from calmwild.geometry.weights import (ConcentrationThresholds, WeightCurves, concentration_thresholds,
                                       posterior_weight_curves, remark_4_3)
from calmwild.geometry.zone import DangerZone, danger_zone
from calmwild.grids import ranked_figure, render
from calmwild.io import save_figure, save_png, write_json
from calmwild.neighbors import flatten
from calmwild.schedule import sigma_to_timestep, timestep_to_sigma
from calmwild.settings import GeometrySettings

GEOMETRY_FORMAT_VERSION = 1
REPORT_FILES = ("geometry.json", "geometry.png")
RISK_FILES = ("risk.json", "risk.png")


GEOMETRY_KEYS = (
    "format_version",
    "dataset",
    "settings",
    "sigmas",
    "timesteps",
    "max_weight",
    "self_weight",
    "coverage",
    "coverage_bounds",
    "thresholds",
    "danger_zone",
    "remark_4_3",
)


@dataclass
class GeometryResult:
    """Everything :func:`analyze_geometry` computes; :meth:`to_dict` gives the JSON report with
    the stable top-level keys :data:`GEOMETRY_KEYS`:

    - ``format_version`` (int), ``dataset`` {num_train, num_heldout, dim}, ``settings`` (all parameters, the
      shell radii and Lemma 4.5's probability bound, the DDPM schedule used for timesteps);
    - ``sigmas`` (ascending) and ``timesteps`` (their DDPM timesteps);
    - ``max_weight``, ``self_weight``, ``coverage``: {mean, se} per sigma;
    - ``coverage_bounds``: {lower: {mean, se}, upper: {mean, se, uncapped}} (Theorem 4.8);
    - ``thresholds``: Theorem 4.2 per point and summary, plus ``timesteps`` of the mean thresholds;
    - ``danger_zone``: see :class:`DangerZone`;
    - ``remark_4_3``: the thresholds against the max-weight curve (:func:`calmwild.geometry.weights.remark_4_3`).
    Non-finite numbers become null in JSON.
    """

    dataset: dict[str, int]
    settings: dict[str, Any]
    weights: WeightCurves
    coverage: CoverageCurve
    bounds: CoverageBounds
    thresholds: ConcentrationThresholds
    danger: DangerZone

    def to_dict(self) -> dict[str, Any]:
        ddpm = self.danger.ddpm
        mean_lo = self.thresholds.summary["sigma_lo"]["mean"]
        mean_hi = self.thresholds.summary["sigma_hi"]["mean"]
        thresholds = self.thresholds.to_dict()
        thresholds["timesteps"] = {
            name: None if value is None else float(sigma_to_timestep(value, **ddpm))
            for name, value in (("sigma_lo_mean", mean_lo), ("sigma_hi_mean", mean_hi))
        }
        return {
            "format_version": GEOMETRY_FORMAT_VERSION,
            "dataset": dict(self.dataset),
            "settings": dict(self.settings),
            "sigmas": self.weights.sigmas.tolist(),
            "timesteps": sigma_to_timestep(self.weights.sigmas, **ddpm).tolist(),
            **self.weights.to_dict(),
            **self.coverage.to_dict(),
            "coverage_bounds": self.bounds.to_dict(),
            "thresholds": thresholds,
            "danger_zone": self.danger.to_dict(),
            "remark_4_3": remark_4_3(self.weights, self.thresholds),
        }


def analyze_geometry(
    train: torch.Tensor,
    heldout: torch.Tensor,
    settings: GeometrySettings = GeometrySettings(),
    sigmas: Sequence[float] | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 4096,
    batch_size: int = 1024,
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    progress: bool = True,
) -> dict[str, Any]:
    """The full geometry report of a training set and a held-out set from the same distribution ([N, ...] tensors,
    e.g. images in [-1, 1]); returns :meth:`GeometryResult.to_dict` (keys :data:`GEOMETRY_KEYS`). ``settings``
    (:class:`~calmwild.settings.GeometrySettings`) gives the Monte Carlo sizes and levels:

    - max / self posterior weight (Def. 4.1, Fig. 7): ``num_points`` training base points x ``num_noises`` noises;
    - coverage C_sigma (Def. 4.6): ``num_queries`` held-out points x ``num_coverage_noises`` noises;
    - Theorem 4.8 bounds: lower over all held-out points; upper exact over all held-out/training pairs when
      affordable, else exact over each query's nearest training points plus ``num_pairs`` random pairs for the rest;
    - Theorem 4.2 thresholds (eps, delta) for ``num_threshold_points`` random training points (the paper used 20);
    - the danger zone at (``weight_level``, ``coverage_level``), in sigma and in DDPM timesteps (T, beta_*).

    ``sigmas`` defaults to EDM's rho schedule with ``settings.num_levels`` levels (App. E.2: 40); any grid is sorted
    ascending. Work runs on ``device`` (default: where ``train`` lives) in float32 unless the inputs are float64.
    The four random parts use seeds seed, seed + 1, seed + 2, seed + 3 so their noises are independent.
    """
    s = settings
    grid = s.sigma_grid() if sigmas is None else check_sigmas(sigmas, min_count=2, ascending=True)
    for name, x in (("train", train), ("heldout", heldout)):
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty tensor [N, ...], got {getattr(x, 'shape', type(x))}")
    if train.shape[1:] != heldout.shape[1:]:
        raise ValueError(f"train items have shape {tuple(train.shape[1:])} but heldout {tuple(heldout.shape[1:])}")
    dtype = torch.float64 if train.dtype == torch.float64 else torch.float32
    target = torch.device(device) if device is not None else train.device
    y = flatten(train).to(device=target, dtype=dtype)
    h = flatten(heldout).to(device=target, dtype=dtype)
    n, dim = y.shape

    weights = posterior_weight_curves(y, grid, s.num_points, s.num_noises, seed=s.seed, chunk_size=chunk_size,
                                      batch_size=batch_size, progress=progress)
    coverage = shell_coverage(y, h, grid, s.num_queries, s.num_coverage_noises, t=s.t, seed=s.seed + 1,
                              chunk_size=chunk_size, batch_size=batch_size, progress=progress)
    bounds = coverage_bounds(y, h, grid, t=s.t, num_pairs=s.num_pairs, seed=s.seed + 2)
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed + 3))[: min(s.num_threshold_points, n)]
    thresholds = concentration_thresholds(y, picks, eps=s.eps, delta=s.delta, chunk_size=chunk_size)
    danger = danger_zone(grid, weights.max_weight, coverage.coverage, s.weight_level, s.coverage_level, T,
                         beta_start, beta_end)
    r_minus, r_plus = shell_radii(dim, s.t)
    report_settings = {
        "t": float(s.t),
        "shell_radii": {"r_minus": r_minus, "r_plus": r_plus, "r_minus_clipped": dim - 2.0 * (dim * s.t) ** 0.5 < 0},
        "shell_probability_bound": shell_probability_bound(s.t),
        "eps": float(s.eps),
        "delta": float(s.delta),
        "weight_level": float(s.weight_level),
        "coverage_level": float(s.coverage_level),
        "seed": int(s.seed),
        "num_points": weights.num_points,
        "num_noises": weights.num_noises,
        "num_queries": coverage.num_queries,
        "num_coverage_noises": coverage.num_noises,
        "num_bound_queries": bounds.num_queries,
        "num_pairs": bounds.num_pairs,
        "upper_bound_exact": bounds.upper_exact,
        "upper_bound_exact_neighbors": bounds.exact_neighbors,
        "num_threshold_points": int(picks.numel()),
        "sigma_grid": f"edm_sigma_steps({s.num_levels})" if sigmas is None else "given",
        "device": str(target),
        "dtype": str(dtype).replace("torch.", ""),
        "ddpm": {"T": int(T), "beta_start": float(beta_start), "beta_end": float(beta_end)},
    }
    dataset = {"num_train": int(n), "num_heldout": int(h.shape[0]), "dim": int(dim)}
    return GeometryResult(dataset, report_settings, weights, coverage, bounds, thresholds, danger).to_dict()


def _check_report(report: dict[str, Any] | GeometryResult) -> dict[str, Any]:
    if isinstance(report, GeometryResult):
        return report.to_dict()
    if not isinstance(report, dict):
        raise TypeError(f"expected the dict returned by analyze_geometry, got {type(report).__name__}")
    missing = [key for key in GEOMETRY_KEYS if key not in report]
    if missing:
        raise ValueError(f"not a geometry report: missing keys {missing}")
    return report


def _band(ax: Any, sig: np.ndarray, mean: list, se: list, color: str, label: str) -> None:
    """A curve with its +-2 standard-error band (NaN errors drawn as no band)."""
    m = np.asarray(mean, dtype=float)
    s = np.nan_to_num(np.asarray([np.nan if v is None else v for v in se], dtype=float))
    ax.plot(sig, m, color=color, lw=2, label=label)
    ax.fill_between(sig, np.clip(m - 2 * s, 0, 1), np.clip(m + 2 * s, 0, 1), color=color, alpha=0.25, lw=0)


def plot_geometry(report: dict[str, Any] | GeometryResult) -> Figure:
    """The paper's Figure 3 layout for a geometry report: max posterior weight and coverage (+-2 SE bands) against
    sigma (log axis), Theorem 4.8's bounds dashed, the danger zone shaded, Theorem 4.2's mean thresholds as
    vertical lines, and DDPM timesteps on the top axis."""
    report = _check_report(report)
    sig = np.asarray(report["sigmas"], dtype=float)
    fig = Figure(figsize=(8.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    zone = report["danger_zone"]
    if not zone["empty"]:
        lo, hi = zone["sigma"]
        t_lo, t_hi = zone["timesteps"]
        label = f"danger zone (σ {lo:.3g}-{hi:.3g}; t {t_lo:.0f}-{t_hi:.0f})"
        ax.axvspan(lo, hi, color="red", alpha=0.15, lw=0, label=label)
    _band(ax, sig, report["max_weight"]["mean"], report["max_weight"]["se"], "C0", "max posterior weight m(σ)")
    ax.plot(sig, report["self_weight"]["mean"], color="C0", lw=1, ls=":", label="self weight")
    _band(ax, sig, report["coverage"]["mean"], report["coverage"]["se"], "C1", "shell coverage C(σ)")
    bounds = report["coverage_bounds"]
    ax.plot(sig, bounds["lower"]["mean"], color="C2", ls="--", lw=1.2, label="Thm 4.8 lower bound")
    ax.plot(sig, bounds["upper"]["mean"], color="C3", ls="--", lw=1.2, label="Thm 4.8 upper bound")
    levels = {zone["weight_level"], zone["coverage_level"]}
    for level in levels:
        ax.axhline(level, color="gray", lw=0.6, ls="-", alpha=0.5)
    crossing = zone["crossing"]
    if crossing["sigma"] is not None:
        ax.plot([crossing["sigma"]], [crossing["level"]], "kx", ms=8, label=f"intersection σ={crossing['sigma']:.3g}")
    summary = report["thresholds"]["summary"]
    for name, color, style, text in (
        ("sigma_lo", "tab:purple", "-.", "Thm 4.2 σ_lo (mean)"),
        ("sigma_hi", "tab:brown", ":", "Thm 4.2 σ_hi (mean)"),
    ):
        value = summary[name]["mean"]
        if value is not None:
            ax.axvline(value, color=color, ls=style, lw=1.5, label=f"{text} = {value:.3g}")
    if zone["empty"]:
        ax.plot(
            [], [], " ",
            label=f"no danger zone at weight ≥ {zone['weight_level']:g}, coverage ≥ {zone['coverage_level']:g}\n"
            f"(highest joint level {zone['max_joint_level']:.3f})",
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("σ (EDM noise level)")
    ax.set_ylabel("weight / probability")
    data = report["dataset"]
    ax.set_title(f"Posterior weight and Gaussian-shell coverage (N={data['num_train']}, d={data['dim']})", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))

    ddpm = report["settings"]["ddpm"]
    top = ax.twiny()
    top.set_xscale("log")
    top.set_xlim(ax.get_xlim())
    steps = [s for s in (1, 10, 25, 50, 100, 200, 300, 400, 500, 700, 1000) if s <= ddpm["T"]]
    at = timestep_to_sigma(torch.tensor(steps, dtype=torch.float64), **ddpm).numpy()
    inside = (at >= min(ax.get_xlim())) & (at <= max(ax.get_xlim()))
    top.set_xticks(at[inside])
    top.set_xticklabels([str(s) for s, keep in zip(steps, inside) if keep], fontsize=7)
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xlabel(f"DDPM timestep (T={ddpm['T']}, linear β)", fontsize=8)
    return fig


def write_geometry_report(
    report: dict[str, Any] | GeometryResult, out_dir: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """Writes ``geometry.json`` (the report, NaN/inf as null) and ``geometry.png`` (:func:`plot_geometry`) into
    ``out_dir`` (created if needed). Refuses with FileExistsError when either file is already there, unless
    ``overwrite`` -- results of another run are never silently replaced. Returns {"json": path, "png": path}."""
    report = _check_report(report)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    existing = [name for name in REPORT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)} from another run; "
            "choose a fresh directory or pass overwrite=True"
        )
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(report, out / "geometry.json")
    png_path = out / "geometry.png"
    save_figure(plot_geometry(report), png_path, dpi=150)
    return {"json": json_path, "png": png_path}


def write_risk_report(
    train: torch.Tensor,
    danger_zone_entry: dict[str, Any],
    out_dir: str | Path,
    k: int = 5,
    num_noises: int = 16,
    seed: int = 0,
    num_shown: int = 16,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Which training images are most at risk of being memorized, from the data alone (seed 002, local coverage):
    :func:`calmwild.geometry.risk.risk_scores` with the kernel bandwidth of the danger zone
    (:func:`calmwild.geometry.risk.danger_zone_bandwidth`), written into ``out_dir`` as

    - ``risk.json``: every score for every training image (index order of the training set), the bandwidth, and
      the ``num_shown`` most and least at-risk indices by the primary score
      (:data:`calmwild.geometry.risk.PRIMARY_SCORE`);
    - ``risk.png``: those images, most at risk in the top row(s), least at risk below.

    Returns the summary stored in ``geometry.json`` under ``risk`` (everything but the per-image scores)."""
    out = Path(out_dir)
    sigma = danger_zone_bandwidth(danger_zone_entry)
    scores = risk_scores(train, sigma, k=k, num_noises=num_noises, seed=seed, device=device)
    order = torch.argsort(scores[PRIMARY_SCORE], descending=True, stable=True)
    shown = max(1, min(int(num_shown), train.shape[0] // 2))
    summary = {
        "primary": PRIMARY_SCORE,
        "scores": sorted(scores),
        "bandwidth_sigma": sigma,
        "bandwidth_source": "none (no danger zone and no crossing: kernel scores left out)" if sigma is None else
        ("sqrt(sigma_lo * sigma_hi) of the danger zone" if not danger_zone_entry.get("empty") else
         "crossing sigma of the weight and coverage curves (empty danger zone)"),
        "k": min(int(k), train.shape[0] - 1),
        "num_noises": int(num_noises) if sigma is not None else None,
        "seed": int(seed),
        "most_at_risk": order[:shown].tolist(),
        "least_at_risk": order[-shown:].flip(0).tolist(),
        "files": dict(zip(("json", "png"), RISK_FILES)),
    }
    json_name, png_name = RISK_FILES
    write_json({**summary, "per_image": {name: value.tolist() for name, value in scores.items()}}, out / json_name)
    primary = scores[PRIMARY_SCORE]
    rows = [(label, train[picked].float(), primary[picked].tolist())
            for label, picked in (("most at risk", order[:shown]), ("least at risk", order[-shown:].flip(0)))]
    save_png(render(ranked_figure(rows, f"Memorization risk of the {train.shape[0]} training images, from the data "
                                  "alone", PRIMARY_SCORE)), out / png_name)
    return summary
