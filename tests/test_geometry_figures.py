"""scripts/geometry_figures.py falls back to the embedded digits and writes the three figures."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "geometry_figures.py"


@pytest.mark.slow
def test_geometry_figures_on_embedded_digits(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("geometry_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--cifar-root", str(tmp_path / "absent"), "--num-train", "100", "--num-heldout", "100",
                          "--num-points", "20", "--num-noises", "10", "--num-queries", "50",
                          "--out", str(tmp_path / "out")])
    assert "using the embedded digits" in capsys.readouterr().err
    for name in ("geometry.json", "geometry.png", "coverage_bounds.png", "self_weight.png"):
        assert (tmp_path / "out" / name).is_file()
    saved = json.loads((tmp_path / "out" / "geometry.json").read_text())
    assert saved["dataset"]["num_train"] == 100 and saved["data"]["name"] == "DigitsDataModule"
    assert report["danger_zone"] == saved["danger_zone"]
