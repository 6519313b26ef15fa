"""Image grids a reader can read without zooming: every image drawn at least :data:`CELL_PIXELS` pixels wide (nearest
neighbour, so an 8x8 digit stays sharp), the grid titled with what it shows (the step, the data) and its rows and
columns named. Each ``*_figure`` function builds a matplotlib Figure -- one mosaic image with the labels written
around its cells, so a grid of hundreds of images draws in well under a second; :func:`render` turns it into a
[3, H, W] image in [0, 1] that :func:`calmwild.io.save_png` writes and the loggers take as an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from calmwild.io import to_unit_range

CELL_PIXELS = 96  # the drawn width of one image
DPI = 100
MEMORIZED_TEXT = "#c62828"  # a memorized sample's label and frame
_GAP = 0.28  # the space between cells, in cells: room for a cell's title


class Cell(NamedTuple):
    """One image of a grid [C, H, W] in [-1, 1], its title above it and the colour of its title and frame."""

    image: torch.Tensor
    title: str = ""
    color: str | None = None


def render(fig: Figure) -> torch.Tensor:
    """The figure's pixels as a [3, H, W] float tensor in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def grid_figure(rows: Sequence[Sequence[Cell | None]], title: str, row_labels: Sequence[str] | None = None) -> Figure:
    """The cells in rows (None leaves a place empty) as one mosaic on one axes: each image scaled to the same square
    cell by an integer factor (nearest neighbour), its title above it, a frame in its colour, the row labels on the
    left. Coordinates are the mosaic's pixels, so images, frames and titles line up exactly."""
    columns = max(len(row) for row in rows)
    side = max(max(cell.image.shape[-1], cell.image.shape[-2]) for row in rows for cell in row if cell is not None)
    size = side * max(1, math.ceil(64 / side))  # a cell, in mosaic pixels
    gap = round(_GAP * size)
    pitch = size + gap
    label_width = 1.1 if row_labels else 0.0  # inches
    fig = Figure(figsize=(columns * pitch * CELL_PIXELS / size / DPI + label_width + 0.2,
                          len(rows) * pitch * CELL_PIXELS / size / DPI + 0.5), dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=10)
    ax = fig.add_subplot()
    mosaic = np.ones((len(rows) * pitch, columns * pitch, 3), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            pixels = to_unit_range(cell.image.unsqueeze(0).detach().float())[0].permute(1, 2, 0).numpy()
            big = np.repeat(np.repeat(pixels, size // pixels.shape[0], axis=0), size // pixels.shape[1], axis=1)
            top, left = r * pitch + gap, c * pitch
            mosaic[top : top + big.shape[0], left : left + big.shape[1]] = big
            if cell.title:
                ax.text(left + size / 2, top - 2, cell.title, ha="center", va="bottom", fontsize=8,
                        color=cell.color or "black", fontweight="bold" if cell.color else "normal")
            if cell.color:
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), size, size, fill=False, edgecolor=cell.color,
                                       linewidth=2.5))
    ax.imshow(mosaic, interpolation="nearest")
    for r, label in enumerate(row_labels or []):
        ax.text(-0.1 * size, r * pitch + gap + size / 2, label, ha="right", va="center", fontsize=9)
    ax.set_xlim(-label_width * DPI * size / CELL_PIXELS - 0.5, columns * pitch - 0.5)
    ax.set_ylim(len(rows) * pitch - 0.5, -0.5)
    ax.set_axis_off()
    return fig


def samples_figure(samples: torch.Tensor, title: str, max_images: int = 64) -> Figure:
    """The first ``max_images`` samples [N, C, H, W] (in [-1, 1]) in a square-ish grid, each numbered."""
    shown = samples[:max_images]
    if shown.shape[0] == 0:
        raise ValueError("samples_figure needs at least one image")
    columns = max(1, math.ceil(math.sqrt(shown.shape[0])))
    cells = [Cell(image, f"#{k}") for k, image in enumerate(shown)]
    rows = [cells[start : start + columns] for start in range(0, len(cells), columns)]
    return grid_figure(rows, f"{title} ({shown.shape[0]} of {samples.shape[0]} shown)")


def pairs_figure(samples: torch.Tensor, nearest: torch.Tensor, ratios: Sequence[float], memorized: Sequence[bool],
                 title: str, max_pairs: int = 32, per_row: int = 8) -> Figure:
    """Each sample above its nearest training image, the sample titled with its d1/d2 (red, and the pair framed
    red, when the ratio test calls it memorized); blocks of ``per_row`` pairs, rows labelled "sample" and
    "nearest training image"."""
    count = min(max_pairs, samples.shape[0])
    if count == 0 or nearest.shape[0] < count or len(ratios) < count or len(memorized) < count:
        raise ValueError(f"pairs_figure needs as many nearest images, ratios and flags as samples shown ({count})")
    rows, labels = [], []
    for start in range(0, count, per_row):
        block = range(start, min(start + per_row, count))
        colors = [MEMORIZED_TEXT if bool(memorized[k]) else None for k in block]
        rows.append([Cell(samples[k], f"d1/d2 {float(ratios[k]):.2f}", color) for k, color in zip(block, colors)])
        rows.append([Cell(nearest[k], "", color) for k, color in zip(block, colors)])
        labels += ["sample", "nearest\ntraining image"]
    return grid_figure(rows, f"{title}: d1/d2 < 1/3 = memorized (red)", labels)


def ranked_figure(rows: Sequence[tuple[str, torch.Tensor, Sequence[float]]], title: str, score_name: str) -> Figure:
    """Rows of images, each row named (e.g. "most at risk", "least at risk") and each image titled with its score."""
    if not rows:
        raise ValueError("ranked_figure needs at least one row")
    cells = [[Cell(image, f"{float(score):.3g}") for image, score in zip(images, scores)] for _, images, scores in rows]
    return grid_figure(cells, f"{title} ({score_name} above each image)", [label for label, _, _ in rows])
