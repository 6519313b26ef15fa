"""calmwild.grids: every image drawn at a legible size, grids titled and their rows and columns named; the rendered
image has the figure's pixel size."""

import pytest
import torch

from calmwild.grids import CELL_PIXELS, DPI, MEMORIZED_TEXT, pairs_figure, ranked_figure, render, samples_figure


def _drawn_width(ax) -> float:
    """The pixel width of an image axis as drawn."""
    return ax.get_window_extent().width


def _images(n: int, side: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_samples_figure_draws_every_image_large_and_numbered():
    fig = samples_figure(_images(10), "EMA samples at step 3000")
    image = render(fig)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 10 and [ax.get_title() for ax in axes] == [f"#{k}" for k in range(10)]
    assert all(_drawn_width(ax) >= 0.8 * CELL_PIXELS for ax in axes)
    assert "step 3000" in fig._suptitle.get_text() and "10 of 10" in fig._suptitle.get_text()
    width, height = fig.get_size_inches() * DPI
    assert image.shape == (3, round(height), round(width)) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert samples_figure(_images(100), "many", max_images=64)._suptitle.get_text().endswith("(64 of 100 shown)")


def test_pairs_figure_names_its_rows_and_marks_memorized_pairs():
    samples, nearest = _images(10), _images(10)
    ratios = [0.1 * k for k in range(10)]
    memorized = [r < 1 / 3 for r in ratios]
    fig = pairs_figure(samples, nearest, ratios, memorized, "calmwild sample", per_row=4)
    grid = fig.axes
    assert len([ax for ax in grid if ax.images]) == 20  # 10 samples + 10 nearest images
    labels = [ax.get_ylabel() for ax in grid if ax.get_ylabel()]
    assert labels == ["sample", "nearest\ntraining image"] * 3  # three blocks of (up to) four pairs
    titled = [ax for ax in grid if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [f"d1/d2 {r:.2f}" for r in ratios]
    colours = [ax.title.get_color() for ax in titled]
    assert colours[:4] == [MEMORIZED_TEXT] * 4 and all(c == "black" for c in colours[4:])
    assert all(_drawn_width(ax) >= 0.8 * CELL_PIXELS for ax in grid if ax.images)
    assert "memorized (red)" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="as many nearest images"):
        pairs_figure(samples, nearest[:3], ratios, memorized, "x")


def test_ranked_figure_labels_each_row_and_scores_each_image():
    fig = ranked_figure([("most at risk", _images(4), [4.0, 3.0, 2.0, 1.0]),
                         ("least at risk", _images(3), [0.3, 0.2, 0.1])], "risk", "nearest_neighbor")
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["most at risk", "least at risk"]
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["4", "3", "2", "1", "0.3", "0.2", "0.1"]
    assert "nearest_neighbor" in fig._suptitle.get_text()
