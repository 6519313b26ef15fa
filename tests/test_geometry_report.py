"""calmwild.geometry.report: the full geometry report, its JSON keys and figure, and the no-overwrite rule."""

import json
import math

import pytest
import torch

from calmwild.geometry.report import GEOMETRY_KEYS, analyze_geometry, write_geometry_report
from calmwild.settings import GeometrySettings
from calmwild.schedule import edm_sigma_steps, sigma_to_timestep


def _images(n: int, seed: int) -> torch.Tensor:
    """n 1x4x4 'images' in [-1, 1] from a few clusters."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    labels = torch.randint(3, (n,), generator=gen)
    return (centers[labels] + 0.15 * torch.randn(n, 1, 4, 4, generator=gen)).clamp(-1, 1)


SMALL = dict(num_points=12, num_noises=8, num_queries=20, num_coverage_noises=5, num_pairs=400, num_threshold_points=5)


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_analyze_geometry_writes_documented_json_and_png(tmp_path):
    train, heldout = _images(60, seed=1), _images(30, seed=2)
    report = analyze_geometry(train, heldout, GeometrySettings(seed=3, **SMALL), progress=False)
    assert tuple(report) == GEOMETRY_KEYS
    assert report["dataset"] == {"num_train": 60, "num_heldout": 30, "dim": 16}
    # default grid: EDM's 40-level schedule (App. E.2), ascending
    assert report["sigmas"] == pytest.approx(edm_sigma_steps(40).flip(0).tolist())
    assert report["timesteps"] == pytest.approx(sigma_to_timestep(torch.tensor(report["sigmas"])).tolist())
    for key in ("max_weight", "self_weight", "coverage"):
        assert set(report[key]) == {"mean", "se"} and len(report[key]["mean"]) == 40
    assert set(report["coverage_bounds"]) == {"lower", "upper"}
    assert report["max_weight"]["mean"][0] == pytest.approx(1.0) and report["max_weight"]["mean"][-1] < 0.2
    assert report["coverage"]["mean"][0] == 0.0 and report["coverage"]["mean"][-1] > 0.9
    settings = report["settings"]
    assert settings["shell_radii"]["r_minus_clipped"] is True  # d = 16 < 4 t
    assert settings["num_points"] == 12 and settings["num_queries"] == 20 and settings["num_bound_queries"] == 30
    assert len(report["thresholds"]["sigma_lo"]) == 5
    zone = report["danger_zone"]
    assert {"empty", "sigma", "timesteps", "crossing", "max_joint_level", "weight_level", "coverage_level"} <= set(zone)

    paths = write_geometry_report(report, tmp_path / "run")
    loaded = _strict_json(paths["json"])
    assert tuple(loaded) == GEOMETRY_KEYS and loaded["sigmas"] == pytest.approx(report["sigmas"])
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_geometry_report(report, tmp_path / "run")
    write_geometry_report(report, tmp_path / "run", overwrite=True)


def test_report_with_empty_danger_zone_and_custom_grid(tmp_path):
    train, heldout = _images(40, seed=4), _images(20, seed=5)
    grid = [2.0, 0.01, 0.1, 0.5, 1.0, 0.05]
    settings = GeometrySettings(weight_level=0.999, coverage_level=0.999, **SMALL)
    report = analyze_geometry(train, heldout, settings, sigmas=grid,
                              progress=False)
    assert report["sigmas"] == sorted(grid) and report["settings"]["sigma_grid"] == "given"
    zone = report["danger_zone"]
    assert zone["empty"] is True and zone["sigma"] is None and zone["timesteps"] is None
    assert 0.0 <= zone["max_joint_level"] <= 1.0
    paths = write_geometry_report(report, tmp_path)
    assert _strict_json(paths["json"])["danger_zone"]["empty"] is True
    assert paths["png"].stat().st_size > 0


def test_bad_inputs_are_refused(tmp_path):
    train = _images(10, seed=0)
    with pytest.raises(ValueError, match="heldout"):
        analyze_geometry(train, torch.zeros(5, 1, 3, 3), GeometrySettings(**SMALL), progress=False)
    with pytest.raises(ValueError, match="sigmas"):
        analyze_geometry(train, train, GeometrySettings(**SMALL), sigmas=[1.0], progress=False)
    with pytest.raises(ValueError, match="missing keys"):
        write_geometry_report({"sigmas": []}, tmp_path)
    (tmp_path / "file").write_text("x")
    report = analyze_geometry(train, _images(5, seed=1), GeometrySettings(**SMALL), sigmas=[0.1, math.e],
                              progress=False)
    with pytest.raises(FileExistsError, match="not a directory"):
        write_geometry_report(report, tmp_path / "file")
