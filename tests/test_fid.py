"""Frechet distance against closed forms and scipy's matrix square root; the reference-statistics cache; the
InceptionV3 wrapper failing fast and clearly without weights or network."""

import socket
import threading
import time
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from calmwild import fid
from calmwild.fid import (
    INCEPTION_WEIGHTS_NAME,
    InceptionFeatures,
    InceptionWeightsUnavailable,
    RandomConvFeatures,
    ReferenceStats,
    build_feature_extractor,
    compute_fid,
    content_key,
    extract_features,
    extractor_identity,
    feature_statistics,
    frechet_distance,
    reference_statistics,
    to_uint8,
)


def _images(n: int, seed: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


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


# ------------------------------------------------------------------------------------------------ extractors and FID


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    extractor = RandomConvFeatures(3, dim=32, seed=0)
    images = _images(120, 0)
    same = compute_fid(images, images, extractor, batch_size=50)
    assert same["fid"] == pytest.approx(0.0, abs=1e-8)
    assert same["num_samples"] == 120 and same["num_reference"] == 120
    assert same["feature_extractor"] == extractor_identity(extractor)
    halves = compute_fid(images[:60], images[60:], extractor)["fid"]
    shifted = compute_fid(images[:60], 0.2 * images[60:] + 0.6, extractor)["fid"]
    assert 0 < halves < shifted / 4


def test_random_conv_features_are_deterministic_and_batch_independent():
    images = _images(20, 1, channels=1, size=12)
    a = extract_features(images, RandomConvFeatures(1, seed=4), batch_size=7)
    b = extract_features(images, RandomConvFeatures(1, seed=4), batch_size=20)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # float32 convolutions: batching changes rounding
    assert a.shape == (20, 64) and a.dtype == torch.float64
    assert not torch.allclose(a, extract_features(images, RandomConvFeatures(1, seed=5)))
    with pytest.raises(ValueError, match="RandomConvFeatures expects"):
        RandomConvFeatures()(images)  # 3 channels by default
    assert RandomConvFeatures(dim=16, seed=3).feature_id == "random-conv-16-seed3"
    assert extract_features(_images(3, 2, size=5), RandomConvFeatures(dim=16)).shape == (3, 16)  # any image size


def test_compute_fid_with_reference_statistics_equals_raw_reference():
    extractor = RandomConvFeatures(3, seed=1)
    samples, reference = _images(40, 2), _images(50, 3)
    stats = reference_statistics(reference, extractor)  # no cache directory: computed, not written
    assert stats.num_samples == stats.num == 50 and stats.key == content_key(reference, extractor)
    assert len(stats.key) == 16 and int(stats.key, 16) >= 0
    assert compute_fid(samples, stats, extractor) == compute_fid(samples, reference, extractor)
    with pytest.raises(ValueError, match="computed with"):
        compute_fid(samples, stats, RandomConvFeatures(3, seed=2))


def test_extractor_identity_without_feature_id_hashes_the_weights():
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert extractor_identity(a) != extractor_identity(b)
    b.load_state_dict(a.state_dict())
    assert extractor_identity(a) == extractor_identity(b)
    assert extractor_identity(RandomConvFeatures(3, seed=0)) != extractor_identity(RandomConvFeatures(3, seed=1))


def test_to_uint8_quantises_the_unit_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


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


# ------------------------------------------------------------------------------------------------ Inception offline


def _offline(*args, **kwargs):
    raise OSError("network is unreachable")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(*args, **kwargs):
        raise AssertionError("torch.hub.download_url_to_file must not be reached without a connection")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME


def test_inception_without_network_fails_fast_naming_the_file(empty_torch_home, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", _offline)
    start = time.monotonic()
    with pytest.raises(InceptionWeightsUnavailable) as info:
        InceptionFeatures()
    assert time.monotonic() - start < 3
    message = str(info.value)
    assert str(empty_torch_home) in message and "weights_path" in message and "fid_weights_path" in message
    assert "$TORCH_HOME/hub/checkpoints/" + INCEPTION_WEIGHTS_NAME in message


def test_inception_with_hanging_network_fails_within_the_timeout(empty_torch_home, monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(60)
        raise OSError("gave up")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        with pytest.raises(InceptionWeightsUnavailable, match="within"):
            InceptionFeatures(download_timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        release.set()


def test_inception_without_download_or_with_a_missing_path(empty_torch_home, tmp_path):
    with pytest.raises(InceptionWeightsUnavailable, match="download=False"):
        InceptionFeatures(download=False)
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        InceptionFeatures(weights_path=missing)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_feature_extractor("inception", weights_path=missing)


def test_inception_uses_a_file_already_in_torch_home(empty_torch_home, monkeypatch):
    """A weights file at the default place is used without any network access. The real weights are not
    available offline, so a placeholder file is loaded with the network left at its random initialisation."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network touched"))
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
    empty_torch_home.parent.mkdir(parents=True)
    torch.save({}, empty_torch_home)
    extractor = InceptionFeatures()
    assert extractor.weights_path == str(empty_torch_home)
    features = extract_features(_images(2, 7, channels=1, size=16), extractor)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert extractor.feature_id == "inception-v3-2048"


def test_build_feature_extractor_by_name(empty_torch_home, monkeypatch):
    random = fid.build_feature_extractor("random", in_channels=1, dim=16, seed=3)
    assert isinstance(random, RandomConvFeatures) and random.feature_id == "random-conv-16-seed3"
    assert random.in_channels == 1
    assert extract_features(_images(3, 0, channels=1), random).shape == (3, 16)
    monkeypatch.setattr(socket, "create_connection", _offline)
    with pytest.raises(InceptionWeightsUnavailable):
        fid.build_feature_extractor("inception", in_channels=3)
    with pytest.raises(ValueError, match="'inception', 'random', got 'clip'"):
        fid.build_feature_extractor("clip", in_channels=3)
