"""CIFAR-10 subsets (first N, class-filtered, class-balanced) read from torchvision's ``cifar-10-batches-py``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from calmwild.checks import check_count, check_subset
from calmwild.data.base import InMemoryImageDataModule, LoadedImages
from calmwild.data.convert import uint8_to_signed
from calmwild.data.download import download_or_explain
from calmwild.interop.safe_pickle import NUMPY_GLOBALS, PROTOCOL2_GLOBALS, restricted_load

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
CIFAR10_URL = CIFAR10.url  # https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (about 163 MB)
NUM_CLASSES = 10
# The MD5 digests torchvision publishes for the files of cifar-10-python.tar.gz (Krizhevsky's release).
PUBLISHED_MD5 = {name: md5 for name, md5 in (*CIFAR10.train_list, *CIFAR10.test_list)} | {
    CIFAR10.meta["filename"]: CIFAR10.meta["md5"]
}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_batch(path: Path) -> dict:
    """One batch file, after its MD5 matched the published one; unpickled with numpy's array globals only, so even
    a file that passed the check could not run code."""
    expected = PUBLISHED_MD5.get(path.name)
    actual = _md5(path)
    if actual != expected:
        raise ValueError(f"{path} is not the published CIFAR-10 file: MD5 {actual}, expected {expected}; refusing to "
                         "unpickle it (replace it with the file from cifar-10-python.tar.gz)")
    return restricted_load(path, {**NUMPY_GLOBALS, **PROTOCOL2_GLOBALS}, encoding="latin1")


def _read_split(folder: Path, batches: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] of the given batch files, in file order."""
    data, labels = [], []
    for name in batches:
        entry = _read_batch(folder / name)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"], dtype=np.int64))
    return np.concatenate(data), np.concatenate(labels)


def select_indices(labels: np.ndarray, classes: list[int], count: int, balanced: bool, name: str, where: str):
    """Indices (ascending) of the first ``count`` images whose label is in ``classes``; with ``balanced`` the first
    ``count / len(classes)`` of each class (Gu et al.'s class-balanced subsets). Errors name the numbers."""
    if not balanced:
        candidates = np.flatnonzero(np.isin(labels, classes))
        check_subset(count, name, len(candidates), where)
        return candidates[:count]
    if count % len(classes):
        raise ValueError(
            f"class_balanced needs {name} divisible by the {len(classes)} classes, got {name} = {count}"
        )
    per_class = count // len(classes)
    chosen = []
    for c in classes:
        candidates = np.flatnonzero(labels == c)
        check_subset(
            per_class, f"{name} / {len(classes)} classes (per class)", len(candidates), f"class {c} of {where}"
        )
        chosen.append(candidates[:per_class])
    return np.sort(np.concatenate(chosen))


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 (3x32x32) subsets as used in memorization studies.

    Training images: the first ``num_train`` images of CIFAR-10's training split after the class filter (the seed
    paper's 1k subset is the first 1,000 images; its car subset is ``classes: [automobile]``); with
    ``class_balanced`` the first ``num_train / k`` images of each of the k classes (Gu et al.). Held-out images: the
    first ``num_heldout`` images of the TEST split after the same class filter, so they never overlap the training
    images. Files are read from ``<root>/cifar-10-batches-py`` (torchvision's layout), each only after its MD5 matched
    the published one, and unpickled with numpy's array globals only.

    Args:
        root: folder that holds (or will receive) ``cifar-10-batches-py``.
        num_train: number of training images.
        num_heldout: number of held-out images (from the test split, at most 1,000 per class).
        classes: keep only these classes, by index (0-9) or name (e.g. ``automobile``); None keeps all.
        download: fetch the archive (about 163 MB) into ``root`` when the files are missing.
        class_balanced: take the first ``num_train / k`` training images of each of the k kept classes.
        conditional: serve (image, label) batches; labels are the original CIFAR-10 class indices, so
            ``num_classes`` is 10 whatever the filter.
        download_timeout: seconds a network operation may stall before the download is abandoned.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        num_train: int = 1000,
        num_heldout: int = 1000,
        classes: list[int | str] | None = None,
        download: bool = False,
        class_balanced: bool = False,
        conditional: bool = False,
        download_timeout: float = 30.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_count(num_train, "num_train")
        check_count(num_heldout, "num_heldout")
        if classes is not None and len(classes) == 0:
            raise ValueError("classes must be None (all classes) or a non-empty list")
        self.root = Path(root)
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.classes = classes
        self.download = download
        self.class_balanced = class_balanced
        self.conditional = conditional
        self.download_timeout = download_timeout
        self.num_classes = NUM_CLASSES if conditional else 0

    @property
    def folder(self) -> Path:
        return self.root / BASE_FOLDER

    def origin(self) -> str:
        return str(self.folder)

    def _missing(self) -> list[str]:
        return [n for n in (*TRAIN_BATCHES, TEST_BATCH, META_FILE) if not (self.folder / n).is_file()]

    def prepare_data(self) -> None:
        """Downloads the archive when files are missing and ``download`` is set; otherwise explains what is missing."""
        missing = self._missing()
        if not missing:
            return
        manual = (
            f"Alternatively place the extracted `{BASE_FOLDER}` folder (from cifar-10-python.tar.gz, {CIFAR10_URL}) "
            f"under root={self.root}."
        )
        if not self.download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: searched {self.folder}, missing {missing}. Pass download=True to fetch it "
                f"(about 163 MB), or place the extracted `{BASE_FOLDER}` folder under root={self.root}."
            )
        download_or_explain(
            lambda: download_and_extract_archive(CIFAR10_URL, str(self.root), md5=CIFAR10.tgz_md5),
            "CIFAR-10", str(self.root), self.download_timeout, manual,
        )

    def _class_indices(self, names: list[str]) -> list[int]:
        if self.classes is None:
            return list(range(NUM_CLASSES))
        indices = []
        for c in self.classes:
            if isinstance(c, str) and c in names:
                indices.append(names.index(c))
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES:
                indices.append(c)
            else:
                raise ValueError(f"unknown CIFAR-10 class {c!r}: expected an index 0-9 or one of {names}")
        return sorted(set(indices))

    def load(self) -> LoadedImages:
        self.prepare_data()
        names = list(_read_batch(self.folder / META_FILE)["label_names"])
        keep = self._class_indices(names)
        where = "CIFAR-10" if self.classes is None else f"CIFAR-10 classes {[names[i] for i in keep]}"
        images, labels = _read_split(self.folder, TRAIN_BATCHES)
        train_idx = select_indices(
            labels, keep, self.num_train, self.class_balanced, "num_train", f"the {where} training split"
        )
        test_images, test_labels = _read_split(self.folder, (TEST_BATCH,))
        heldout_idx = select_indices(
            test_labels, keep, self.num_heldout, False, "num_heldout", f"the {where} test split"
        )
        train = uint8_to_signed(torch.from_numpy(images[train_idx]))
        heldout = uint8_to_signed(torch.from_numpy(test_images[heldout_idx]))
        train_labels = torch.from_numpy(labels[train_idx]) if self.conditional else None
        return train, heldout, train_labels
