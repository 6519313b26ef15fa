"""calmwild.grids: every image drawn at a legible size, grids titled, rows and columns named, memorized pairs marked;
the rendered image has the figure's pixel size."""

import pytest
import torch

from calmwild.grids import CELL_PIXELS, DPI, MEMORIZED_TEXT, pairs_figure, ranked_figure, render, samples_figure


def _images(n: int, side: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(n)) * 2 - 1


def _texts(fig) -> list:
    return list(fig.axes[0].texts)


def _cell_pixels(fig) -> float:
    """The drawn width of one image: the axes' pixel width per mosaic pixel, times a cell's mosaic pixels (a frame's
    width, or the 64-pixel minimum cell of an 8x8 image)."""
    render(fig)  # lays the figure out
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    return ax.get_window_extent().width / (right - left) * 64


def test_samples_figure_draws_every_image_large_and_numbered():
    fig = samples_figure(_images(10), "EMA samples at step 3000")
    image = render(fig)
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1  # one mosaic, not one axes per image
    assert [t.get_text() for t in _texts(fig)] == [f"#{k}" for k in range(10)]
    assert _cell_pixels(fig) >= 0.8 * CELL_PIXELS
    assert "step 3000" in fig._suptitle.get_text() and "10 of 10" in fig._suptitle.get_text()
    width, height = fig.get_size_inches() * DPI
    assert image.shape[0] == 3 and abs(image.shape[1] - height) <= 1 and abs(image.shape[2] - width) <= 1
    assert 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert samples_figure(_images(100), "many", max_images=64)._suptitle.get_text().endswith("(64 of 100 shown)")


def test_pairs_figure_names_its_rows_and_marks_memorized_pairs():
    samples, nearest = _images(10), _images(10)
    ratios = [0.1 * k for k in range(10)]
    memorized = [r < 1 / 3 for r in ratios]
    fig = pairs_figure(samples, nearest, ratios, memorized, "calmwild sample", per_row=4)
    texts = _texts(fig)
    titles = [t for t in texts if t.get_text().startswith("d1/d2")]
    assert [t.get_text() for t in titles] == [f"d1/d2 {r:.2f}" for r in ratios]
    assert [t.get_color() for t in titles] == [MEMORIZED_TEXT] * 4 + ["black"] * 6
    labels = [t.get_text() for t in texts if not t.get_text().startswith("d1/d2")]
    assert labels == ["sample", "nearest\ntraining image"] * 3  # three blocks of (up to) four pairs
    frames = fig.axes[0].patches
    assert len(frames) == 2 * 4 and all(p.get_edgecolor()[:3] == pytest.approx((198 / 255, 40 / 255, 40 / 255))
                                        for p in frames)  # the sample and its nearest image, for each memorized
    assert _cell_pixels(fig) >= 0.8 * CELL_PIXELS
    assert "memorized (red)" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="as many nearest images"):
        pairs_figure(samples, nearest[:3], ratios, memorized, "x")


def test_ranked_figure_labels_each_row_and_scores_each_image():
    fig = ranked_figure([("most at risk", _images(4), [4.0, 3.0, 2.0, 1.0]),
                         ("least at risk", _images(3), [0.3, 0.2, 0.1])], "risk", "nearest_neighbor")
    texts = [t.get_text() for t in _texts(fig)]
    assert texts[:7] == ["4", "3", "2", "1", "0.3", "0.2", "0.1"] and texts[7:] == ["most at risk", "least at risk"]
    assert "nearest_neighbor" in fig._suptitle.get_text()
