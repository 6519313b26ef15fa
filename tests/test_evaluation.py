"""calmwild.evaluation: evaluate_denoiser on tiny random data with closed-form denoisers, checked against brute-force
computations (nearest-neighbour distances by explicit differences, FID with scipy's sqrtm)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from calmwild.denoisers import EmpiricalDenoiser, GaussianDenoiser
from calmwild.checks import sigma_key
from calmwild.evaluation import EVALUATION_KEYS, PLOT_FILES, evaluate_denoiser
from calmwild.features import build_feature_extractor, extract_features
from calmwild.sampling import generate
from calmwild.settings import FIDSettings, PerSigmaSettings, SamplingSettings

SIGMAS = [80.0, 2.0, 0.05, 0.002]
SHAPE = (1, 6, 6)


def _data(seed: int = 0, num_train: int = 24, num_heldout: int = 20):
    gen = torch.Generator().manual_seed(seed)
    train = torch.rand((num_train, *SHAPE), generator=gen) * 2 - 1
    heldout = torch.rand((num_heldout, *SHAPE), generator=gen) * 2 - 1
    return train, heldout


def _evaluate(denoiser, train, heldout, out, num_noises=2, num_samples=32, fid_feature="random"):
    return evaluate_denoiser(
        denoiser, train, heldout, out,
        per_sigma=PerSigmaSettings(sigmas=SIGMAS, num_images=16, num_noises=num_noises, batch_size=16),
        sampling=SamplingSettings(steps=8, batch_size=16), num_samples=num_samples,
        fid=None if fid_feature is None else FIDSettings(feature_extractor=fid_feature), progress=False,
    )


@pytest.fixture(scope="module")
def empirical_report(tmp_path_factory):
    train, heldout = _data()
    out = tmp_path_factory.mktemp("empirical")
    report = _evaluate(EmpiricalDenoiser(train), train, heldout, out)
    return train, heldout, out, report


def test_writes_json_with_documented_keys_and_plots(empirical_report):
    _, _, out, report = empirical_report
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert tuple(on_disk) == EVALUATION_KEYS
    assert on_disk["metrics"] == pytest.approx(report["metrics"])
    for name in PLOT_FILES.values():
        assert (out / name).stat().st_size > 1000, name
    assert (out / PLOT_FILES["nearest_pairs"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {f"mse/{split}/{sigma_key(s)}" for split in ("train", "heldout", "gap") for s in SIGMAS}
    expected |= {f"mem/{sigma_key(s)}" for s in SIGMAS} | {"mem/peak_rate", "mem/peak_sigma"}
    expected |= {"traj_mem/rate", "traj_mem/stderr", "traj_mem/num_samples", "fid/value", "fid/num_samples"}
    expected |= {"kid/value", "kid/std", "kid/num_samples", "kid/subset_size"}
    assert set(on_disk["metrics"]) == expected
    assert on_disk["per_sigma_mse"]["train"]["num_items"] == 16 * 2
    assert on_disk["trajectory_memorization"]["num_samples"] == 32
    assert on_disk["fid"]["num_samples"] == 32 and on_disk["fid"]["reference"] == "train"
    assert "RandomConvFeatures" in on_disk["fid"]["feature_extractor"]
    assert list((out / "fid_cache").glob("train-*.pt")), "reference statistics were not cached"


def test_per_sigma_mse_matches_brute_force(empirical_report):
    train, heldout, _, report = empirical_report
    section = report["per_sigma_mse"]
    small = SIGMAS.index(0.002)
    # At sigma = 0.002 the empirical denoiser returns the nearest training image: zero error on training images,
    # the squared distance to the nearest training image (per pixel) on held-out ones.
    assert section["train"]["mse_per_pixel"][small] < 1e-8
    diffs = heldout[:16].reshape(16, 1, -1).double() - train.reshape(1, len(train), -1).double()
    nearest_sq = diffs.square().sum(-1).min(dim=1).values / diffs.shape[-1]
    assert section["heldout"]["mse_per_pixel"][small] == pytest.approx(float(nearest_sq.mean()), rel=1e-3)
    gap = np.asarray(section["heldout"]["mse_per_pixel"]) - np.asarray(section["train"]["mse_per_pixel"])
    np.testing.assert_allclose(section["gap"], gap, rtol=1e-12)
    for s, g in zip(SIGMAS, gap):
        assert report["metrics"][f"mse/gap/{sigma_key(s)}"] == pytest.approx(g)


def test_per_sigma_memorization_of_empirical_denoiser(empirical_report):
    _, _, _, report = empirical_report
    section = report["per_sigma_memorization"]
    rate = dict(zip(section["sigmas"], section["rate"]))
    assert rate[0.002] == 1.0  # denoised to the nearest training image exactly
    assert rate[80.0] == 0.0  # denoised to (nearly) the training mean: no single nearest image
    assert section["peak_rate"] == 1.0
    assert section["peak_sigma"] == max(s for s, r in rate.items() if r == 1.0)
    assert report["metrics"]["mem/peak_sigma"] == section["peak_sigma"]


def test_trajectory_memorization_and_fid_match_independent_computation(empirical_report):
    train, _, _, report = empirical_report
    assert report["trajectory_memorization"]["rate"] >= 0.95
    # FID recomputed from regenerated samples with scipy's matrix square root (independent of calmwild.fid's
    # eigenvalue route); np.cov uses the same N - 1 divisor.
    samples = generate(EmpiricalDenoiser(train), 32, SHAPE, seed=0, batch_size=16, progress=False, num_steps=8)
    extractor = build_feature_extractor("random", in_channels=1)
    f1, f2 = extract_features(samples, extractor).numpy(), extract_features(train, extractor).numpy()
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    expected = float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * root))
    assert report["fid"]["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_per_sample_results_name_each_samples_nearest_training_image(empirical_report):
    train, _, out, report = empirical_report
    per_sample = json.loads((out / report["files"]["per_sample"]).read_text())
    samples = generate(EmpiricalDenoiser(train), 32, SHAPE, seed=0, batch_size=16, progress=False, num_steps=8)
    distances = (samples.reshape(32, 1, -1).double() - train.reshape(1, len(train), -1).double()).norm(dim=-1)
    two = distances.topk(2, largest=False).values
    assert per_sample["nearest_index"] == distances.argmin(dim=1).tolist()
    np.testing.assert_allclose(per_sample["ratio"], (two[:, 0] / two[:, 1]).numpy(), rtol=1e-4, atol=1e-6)
    assert per_sample["memorized"] == (two[:, 0] / two[:, 1] < 1 / 3).tolist()
    assert sum(per_sample["memorized"]) == report["trajectory_memorization"]["num_memorized"]


def test_gaussian_denoiser_does_not_memorize(tmp_path):
    train, heldout = _data(seed=1)
    report = _evaluate(GaussianDenoiser.fit(train), train, heldout, tmp_path, num_noises=1, fid_feature=None,
                       num_samples=64)
    assert report["trajectory_memorization"]["rate"] <= 0.05
    assert report["fid"] is None and "fid/value" not in report["metrics"]


def test_bad_settings_are_refused(tmp_path):
    train, heldout = _data()
    denoiser = EmpiricalDenoiser(train)
    with pytest.raises(ValueError, match="feature_extractor"):
        _evaluate(denoiser, train, heldout, tmp_path, fid_feature="vgg")
    with pytest.raises(ValueError, match="num_samples"):
        _evaluate(denoiser, train, heldout, tmp_path, num_samples=1)
    with pytest.raises(ValueError, match="differ in shape"):
        _evaluate(denoiser, train, heldout[:, :, :4], tmp_path)
