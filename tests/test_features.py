"""Feature extractors: the random conv net's determinism, extractor identities, uint8 quantisation, and the
InceptionV3 wrapper failing fast and clearly without weights or network."""

import socket
import threading
import time

import pytest
import torch
from tiny import random_images as _images
from torch import nn

from calmwild import features as fid
from calmwild.features import (
    INCEPTION_WEIGHTS_NAME,
    InceptionFeatures,
    InceptionWeightsUnavailable,
    RandomConvFeatures,
    build_feature_extractor,
    extract_features,
    extractor_identity,
    to_uint8,
)


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


def test_extractor_identity_without_feature_id_hashes_the_weights():
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert extractor_identity(a) != extractor_identity(b)
    b.load_state_dict(a.state_dict())
    assert extractor_identity(a) == extractor_identity(b)
    assert extractor_identity(RandomConvFeatures(3, seed=0)) != extractor_identity(RandomConvFeatures(3, seed=1))


def test_to_uint8_quantises_the_unit_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]


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
