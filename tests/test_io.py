"""calmwild.io: output directories, atomic JSON and PNG files."""

import json
import math

import pytest
import torch

from calmwild.io import prepare_output_dir, save_png, to_unit_range, write_json


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


def test_png_is_written_atomically(tmp_path):
    path = save_png(torch.rand(3, 8, 8), tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["g.png"]
