"""LightningDataModules holding small image sets in memory (one of calmwild's three Lightning-facing modules).

Every datamodule derives from :class:`InMemoryImageDataModule` and exposes, after ``setup()``, ``train_images`` and
``heldout_images`` (float32 CPU [N, C, H, W] in [-1, 1]), ``train_labels`` (long [N] or None), ``image_shape`` and
``describe()``.
"""

from calmwild.data.base import EpochSeededSampler, InMemoryImageDataModule
from calmwild.data.celeba import CelebADataModule
from calmwild.data.cifar10 import CIFAR10DataModule
from calmwild.data.convert import content_hash
from calmwild.data.dummy import DummyClassDataModule
from calmwild.data.embedded import DigitsDataModule
from calmwild.data.folder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "DigitsDataModule",
    "DummyClassDataModule",
    "EpochSeededSampler",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "content_hash",
]
