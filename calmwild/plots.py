"""Figures of an evaluation across training: a per-sigma quantity as a sigma x step heatmap.

An evaluation callback measures a curve over noise levels (per-sigma memorization, paper Fig. 2; per-sigma MSE,
eq. 5) at each evaluation step. Stacked over steps, the curves show where along the schedule memorization forms and
when: one panel per series, training step on x (one column per evaluation), sigma on a log y axis, the value as
colour (log colour scale where the per-step plot uses a log axis; diverging around 0 for signed values such as the
held-out minus train gap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure


def _edges(centres: np.ndarray, log: bool) -> np.ndarray:
    """Cell edges around sorted centres (geometric midpoints on a log axis); one cell of width 1 for one centre."""
    values = np.log(centres) if log else centres.astype(float)
    if len(values) == 1:
        middle = np.array([values[0] - 0.5, values[0] + 0.5])
    else:
        inner = (values[1:] + values[:-1]) / 2
        middle = np.concatenate([[2 * values[0] - inner[0]], inner, [2 * values[-1] - inner[-1]]])
    return np.exp(middle) if log else middle


def sigma_step_heatmap(rows: Sequence[Sequence], title: str, xname: str = "sigma", log_values: bool = False) -> Figure:
    """The heatmap of ``rows`` [step, sigma, series, value] (every evaluation so far), one panel per series.

    A missing (step, sigma) cell or a NaN value is left blank. ``log_values`` puts the colour on a log scale when
    every value of the series is positive."""
    if not rows:
        raise ValueError("a sigma x step heatmap needs at least one row [step, sigma, series, value]")
    series_names = list(dict.fromkeys(row[2] for row in rows))
    steps = np.array(sorted({int(row[0]) for row in rows}))
    sigmas = np.array(sorted({float(row[1]) for row in rows}))
    fig = Figure(figsize=(4.2 * len(series_names) + 0.6, 4.0), layout="constrained")
    for panel, name in enumerate(series_names, start=1):
        grid = np.full((len(sigmas), len(steps)), np.nan)
        for step, sigma, series, value in rows:
            if series == name and value is not None:
                grid[np.searchsorted(sigmas, float(sigma)), np.searchsorted(steps, int(step))] = float(value)
        finite = grid[np.isfinite(grid)]
        norm, cmap = None, "viridis"
        if finite.size and log_values and finite.min() > 0 and finite.max() > finite.min():
            norm = LogNorm(finite.min(), finite.max())
        elif finite.size and finite.min() < 0 < finite.max():
            norm, cmap = TwoSlopeNorm(0.0, finite.min(), finite.max()), "RdBu_r"
        ax = fig.add_subplot(1, len(series_names), panel)
        columns = np.arange(len(steps) + 1) - 0.5
        mesh = ax.pcolormesh(columns, _edges(sigmas, log=True), np.ma.masked_invalid(grid), norm=norm, cmap=cmap)
        ax.set_yscale("log")
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], rotation=45 if len(steps) > 4 else 0)
        ax.set_xlabel("training step")
        ax.set_ylabel(xname)
        ax.set_title(name)
        fig.colorbar(mesh, ax=ax)
    fig.suptitle(f"{title}, over training (last step {steps[-1]})")
    return fig
