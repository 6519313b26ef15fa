"""`calmwild sample / swap / analyze` on the embedded digits (closed-form denoisers and a tiny checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
from tiny import write_config

from calmwild.cli import run
from calmwild.commands import load_datamodule
from calmwild.data import DigitsDataModule
from calmwild.denoisers import load_denoiser
from calmwild.memorization.early import SCORES

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """The data of the tiny checkpoint (conftest's ``tiny_checkpoint``): the tiny config, 8x8 digits."""
    return str(write_config(tmp_path_factory.mktemp("data") / "tiny.yaml"))


def test_load_datamodule_accepts_fit_config_and_class_path():
    from_config = load_datamodule(DIGITS)
    assert from_config.train_images.shape == (64, 1, 8, 8)  # its data section is included from configs/digits/
    from_class = load_datamodule("calmwild.data.DigitsDataModule")
    assert isinstance(from_class, DigitsDataModule)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_datamodule("missing.yaml")


def test_sample_with_empirical_denoiser_memorizes(tmp_path, capsys):
    report = run(["sample", "--out", str(tmp_path / "s"), "--ckpt", "empirical", "--data", DIGITS,
                  "--num", "12", "--sampling.steps", "18"])
    assert report["memorization"]["rate"] == 1.0
    saved = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert saved["num_samples"] == 12 and saved["memorization"]["num_memorized"] == 12
    for name in ("samples.pt", "samples.png", "nearest_pairs.png", "per_sample.json"):
        assert (tmp_path / "s" / name).is_file()
    assert torch.load(tmp_path / "s" / "samples.pt").shape == (12, 1, 8, 8)
    said = capsys.readouterr().out.splitlines()
    assert said[-2] == (f"calmwild sample: 12 samples in {tmp_path / 's'} (samples.pt, samples.png, nearest_pairs.png, "
                        "per_sample.json, sample.json)")
    assert said[-1] == "  trajectory memorization 100.0% [95% 75.8, 100.0] of 12 samples"


def test_sample_in_bf16_records_the_precision_and_closed_forms_refuse_it(tmp_path, tiny_checkpoint):
    report = run(["sample", "--out", str(tmp_path / "s"), "--ckpt", str(tiny_checkpoint), "--num", "4",
                  "--sampling.steps", "4", "--sampling.precision", "bf16"])
    assert report["precision"] == "bf16" and torch.isfinite(torch.load(tmp_path / "s" / "samples.pt")).all()
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision bf16 applies to network checkpoints"):
        run(["sample", "--out", str(tmp_path / "e"), "--ckpt", "empirical", "--data", DIGITS, "--num", "4",
             "--sampling.precision", "bf16"])


def test_sample_refuses_to_overwrite(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already holds files"):
        run(["sample", "--out", str(out), "--ckpt", "empirical", "--data", DIGITS, "--num", "2"])
    assert (out / "keep.txt").read_text() == "precious"


def test_swap_of_identical_checkpoints_equals_plain_sampling(tmp_path, tiny_checkpoint, tiny_data):
    ckpt = str(tiny_checkpoint)
    plain = run(["sample", "--out", str(tmp_path / "plain"), "--ckpt", ckpt, "--num", "4", "--sampling.steps", "6"])
    swapped = run(["swap", "--out", str(tmp_path / "swap"), "--base", ckpt, "--other", ckpt, "--band", "medium",
                   "--num", "4", "--sampling.steps", "6", "--data", tiny_data])
    assert plain["num_samples"] == swapped["num_samples"] == 4
    a = torch.load(tmp_path / "plain" / "samples.pt")
    b = torch.load(tmp_path / "swap" / "samples.pt")
    assert torch.equal(a, b)
    assert 0.0 <= swapped["memorization"]["rate"] <= 1.0


def test_a_run_directory_stands_for_its_last_checkpoint(tmp_path, tiny_checkpoint, tiny_data):
    run_dir = tiny_checkpoint.parent.parent
    for spec, name in ((tiny_checkpoint, "file"), (run_dir, "run"), (run_dir.parent, "root")):
        run(["sample", "--out", str(tmp_path / name), "--ckpt", str(spec), "--num", "3", "--sampling.steps", "4"])
    file = torch.load(tmp_path / "file" / "samples.pt")
    assert torch.equal(file, torch.load(tmp_path / "run" / "samples.pt"))
    assert torch.equal(file, torch.load(tmp_path / "root" / "samples.pt"))
    with pytest.raises(FileNotFoundError, match="holds no calmwild run"):
        run(["sample", "--out", str(tmp_path / "none"), "--ckpt", str(tmp_path / "file"), "--num", "2"])


def test_swap_in_bf16_runs_the_checkpoint_side_in_bf16_beside_a_closed_form_side(tmp_path, tiny_checkpoint, tiny_data,
                                                                                    monkeypatch):
    from calmwild import commands

    loaded = []

    def recording_load(path, device="cpu", precision="fp32"):
        denoiser = load_denoiser(path, device=device, precision=precision)
        loaded.append(denoiser)
        return denoiser

    monkeypatch.setattr(commands, "load_denoiser", recording_load)
    report = run(["swap", "--out", str(tmp_path / "s"), "--base", "empirical", "--other", str(tiny_checkpoint),
                  "--band", "medium", "--num", "4", "--sampling.steps", "4", "--data", tiny_data,
                  "--sampling.precision", "bf16"])
    assert report["precision"] == "bf16" and [d.precision for d in loaded] == ["bf16"]
    assert torch.isfinite(torch.load(tmp_path / "s" / "samples.pt")).all()


def test_swap_refuses_mismatched_shapes(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="shape"):  # an 8x8 checkpoint beside 16x16 data (the class's default)
        run(["swap", "--out", str(tmp_path / "y"), "--base", str(tiny_checkpoint), "--other", "empirical",
             "--data", "calmwild.data.DigitsDataModule", "--num", "2"])


def test_analyze_writes_geometry_report(tmp_path):
    report = run(["analyze", "--data", DIGITS, "--out", str(tmp_path / "g"), "--geometry.num_points", "20",
                  "--geometry.num_noises", "10", "--geometry.num_queries", "50", "--geometry.num_coverage_noises", "4",
                  "--geometry.num_pairs", "500", "--sigmas", "[0.01, 0.1, 0.3, 1.0, 3.0, 10.0]"])
    saved = json.loads((tmp_path / "g" / "geometry.json").read_text())
    assert saved["sigmas"] == pytest.approx([0.01, 0.1, 0.3, 1.0, 3.0, 10.0])
    assert saved["max_weight"]["mean"][0] > 0.99 and saved["coverage"]["mean"][-1] > 0.99
    assert saved["data"]["name"] == "DigitsDataModule"
    assert (tmp_path / "g" / "geometry.png").is_file()
    assert report["danger_zone"] == saved["danger_zone"]
    # the per-training-image risk scores: the most at-risk image by the primary score is the most isolated one
    risk = json.loads((tmp_path / "g" / "risk.json").read_text())
    train = load_datamodule(DIGITS).train_images.flatten(1).double()
    nearest = torch.cdist(train, train).fill_diagonal_(float("inf")).min(dim=1).values
    assert all(len(values) == train.shape[0] for values in risk["per_image"].values())
    # (mutual nearest neighbours share a distance: compare values, not indices)
    assert nearest[risk["most_at_risk"][0]] == pytest.approx(float(nearest.max()), rel=1e-5)
    assert nearest[risk["least_at_risk"][0]] == pytest.approx(float(nearest.min()), rel=1e-5)
    assert saved["risk"]["most_at_risk"] == risk["most_at_risk"] and (tmp_path / "g" / "risk.png").is_file()
    if not saved["danger_zone"]["empty"]:
        lo, hi = saved["danger_zone"]["sigma"]
        assert risk["bandwidth_sigma"] == pytest.approx((lo * hi) ** 0.5)
        assert "kernel_self_weight" in risk["per_image"]


# Gaussian denoiser outside EDM's medium band, empirical inside it: on the digits about a quarter of the samples
# memorize, the rest do not (a regime where early detection has both classes).
HALF_SWAP = ["--ckpt", "gaussian", "--other", "empirical", "--band", "medium"]


@pytest.fixture(scope="module")
def digits300(tmp_path_factory) -> str:
    """300 digits at 16x16: the data where the half swap above memorizes some samples and not others."""
    path = tmp_path_factory.mktemp("digits300") / "data.yaml"
    path.write_text(json.dumps({"class_path": "calmwild.data.DigitsDataModule",
                                "init_args": {"num_train": 300, "num_heldout": 500, "resolution": 16}}))
    return str(path)


def test_early_detect_reports_auroc_per_step_against_the_zone(tmp_path, digits300):
    zone = tmp_path / "geometry.json"
    zone.write_text(json.dumps({"danger_zone": {"sigma": [0.43, 1.62]}}))
    out = tmp_path / "early"
    report = run(["early-detect", "--out", str(out), "--data", digits300, *HALF_SWAP, "--num", "24",
                  "--seeds", "[0, 1000]", "--sampling.steps", "10", "--zone", str(zone)])
    saved = json.loads((out / "early_detection.json").read_text())
    assert (out / "early_detection.png").is_file() and saved["num_trajectories"] == 48
    assert 0 < saved["num_memorized"] < 48 and saved["danger_zone"] == [0.43, 1.62]
    assert saved["steps"] == list(range(1, 11)) and saved["total_evaluations"] == 19
    assert set(saved["scores"]) == set(SCORES)
    for entry in saved["scores"].values():
        assert len(entry["auroc"]) == 10 and set(entry["by_group"]) == {"0", "1000"}
    assert report["best"] == saved["best"] and "sampling_seconds" not in saved
    with pytest.raises(ValueError, match="share noise"):
        run(["early-detect", "--out", str(tmp_path / "o"), "--data", DIGITS, "--num", "24", "--seeds", "[0, 10]"])
    zone.write_text("[1, 2]")
    with pytest.raises(ValueError, match="danger_zone section"):
        run(["early-detect", "--out", str(tmp_path / "z"), "--data", DIGITS, "--num", "4", "--zone", str(zone)])


def test_swap_rejecting_memorized_samples_early_accounts_for_every_trajectory(tmp_path, digits300):
    out = tmp_path / "filtered"
    report = run(["swap", "--out", str(out), "--base", "gaussian", "--other", "empirical", "--band", "medium",
                  "--data", digits300, "--num", "12", "--reject_memorized_early", "true",
                  "--early_rejection.calibration_num", "96", "--early_rejection.false_negative_rate", "0.1"])
    rejection = json.loads((out / "swap.json").read_text())["early_rejection"]
    assert rejection == json.loads(json.dumps(report["early_rejection"]))
    assert report["num_samples"] == rejection["num_accepted"] == 12
    attempted = rejection["num_attempted"]
    assert sorted(rejection["accepted_indices"] + rejection["rejected_indices"]) == list(range(attempted))
    step, total = rejection["rule"]["step"], 35  # EDM's 18 Heun steps
    head = 2 * step - (step == 18)
    assert rejection["evaluations"]["filtered_generation"] == attempted * head + 12 * (total - head)
    assert rejection["calibration"]["expected_false_negative_rate_bound"] <= 0.1
    assert report["memorization"]["interval"]["count"] == 12
    with pytest.raises(ValueError, match="needs --data"):
        run(["sample", "--out", str(tmp_path / "x"), "--ckpt", "gaussian", "--reject_memorized_early", "true"])


def test_evaluate_prints_its_figures_and_where_they_are(tmp_path, tiny_data, capsys):
    out = tmp_path / "ev"
    report = run(["evaluate", "--ckpt", "empirical", "--data", tiny_data, "--out", str(out), "--num_samples", "8",
                  "--per_sigma.num_images", "8", "--sampling.steps", "6", "--fid.feature_extractor", "random"])
    said = capsys.readouterr().out.splitlines()[-4:]
    assert said[0] == "calmwild evaluate: trajectory memorization 100.0% [95% 67.6, 100.0] of 8 samples"
    peak = report["per_sigma_memorization"]
    assert said[1] == (f"  per-sigma memorization peaks at {100 * peak['peak_rate']:.1f}% at sigma "
                       f"{peak['peak_sigma']:.3g}")
    assert said[2].startswith(f"  Frechet distance {report['fid']['fid']:.4g} (RandomConvFeatures")
    assert said[3] == f"  report in {out / 'evaluation.json'}, plots beside it"
