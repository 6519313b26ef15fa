import json
import math

import pytest
import torch

from calmwild.outputs import prepare_output_dir, write_json


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
