"""LightningDataModules holding small image sets in memory (one of calmwild's Lightning-facing modules).

Every datamodule derives from :class:`InMemoryImageDataModule` and exposes, after ``setup()``, ``train_images`` and
``heldout_images`` (float32 CPU [N, C, H, W] in [-1, 1]), ``train_labels`` (long [N] or None), ``image_shape`` and
``describe()``. The datamodules are imported on first use, so the plain helpers beside them
(:mod:`calmwild.data.files`, :mod:`calmwild.data.convert`) can be used without importing Lightning.
"""

from calmwild.lazy import lazy_exports

# public name -> the module that defines it
_WHERE = {
    "CIFAR10DataModule": "cifar10", "CelebADataModule": "celeba", "DigitsDataModule": "embedded",
    "DummyClassDataModule": "dummy", "EpochSeededSampler": "base", "ImageFolderDataModule": "folder",
    "InMemoryImageDataModule": "base", "content_hash": "convert",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
