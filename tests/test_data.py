"""Tests for calmwild.data: every datamodule against independent reads of its source (sklearn arrays, PIL decoding
and resizing, pickled CIFAR batches written here), the shared checks, the seeded loader and the error messages."""

from __future__ import annotations

import io
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import calmwild.data.cifar10 as cifar10_module
from calmwild.data import (
    CelebADataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    DummyClassDataModule,
    EpochSeededSampler,
    ImageFolderDataModule,
    InMemoryImageDataModule,
    content_hash,
)
from calmwild.data.base import DeviceBatches

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pil_reference(path: Path, resolution: int | None = None, grayscale: bool = False, crop: bool = False) -> np.ndarray:
    """Independent pipeline with PIL only: crop -> float luma (601) or RGB -> PIL float bilinear resize -> [-1, 1]."""
    img = Image.open(path).convert("RGB")
    if crop:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    rgb = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    planes = [rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)] if grayscale else [rgb[..., c] for c in range(3)]
    if resolution is not None:
        size = (resolution, resolution)
        planes = [np.asarray(Image.fromarray(p, mode="F").resize(size, Image.BILINEAR)) for p in planes]
    return np.stack(planes)


# ----- digits (embedded default) ------------------------------------------------------------------------------------


def test_digits_split_matches_sklearn_first_and_last():
    dm = DigitsDataModule(num_train=300, num_heldout=400, resolution=8, batch_size=32)
    dm.setup()
    ref = torch.as_tensor(load_digits().images, dtype=torch.float32) / 8.0 - 1.0
    assert dm.train_images.shape == (300, 1, 8, 8) and dm.heldout_images.shape == (400, 1, 8, 8)
    assert dm.train_images.dtype == torch.float32 and dm.image_shape == (1, 8, 8)
    torch.testing.assert_close(dm.train_images[:, 0], ref[:300])
    torch.testing.assert_close(dm.heldout_images[:, 0], ref[-400:])
    assert 300 <= len(ref) - 400  # index ranges [0, 300) and [1397, 1797) are disjoint
    assert dm.train_images.min() == -1.0 and dm.train_images.max() == 1.0
    assert dm.train_labels is None and dm.num_classes == 0


def test_digits_upscale_equals_plain_bilinear_interpolation():
    dm = DigitsDataModule(num_train=50, num_heldout=50, resolution=16, batch_size=10)
    dm.setup()
    ref = torch.as_tensor(load_digits().images[:50], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    expected = torch.nn.functional.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dm.train_images, expected, atol=1e-6, rtol=0)
    assert dm.train_images.min() >= -1.0 and dm.train_images.max() <= 1.0


def test_digits_class_filter_and_determinism():
    dm = DigitsDataModule(num_train=100, num_heldout=50, resolution=8, classes=[3, 7], batch_size=10)
    dm.setup()
    digits = load_digits()
    keep = np.isin(digits.target, [3, 7])
    ref = torch.as_tensor(digits.images[keep], dtype=torch.float32) / 8.0 - 1.0
    torch.testing.assert_close(dm.train_images[:, 0], ref[:100])
    torch.testing.assert_close(dm.heldout_images[:, 0], ref[-50:])
    again = DigitsDataModule(num_train=100, num_heldout=50, resolution=8, classes=[7, 3], batch_size=10)
    again.setup()
    assert again.describe()["train_hash"] == dm.describe()["train_hash"]
    with pytest.raises(ValueError, match="digits 0-9"):
        DigitsDataModule(classes=[11])


def test_digits_subset_and_argument_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"1800.*1797"):
        DigitsDataModule(num_train=1000, num_heldout=800).setup()
    with pytest.raises(ValueError, match=r"power of two, got 12"):
        DigitsDataModule(resolution=12)
    with pytest.raises(TypeError, match="batch_size"):
        DigitsDataModule(batch_size=2.5)
    dm = DigitsDataModule(num_train=20, num_heldout=20, resolution=8, batch_size=64)
    dm.setup()
    with pytest.raises(ValueError, match=r"batch_size=64 exceeds the 20"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match="setup"):
        _ = DigitsDataModule().train_images


def test_describe_is_json_and_hash_is_uint8_sha256():
    import hashlib
    import json

    dm = DigitsDataModule(num_train=40, num_heldout=30, resolution=8, batch_size=8)
    dm.setup()
    info = json.loads(json.dumps(dm.describe()))
    assert info["train_size"] == 40 and info["heldout_size"] == 30 and info["image_shape"] == [1, 8, 8]
    assert info["settings"]["num_train"] == 40 and info["source"] == "sklearn.datasets.load_digits"
    # independent hash: digits 0..16 -> uint8 by the same affine map, rounded half away from zero as numpy does
    raw = load_digits().images[:40].astype(np.float64)
    uint8 = np.round((raw / 8.0) * 127.5).astype(np.uint8).reshape(40, 1, 8, 8)
    expected = hashlib.sha256(repr((40, 1, 8, 8)).encode() + uint8.tobytes()).hexdigest()[:16]
    assert info["train_hash"] == expected == content_hash(dm.train_images)


# ----- loader: fixed batches, seeded and resumable order ------------------------------------------------------------


def test_loader_fixed_batches_and_seeded_epoch_order():
    dm = DigitsDataModule(num_train=100, num_heldout=10, resolution=8, batch_size=32, seed=5)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == 3 and loader.device == torch.device("cpu")
    workers = DigitsDataModule(num_train=100, num_heldout=10, resolution=8, batch_size=32, num_workers=2, seed=5)
    workers.setup()
    collated = workers.train_dataloader()
    assert collated.persistent_workers and collated.drop_last and len(collated) == 3  # not iterated: no processes
    batches = list(loader)
    assert all(len(b) == 1 and b[0].shape == (32, 1, 8, 8) for b in batches)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSeededSampler(torch.utils.data.TensorDataset(torch.zeros(100)), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(5, 0)
    assert sorted(first) == list(range(100))
    assert first == order(5, 0)  # a fresh sampler (a resumed run) reproduces the epoch
    assert first != order(5, 1) and first != order(6, 0)
    served = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(served, dm.train_images[first[:96]])
    in_process = DigitsDataModule(num_train=100, num_heldout=10, resolution=8, batch_size=32, seed=5, num_workers=0)
    in_process.setup()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, in_process.train_dataloader()))


def test_device_batches_resume_mid_epoch_with_the_batches_an_uninterrupted_epoch_serves():
    dm = DummyClassDataModule(DigitsDataModule(num_train=40, num_heldout=10, resolution=8, batch_size=8, seed=3))
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    whole = list(loader)
    assert len(whole) == 10 and all(len(b) == 2 and b[0].shape == (8, 1, 8, 8) for b in whole)  # images, labels
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_served": 4}
    fresh = dm.train_dataloader()  # a resumed run builds a new loader and is handed the saved position
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == 6 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, whole[4:]))
    fresh.load_state_dict({"epoch": 2, "batches_served": 10})  # saved after the last batch: the next epoch
    assert fresh.sampler.epoch == 3 and len(list(fresh)) == 10


def test_lightning_calls_set_epoch_so_each_epoch_has_its_seeded_order(tmp_path):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0].clone())
            return (self.weight * batch[0].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = DigitsDataModule(num_train=20, num_heldout=10, resolution=8, batch_size=10, seed=2)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    sampler = EpochSeededSampler(torch.utils.data.TensorDataset(torch.zeros(20)), seed=2)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected.append(dm.train_images[list(sampler)])
    torch.testing.assert_close(torch.cat(model.seen), torch.cat(expected))


# ----- shared validation --------------------------------------------------------------------------------------------


class _Given(InMemoryImageDataModule):
    """A datamodule serving fixed tensors, to exercise the shared checks."""

    def __init__(self, train, heldout, labels=None, **kwargs):
        super().__init__(**kwargs)
        self._given = (train, heldout, labels)

    def origin(self) -> str:
        return "test tensors"

    def load(self):
        return self._given


def test_nan_inf_empty_and_out_of_range_are_rejected():
    good = torch.zeros(4, 1, 4, 4)
    bad = good.clone()
    bad[1, 0, 2, 2] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/inf pixel values in the training"):
        _Given(bad, good, batch_size=2).setup()
    with pytest.raises(ValueError, match="held-out set is empty"):
        _Given(good, good[:0], batch_size=2).setup()
    with pytest.raises(ValueError, match=r"\[-1, 1\].*255"):
        _Given(good + 255.0, good, batch_size=2).setup()
    with pytest.raises(ValueError, match="differ in shape"):
        _Given(good, torch.zeros(2, 3, 4, 4), batch_size=2).setup()
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        _Given(good, good, labels=torch.zeros(3, dtype=torch.long), batch_size=2).setup()


def test_checkpoint_state_warns_when_the_training_set_changed():
    a = _Given(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2), batch_size=2)
    b = _Given(torch.full((4, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2), batch_size=2)
    a.setup()
    b.setup()
    state = a.state_dict()
    a.load_state_dict(state)  # same data: silent
    with pytest.warns(UserWarning, match=state["describe"]["train_hash"]):
        b.load_state_dict(state)


# ----- image folder -------------------------------------------------------------------------------------------------


def _write_pngs(folder: Path, count: int, size=(6, 4), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / ("b" if i % 2 else "a")  # nested folders: the order is by full path
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def test_image_folder_exact_pixels_and_sorted_split(tmp_path):
    paths = _write_pngs(tmp_path / "imgs", 10)
    dm = ImageFolderDataModule(str(tmp_path / "imgs"), num_train=6, num_heldout=3, batch_size=2)
    dm.setup()
    assert dm.train_images.shape == (6, 3, 4, 6) and dm.heldout_images.shape == (3, 3, 4, 6)
    expected = torch.stack([torch.from_numpy(pil_reference(p)) for p in paths])
    torch.testing.assert_close(dm.train_images, expected[:6])
    torch.testing.assert_close(dm.heldout_images, expected[6:9])
    rest = ImageFolderDataModule(str(tmp_path / "imgs"), num_train=None, num_heldout=4, batch_size=2)
    rest.setup()
    assert len(rest.train_images) == 6 and len(rest.heldout_images) == 4


def test_image_folder_grayscale_resize_crop_match_pil(tmp_path):
    paths = _write_pngs(tmp_path / "imgs", 5, size=(13, 9))
    dm = ImageFolderDataModule(
        str(tmp_path / "imgs"), num_train=3, num_heldout=2, resolution=4, grayscale=True, center_crop=True, batch_size=1
    )
    dm.setup()
    assert dm.image_shape == (1, 4, 4)
    expected = torch.stack([torch.from_numpy(pil_reference(p, 4, grayscale=True, crop=True)) for p in paths])
    torch.testing.assert_close(torch.cat([dm.train_images, dm.heldout_images]), expected, atol=1e-5, rtol=0)


def test_image_folder_separate_heldout_root(tmp_path):
    _write_pngs(tmp_path / "train", 4)
    held = _write_pngs(tmp_path / "held", 3, seed=1)
    dm = ImageFolderDataModule(str(tmp_path / "train"), heldout_root=str(tmp_path / "held"), num_heldout=None,
                               batch_size=4)
    dm.setup()
    assert len(dm.train_images) == 4 and len(dm.heldout_images) == 3
    torch.testing.assert_close(dm.heldout_images[0], torch.from_numpy(pil_reference(held[0])))


def test_image_folder_errors_name_files_and_folders(tmp_path):
    paths = _write_pngs(tmp_path / "corrupt", 4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(ValueError, match=paths[2].name):
        ImageFolderDataModule(str(tmp_path / "corrupt"), num_train=2, num_heldout=2, batch_size=1).setup()
    paths[2].write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=paths[2].name):
        ImageFolderDataModule(str(tmp_path / "corrupt"), num_train=2, num_heldout=2, batch_size=1).setup()

    mixed = _write_pngs(tmp_path / "mixed", 3)
    Image.new("RGB", (8, 8)).save(mixed[1])
    with pytest.raises(ValueError, match=rf"{mixed[0].name} is 6x4.*{mixed[1].name} is 8x8"):
        ImageFolderDataModule(str(tmp_path / "mixed"), num_train=2, num_heldout=1, batch_size=1).setup()
    ok = ImageFolderDataModule(str(tmp_path / "mixed"), num_train=2, num_heldout=1, resolution=4, batch_size=1)
    ok.setup()  # a resolution resolves mixed sizes
    assert ok.image_shape == (3, 4, 4)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images with extensions.*\.png.*empty"):
        ImageFolderDataModule(str(tmp_path / "empty"), num_train=1, num_heldout=1).setup()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), num_train=1, num_heldout=1).setup()
    with pytest.raises(ValueError, match=r"num_train \+ num_heldout = 3 \+ 2 = 5 exceeds the 3"):
        ImageFolderDataModule(str(tmp_path / "mixed"), num_train=3, num_heldout=2, resolution=4).setup()


# ----- CIFAR-10 from a fake cifar-10-batches-py --------------------------------------------------------------------


def _fake_cifar(root: Path, monkeypatch, per_batch: int = 40, test_size: int = 30) -> dict:
    """torchvision's pickle layout; image k of the training split has all pixels = k % 256 and label (7k) % 10.
    The fake files' MD5 digests replace the published ones for the test."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_labels = []
    for b in range(5):
        ks = np.arange(b * per_batch, (b + 1) * per_batch)
        labels = [int(k * 7 % 10) for k in ks]
        data = np.repeat((ks % 256).astype(np.uint8)[:, None], 3072, axis=1)
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b + 1} of 5", "data": data, "labels": labels}, f)
        train_labels += labels
    ks = np.arange(test_size)
    test_labels = [int(k * 3 % 10) for k in ks]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.repeat((255 - ks).astype(np.uint8)[:, None], 3072, axis=1), "labels": test_labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch}, f)
    monkeypatch.setattr(cifar10_module, "PUBLISHED_MD5", {p.name: cifar10_module._md5(p) for p in folder.iterdir()})
    return {"train_labels": np.array(train_labels), "test_labels": np.array(test_labels)}


def _pixel_ids(images: torch.Tensor) -> list[int]:
    """Recover the constant uint8 value of each fake image."""
    return [int(v) for v in ((images[:, 0, 0, 0] + 1) * 127.5).round()]


def test_cifar10_first_n_and_car_filter(tmp_path, monkeypatch):
    fake = _fake_cifar(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(str(tmp_path), num_train=50, num_heldout=20, batch_size=10)
    dm.setup()
    assert dm.train_images.shape == (50, 3, 32, 32) and dm.image_shape == (3, 32, 32)
    assert _pixel_ids(dm.train_images) == list(range(50))  # spans data_batch_1 and _2
    assert _pixel_ids(dm.heldout_images) == [255 - k for k in range(20)]
    assert dm.train_labels is None

    cars = CIFAR10DataModule(str(tmp_path), num_train=15, num_heldout=3, classes=["automobile"], conditional=True,
                             batch_size=5)
    cars.setup()
    car_ids = np.flatnonzero(fake["train_labels"] == 1)[:15]
    assert _pixel_ids(cars.train_images) == [int(k % 256) for k in car_ids]
    assert cars.train_labels.tolist() == [1] * 15 and cars.num_classes == 10
    assert _pixel_ids(cars.heldout_images) == [255 - k for k in np.flatnonzero(fake["test_labels"] == 1)[:3]]
    batch = next(iter(cars.train_dataloader()))
    assert len(batch) == 2 and batch[1].dtype == torch.long
    by_index = CIFAR10DataModule(str(tmp_path), num_train=15, num_heldout=3, classes=[1], batch_size=5)
    by_index.setup()
    torch.testing.assert_close(by_index.train_images, cars.train_images)


def test_cifar10_class_balanced_and_errors(tmp_path, monkeypatch):
    fake = _fake_cifar(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(str(tmp_path), num_train=30, num_heldout=10, class_balanced=True, batch_size=10)
    dm.setup()
    expected = np.sort(np.concatenate([np.flatnonzero(fake["train_labels"] == c)[:3] for c in range(10)]))
    assert _pixel_ids(dm.train_images) == [int(k % 256) for k in expected]
    with pytest.raises(ValueError, match=r"divisible.*10 classes.*25"):
        CIFAR10DataModule(str(tmp_path), num_train=25, class_balanced=True, batch_size=5).setup()
    with pytest.raises(ValueError, match=r"num_train = 21 exceeds the 20 images.*automobile"):
        CIFAR10DataModule(str(tmp_path), num_train=21, num_heldout=1, classes=["automobile"], batch_size=1).setup()
    with pytest.raises(ValueError, match=r"'lorry'.*automobile"):
        CIFAR10DataModule(str(tmp_path), classes=["lorry"]).setup()


def test_cifar10_missing_files_name_the_path_and_the_remedy(tmp_path):
    searched = tmp_path / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=rf"{searched}.*download=True.*cifar-10-batches-py"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar10_download_fails_fast_when_the_server_is_silent(tmp_path, monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog but nothing ever answers
    port = silent.getsockname()[1]
    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    root = tmp_path / "data" / "cifar10"  # neither folder exists yet: a failed download must not leave them behind
    dm = CIFAR10DataModule(str(root), download=True, download_timeout=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match=r"could not download CIFAR-10.*timeout 0\.5 s.*cifar-10-batches-py"):
            dm.setup()
    finally:
        silent.close()
    assert time.monotonic() - start < 10
    assert socket.getdefaulttimeout() is None  # restored
    assert list(tmp_path.iterdir()) == []


# ----- CelebA -------------------------------------------------------------------------------------------------------


def _write_faces(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (22, 18, 3), dtype=np.uint8)).save(path, quality=95)
        paths.append(path)
    return paths


def test_celeba_folder_source_grayscale_crop_resize(tmp_path):
    paths = _write_faces(tmp_path / "faces", 7)
    dm = CelebADataModule(str(tmp_path / "faces"), num_train=4, num_heldout=2, resolution=8, source="folder",
                          batch_size=2)
    dm.setup()
    assert dm.train_images.shape == (4, 1, 8, 8) and dm.heldout_images.shape == (2, 1, 8, 8)
    expected = torch.stack([torch.from_numpy(pil_reference(p, 8, grayscale=True, crop=True)) for p in paths])
    torch.testing.assert_close(dm.train_images, expected[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.heldout_images, expected[4:6], atol=1e-5, rtol=0)


def test_celeba_torchvision_layout_uses_official_splits(tmp_path):
    folder = tmp_path / "celeba"
    paths = _write_faces(folder / "img_align_celeba", 8)
    splits = [0, 2, 0, 1, 2, 0, 2, 0]
    (folder / "list_eval_partition.txt").write_text("".join(f"{p.name} {s}\n" for p, s in zip(paths, splits)))
    dm = CelebADataModule(str(tmp_path), num_train=3, num_heldout=2, resolution=8, batch_size=3)
    dm.setup()
    expected = [torch.from_numpy(pil_reference(p, 8, grayscale=True, crop=True)) for p in paths]
    torch.testing.assert_close(dm.train_images, torch.stack([expected[i] for i in (0, 2, 5)]), atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.heldout_images, torch.stack([expected[i] for i in (1, 4)]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"num_train = 5 exceeds the 4 images.*train split"):
        CelebADataModule(str(tmp_path), num_train=5, num_heldout=1, resolution=8, batch_size=1).setup()


def test_celeba_missing_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'celeba'}.*list_eval_partition.txt.*source='folder'"):
        CelebADataModule(str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        CelebADataModule(str(tmp_path / "nothing_here"), source="folder").setup()
    with pytest.raises(ValueError, match="source='torchvision'"):
        CelebADataModule(str(tmp_path), source="folder", download=True)


# ----- dummy class --------------------------------------------------------------------------------------------------


def test_dummy_class_doubles_the_served_set_with_labels():
    base = DigitsDataModule(num_train=200, num_heldout=50, resolution=8, batch_size=16)
    dm = DummyClassDataModule(base, seed=1)
    dm.setup()
    base_again = DigitsDataModule(num_train=200, num_heldout=50, resolution=8)  # default batch_size 512 > 200: fine
    base_again.setup()
    torch.testing.assert_close(dm.train_images, base_again.train_images)  # metrics see the real images only
    torch.testing.assert_close(dm.heldout_images, base_again.heldout_images)
    assert dm.train_labels.tolist() == [0] * 200
    assert dm.served_images.shape == (400, 1, 8, 8) and dm.served_labels.tolist() == [0] * 200 + [1] * 200
    torch.testing.assert_close(dm.served_images[:200], dm.train_images)
    noise = dm.served_images[200:]
    # uniform on [-1, 1]: mean 0, variance 1/3; 12,800 draws -> standard errors about 0.005 and 0.0024
    assert noise.min() >= -1.0 and noise.max() <= 1.0
    assert abs(float(noise.mean())) < 0.03 and abs(float(noise.var()) - 1 / 3) < 0.015
    assert dm.num_classes == 2 and dm.sample_class == 0
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 8, 8) and labels.shape == (16,)
    info = dm.describe()
    assert info["served_size"] == 400 and info["train_hash"] == info["base"]["train_hash"]

    fewer = DummyClassDataModule(DigitsDataModule(num_train=100, num_heldout=10, resolution=8, batch_size=8),
                                 noise_images=30, seed=1)
    fewer.setup()
    assert len(fewer.served_images) == 130 and int(fewer.served_labels.sum()) == 30
    # the wrapper serves real + noise, so a batch larger than the real set alone is fine
    wide = DummyClassDataModule(DigitsDataModule(num_train=100, num_heldout=10, resolution=8, batch_size=150))
    wide.setup()
    assert next(iter(wide.train_dataloader()))[0].shape[0] == 150
    with pytest.raises(ValueError, match="unconditional"):
        DummyClassDataModule(CIFAR10DataModule("unused", conditional=True))


# ----- configuration through jsonargparse (as LightningCLI exposes them) ---------------------------------------------


def test_datamodules_are_configurable_by_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(InMemoryImageDataModule, "data")
    cfg = parser.parse_object({"data": {
        "class_path": "calmwild.data.DummyClassDataModule",
        "init_args": {"base": {"class_path": "calmwild.data.DigitsDataModule",
                               "init_args": {"num_train": 64, "num_heldout": 20, "resolution": 8, "batch_size": 32}},
                      "seed": 4},
    }})
    dm = parser.instantiate(cfg).data
    assert isinstance(dm, DummyClassDataModule) and dm.base.num_train == 64 and dm.batch_size == 32
    cfg = parser.parse_object({"data": {"class_path": "calmwild.data.CIFAR10DataModule",
                                        "init_args": {"root": "x", "classes": ["automobile"], "batch_size": 8}}})
    assert cfg.data.init_args.classes == ["automobile"] and cfg.data.init_args.batch_size == 8
    out = io.StringIO()
    sub = ArgumentParser()
    sub.add_class_arguments(CIFAR10DataModule, "data")
    sub.print_help(out)
    assert "class_balanced" in out.getvalue() and "images per training batch" in out.getvalue()
