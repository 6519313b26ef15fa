"""FID references: each kind a user can name (a split, an image folder, a .npz of statistics, a torch-fidelity
registered dataset) gives the statistics an independent computation gives, and a bad reference is one clear error."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import random_images

from calmwild.features import RandomConvFeatures, extract_features
from calmwild.fid import STATISTICS_FILE_PREFIX, feature_statistics
from calmwild.references import TORCH_FIDELITY_PREFIX, load_reference, read_statistics_file, reference_kind
from calmwild.settings import FIDSettings

EXTRACTOR = RandomConvFeatures(3, dim=8, seed=0)


def _load(reference, tmp_path, splits=None, **kwargs):
    return load_reference(reference, EXTRACTOR, splits or {}, (3, 8, 8), tmp_path / "cache", **kwargs)


def test_a_split_reference_has_the_statistics_of_its_images(tmp_path):
    train, heldout = random_images(20, 0), random_images(12, 1)
    stats = _load("heldout", tmp_path, {"train": train, "heldout": heldout})
    mu, cov = feature_statistics(extract_features(heldout, EXTRACTOR))
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-12)
    assert stats.num_samples == 12 and stats.features.shape == (12, 8)
    assert list((tmp_path / "cache").glob("heldout-*.pt"))
    with pytest.raises(ValueError, match="no heldout images"):
        _load("heldout", tmp_path, {"train": train})


def test_a_folder_reference_reads_its_images_at_the_samples_shape(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    stats = _load(str(folder), tmp_path)
    assert stats.num_samples == 5 and stats.mu.shape == (8,)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    resized = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", antialias=True,
                                              align_corners=False)
    mu, _ = feature_statistics(extract_features(resized, EXTRACTOR))
    np.testing.assert_allclose(stats.mu, mu, atol=0.05 * np.abs(mu).max())  # resampling filters differ slightly


def test_a_statistics_file_is_read_without_pickle_and_checked(tmp_path):
    rng = np.random.default_rng(1)
    mu, a = rng.normal(size=8), rng.normal(size=(8, 8))
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=a @ a.T)
    stats = _load(str(path), tmp_path)
    np.testing.assert_array_equal(stats.mu, mu)
    assert stats.features is None and stats.feature_extractor == f"{STATISTICS_FILE_PREFIX}ref.npz"
    np.savez(tmp_path / "wide.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="4-d statistics but the feature extractor .* gives 8-d"):
        _load(str(tmp_path / "wide.npz"), tmp_path)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="must hold arrays 'mu' and 'sigma'"):
        read_statistics_file(tmp_path / "bad.npz")
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npz").write_bytes((tmp_path / "obj.npy").read_bytes())
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_statistics_file(tmp_path / "obj.npz")


def test_a_registered_torch_fidelity_dataset_is_a_reference(tmp_path):
    import torch_fidelity

    images = (random_images(6, 2) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    seen = {}

    class Tiny(torch.utils.data.Dataset):
        def __init__(self, root, download):
            seen.update(root=root, download=download)

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]

    name = "calmwild-test-tiny"
    torch_fidelity.register_dataset(name, Tiny)
    try:
        stats = _load(f"{TORCH_FIDELITY_PREFIX}{name}", tmp_path, datasets_root=tmp_path / "datasets")
    finally:
        import torch_fidelity.registry as registry

        registry.DATASETS_REGISTRY.pop(name)
    mu, _ = feature_statistics(extract_features(images, EXTRACTOR))
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-12)
    assert seen == {"root": str(tmp_path / "datasets"), "download": True}
    with pytest.raises(ValueError, match="torch-fidelity has no dataset 'nope'"):
        _load(f"{TORCH_FIDELITY_PREFIX}nope", tmp_path)


@pytest.mark.parametrize("reference, message", [
    ("", "expected train, heldout, a folder"),
    ("trian", "neither a set name nor an existing folder"),
    ("missing.npz", "no such statistics file"),
    (TORCH_FIDELITY_PREFIX, "name the torch-fidelity dataset"),
])
def test_a_bad_reference_is_one_clear_error(reference, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        reference_kind(reference)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        FIDSettings(feature_extractor="random", reference=reference)
