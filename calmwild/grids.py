"""Image grids a reader can read without zooming: every image drawn at least :data:`CELL_PIXELS` pixels wide (nearest
neighbour, so an 8x8 digit stays sharp), the grid titled with what it shows (the step, the data) and its rows and
columns named. Each ``*_figure`` function builds a matplotlib Figure; :func:`render` turns one into a [3, H, W] image
in [0, 1] that :func:`calmwild.io.save_png` writes and the loggers take as an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from calmwild.io import to_unit_range

CELL_PIXELS = 96  # the drawn width of one image
DPI = 100
MEMORIZED_TEXT = "#c62828"  # a memorized sample's label and frame
_CELL = CELL_PIXELS / DPI


def render(fig: Figure) -> torch.Tensor:
    """The figure's pixels as a [3, H, W] float tensor in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def _draw(ax, image: torch.Tensor, frame: str | None = None) -> None:
    """One image [C, H, W] in [-1, 1] on ``ax``, without ticks; ``frame`` colours its border."""
    pixels = to_unit_range(image.detach().float().cpu()).clamp(0, 1)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_color(frame)
            spine.set_linewidth(3)


def _figure(rows: int, columns: int, title: str, label_width: float = 0.0) -> Figure:
    """A figure of ``rows`` x ``columns`` cells with room for a title and row labels."""
    fig = Figure(figsize=(columns * _CELL + label_width + 0.2, rows * (_CELL + 0.25) + 0.5), dpi=DPI,
                 layout="constrained")
    fig.suptitle(title, fontsize=10)
    return fig


def samples_figure(samples: torch.Tensor, title: str, max_images: int = 64) -> Figure:
    """The first ``max_images`` samples [N, C, H, W] (in [-1, 1]) in a square-ish grid, each numbered."""
    shown = samples[:max_images]
    if shown.shape[0] == 0:
        raise ValueError("samples_figure needs at least one image")
    columns = min(shown.shape[0], max(1, math.ceil(math.sqrt(shown.shape[0]))))
    rows = math.ceil(shown.shape[0] / columns)
    fig = _figure(rows, columns, f"{title} ({shown.shape[0]} of {samples.shape[0]} shown)")
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < shown.shape[0]:
            _draw(ax, shown[k])
            ax.set_title(f"#{k}", fontsize=7, pad=2)
        else:
            ax.set_axis_off()
    return fig


def pairs_figure(samples: torch.Tensor, nearest: torch.Tensor, ratios: Sequence[float], memorized: Sequence[bool],
                 title: str, max_pairs: int = 32, per_row: int = 8) -> Figure:
    """Each sample above its nearest training image, the column titled with the sample's d1/d2 (red, and the pair
    framed red, when the ratio test calls it memorized); blocks of ``per_row`` pairs, rows labelled "sample" and
    "nearest training image"."""
    count = min(max_pairs, samples.shape[0])
    if count == 0 or nearest.shape[0] < count or len(ratios) < count or len(memorized) < count:
        raise ValueError(f"pairs_figure needs as many nearest images, ratios and flags as samples shown ({count})")
    columns = min(per_row, count)
    blocks = math.ceil(count / columns)
    fig = _figure(2 * blocks, columns, f"{title}: d1/d2 < 1/3 = memorized (red)", label_width=1.0)
    axes = fig.subplots(2 * blocks, columns, squeeze=False)
    for k in range(blocks * columns):
        top, bottom = axes[2 * (k // columns), k % columns], axes[2 * (k // columns) + 1, k % columns]
        if k >= count:
            top.set_axis_off()
            bottom.set_axis_off()
            continue
        color = MEMORIZED_TEXT if bool(memorized[k]) else None
        _draw(top, samples[k], color)
        _draw(bottom, nearest[k], color)
        top.set_title(f"d1/d2 {float(ratios[k]):.2f}", fontsize=8, pad=2, color=color or "black",
                      fontweight="bold" if color else "normal")
    for block in range(blocks):
        axes[2 * block, 0].set_ylabel("sample", fontsize=8)
        axes[2 * block + 1, 0].set_ylabel("nearest\ntraining image", fontsize=8)
    return fig


def ranked_figure(rows: Sequence[tuple[str, torch.Tensor, Sequence[float]]], title: str, score_name: str) -> Figure:
    """Rows of images, each row named (e.g. "most at risk", "least at risk") and each image titled with its score."""
    if not rows:
        raise ValueError("ranked_figure needs at least one row")
    columns = max(images.shape[0] for _, images, _ in rows)
    fig = _figure(len(rows), columns, f"{title} ({score_name} above each image)", label_width=1.0)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (label, images, scores) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            if c >= images.shape[0]:
                ax.set_axis_off()
                continue
            _draw(ax, images[c])
            ax.set_title(f"{float(scores[c]):.3g}", fontsize=8, pad=2)
        axes[r, 0].set_ylabel(label, fontsize=9)
    return fig
