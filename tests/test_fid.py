"""Frechet distance against closed forms and scipy's matrix square root; the kernel distance against the unbiased
MMD written from its definition; the reference-statistics cache."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from tiny import random_images as _images

from calmwild.features import RandomConvFeatures, extract_features, extractor_identity
from calmwild.fid import (
    ReferenceStats,
    compute_quality,
    content_key,
    feature_statistics,
    frechet_distance,
    kernel_distance,
    quality_report,
    reference_statistics,
    sample_quality,
)


class CountingFeatures(RandomConvFeatures):
    """RandomConvFeatures that counts how many images it was asked to embed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = 0

    def forward(self, images):
        self.seen += images.shape[0]
        return super().forward(images)


# ------------------------------------------------------------------------------------------------ Frechet distance


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.0, 3.0, size=6)
    b[2] = 0.0  # a singular covariance is allowed
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    as_tensors = [torch.from_numpy(v).float() for v in (mu1, np.diag(a), mu2, np.diag(b))]
    assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_non_commuting_2x2_matches_scipy_sqrtm():
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_frechet_distance_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    f = 7
    a, b = rng.normal(size=(f, f)), rng.normal(size=(f, 3))
    s1, s2 = a @ a.T + 0.1 * np.eye(f), b @ b.T  # s2 has rank 3: non-commuting and singular
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))


def test_frechet_distance_rejects_mismatched_or_nonfinite_statistics():
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_statistics_matches_numpy():
    x = np.random.default_rng(2).normal(size=(50, 4))
    mu, cov = feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-12)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(x[:1])


# ------------------------------------------------------------------------------------------------ FID of images


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    extractor = RandomConvFeatures(3, dim=32, seed=0)
    images = _images(120, 0)
    same = compute_quality(images, images, extractor, batch_size=50)
    assert same["fid"] == pytest.approx(0.0, abs=1e-8)
    assert same["num_samples"] == 120 and same["num_reference"] == 120
    assert same["feature_extractor"] == extractor_identity(extractor)
    halves = compute_quality(images[:60], images[60:], extractor)["fid"]
    shifted = compute_quality(images[:60], 0.2 * images[60:] + 0.6, extractor)["fid"]
    assert 0 < halves < shifted / 4


def test_quality_with_reference_statistics_equals_raw_reference():
    extractor = RandomConvFeatures(3, seed=1)
    samples, reference = _images(40, 2), _images(50, 3)
    stats = reference_statistics(reference, extractor)  # no cache directory: computed, not written
    assert stats.num_samples == stats.num == 50 and stats.key == content_key(reference, extractor)
    assert len(stats.key) == 16 and int(stats.key, 16) >= 0
    assert compute_quality(samples, stats, extractor) == compute_quality(samples, reference, extractor)
    with pytest.raises(ValueError, match="computed with"):
        compute_quality(samples, stats, RandomConvFeatures(3, seed=2))


# ------------------------------------------------------------------------------------------------ kernel distance


def _unbiased_mmd_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2_u under k(a, b) = (a.b / d + 1)^3, written from the definition with explicit loops over pairs."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_the_unbiased_mmd_written_from_its_definition():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.4, 1.2, size=(30, 5))
    result = kernel_distance(x, y, subsets=1, subset_size=30)
    assert result["kid"] == pytest.approx(_unbiased_mmd_cubic(x, y), rel=1e-10)
    assert result["kid_std"] == 0.0 and result["kid_subset_size"] == 30 and result["kid_subsets"] == 1
    same = kernel_distance(x, rng.normal(size=(30, 5)), subsets=1, subset_size=30)["kid"]
    assert abs(same) < result["kid"]  # unbiased: near 0 for one distribution, larger for a shifted one


def test_kid_over_subsets_averages_subset_estimates_with_a_seed():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 4)), rng.normal(0.5, 1.0, size=(50, 4))
    result = kernel_distance(x, y, subsets=5, subset_size=12, seed=7)
    gen = torch.Generator().manual_seed(7)
    values = []
    for _ in range(5):
        a = x[torch.randperm(40, generator=gen)[:12].numpy()]
        b = y[torch.randperm(50, generator=gen)[:12].numpy()]
        values.append(_unbiased_mmd_cubic(a, b))
    assert result["kid"] == pytest.approx(np.mean(values), rel=1e-9)
    assert result["kid_std"] == pytest.approx(np.std(values), rel=1e-9)
    assert kernel_distance(x, y, subsets=5, subset_size=12, seed=7) == result
    from torchmetrics.image.kid import poly_mmd  # a second independent implementation, subset by subset

    gen = torch.Generator().manual_seed(7)
    a, b = torch.as_tensor(x), torch.as_tensor(y)
    theirs = [float(poly_mmd(a[torch.randperm(40, generator=gen)[:12]], b[torch.randperm(50, generator=gen)[:12]]))
              for _ in range(5)]
    assert result["kid"] == pytest.approx(np.mean(theirs), rel=1e-9)
    assert kernel_distance(x, y, subsets=2, subset_size=1000)["kid_subset_size"] == 40  # capped by the smaller set
    with pytest.raises(ValueError, match="one dimension"):
        kernel_distance(x, y[:, :3])


def test_quality_reports_fid_and_kid_with_their_counts():
    extractor = RandomConvFeatures(3, dim=16, seed=0)
    samples, reference = _images(24, 8), _images(30, 9)
    quality = compute_quality(samples, reference, extractor)
    features = extract_features(samples, extractor).numpy()
    reference_features = extract_features(reference, extractor).numpy()
    expected = kernel_distance(features, reference_features, subsets=100, subset_size=1000)
    assert quality["kid"] == pytest.approx(expected["kid"], rel=1e-6) and quality["kid_subset_size"] == 24
    section, metrics = quality_report(quality, "train", "abc")
    assert metrics["kid/num_samples"] == metrics["fid/num_samples"] == 24 and metrics["kid/subset_size"] == 24
    assert section["reference"] == "train" and section["num_reference"] == 30
    file_stats = ReferenceStats(features.mean(0), np.cov(features.T), None, "file:ref.npz")
    from_file = sample_quality(features, file_stats, extractor_identity(extractor))
    assert from_file["kid"] is None and from_file["fid"] == pytest.approx(0.0, abs=1e-8)
    assert "kid/value" not in quality_report(from_file, "ref.npz", None)[1]


# ------------------------------------------------------------------------------------------------ cache


def test_reference_cache_is_hit_keyed_by_content_and_survives_corruption(tmp_path):
    extractor = CountingFeatures(3, seed=0)
    images = _images(30, 4)
    first = reference_statistics(images, extractor, tmp_path, "ref", batch_size=8)
    files = list(tmp_path.iterdir())
    assert extractor.seen == 30 and [f.name for f in files] == [f"ref-{first.key}.pt"]

    again = reference_statistics(images, extractor, tmp_path, "ref")
    assert extractor.seen == 30  # served from the cache
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.cov, first.cov)
    assert again.num_samples == 30 and again.feature_extractor == first.feature_extractor

    changed = images.clone()
    changed[7] = -changed[7]
    other = reference_statistics(changed, extractor, tmp_path, "ref")
    assert other.key != first.key and extractor.seen == 60 and len(list(tmp_path.iterdir())) == 2
    assert content_key(images, RandomConvFeatures(3, seed=9)) != first.key  # other feature space, other key

    files[0].write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        repaired = reference_statistics(images, extractor, tmp_path, "ref")
    assert extractor.seen == 90
    np.testing.assert_allclose(repaired.mu, first.mu, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference_statistics(images, extractor, tmp_path, "ref")  # the rewritten file is valid again
    assert extractor.seen == 90
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_cache_file_with_wrong_key_is_not_trusted(tmp_path):
    extractor = CountingFeatures(3, seed=0)
    a, b = _images(10, 5), _images(10, 6)
    stats_a = reference_statistics(a, extractor, tmp_path, "ref")
    key_b = content_key(b, extractor)
    (tmp_path / f"ref-{stats_a.key}.pt").rename(tmp_path / f"ref-{key_b}.pt")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        stats_b = reference_statistics(b, extractor, tmp_path, "ref")
    assert not np.allclose(stats_b.mu, stats_a.mu) and isinstance(stats_b, ReferenceStats)


def test_reference_name_must_be_a_plain_prefix(tmp_path):
    with pytest.raises(ValueError, match="name"):
        reference_statistics(_images(4, 0), RandomConvFeatures(3), tmp_path, "../escape")
