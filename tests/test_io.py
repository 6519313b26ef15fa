"""calmwild.io: output directories, atomic JSON, image grids."""

import json
import math

import pytest
import torch

from calmwild.io import (
    MEMORIZED_COLOR,
    NOVEL_COLOR,
    enlarge,
    image_grid,
    pair_grid,
    prepare_output_dir,
    save_png,
    to_unit_range,
    write_json,
)


def test_prepare_output_dir_refuses_non_empty(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    (out / "result.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds files"):
        prepare_output_dir(out)
    assert prepare_output_dir(out, overwrite=True) == out
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_output_dir(tmp_path / "file")


def test_write_json_handles_tensors_and_nan(tmp_path):
    path = write_json({"x": torch.tensor([1.0, 2.0]), "nan": math.nan, "t": (1, 2), "s": torch.tensor(3)},
                      tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"x": [1.0, 2.0], "nan": None, "t": [1, 2], "s": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_to_unit_range_maps_and_repeats_gray():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    y = to_unit_range(x)
    assert y.shape == (1, 3, 2, 2)
    assert y[0, 0].flatten().tolist() == [0.0, 0.5, 1.0, 1.0]


def test_pair_grid_frames_memorized_pairs_in_yellow():
    samples = torch.zeros(2, 1, 16, 16)
    nearest = torch.zeros(2, 1, 16, 16)
    grid = pair_grid(samples, nearest, torch.tensor([True, False]), pairs_per_row=2)
    # First pair starts after the 2-pixel padding; its frame pixel (top-left) carries the memorized colour.
    assert grid[:, 2, 2].tolist() == pytest.approx(list(MEMORIZED_COLOR))
    frame_w = 1
    second_x = 2 + (32 + 2 * frame_w) + 2
    assert grid[:, 2, second_x].tolist() == pytest.approx(list(NOVEL_COLOR))


def test_grid_errors_and_png(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        pair_grid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="non-empty"):
        image_grid(torch.zeros(0, 1, 8, 8))
    path = save_png(image_grid(torch.rand(5, 3, 8, 8) * 2 - 1), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_enlarge_repeats_each_pixel_by_the_smallest_integer_factor():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    big = enlarge(images, min_side=8)  # factor ceil(8 / 3) = 3
    assert big.shape == (2, 1, 9, 9)
    assert torch.equal(big, images.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))
    assert enlarge(images, min_side=3) is images
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        enlarge(images[0])
