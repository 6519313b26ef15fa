"""The dummy-class baseline of Yoon et al. (2023): pure-noise images as a second class beside the real data."""

from __future__ import annotations

import torch

from calmwild.checks import check_optional_count
from calmwild.data.base import InMemoryImageDataModule, LoadedImages

DATA_CLASS = 0
NOISE_CLASS = 1


class DummyClassDataModule(InMemoryImageDataModule):
    """Wraps a datamodule and adds pure-noise images as a second class (paper Section 5, "Dummy"; Yoon et al. 2023).

    The real training images get label 0 and ``noise_images`` noise images label 1; the network is trained
    class-conditionally on both (``num_classes = 2``) and sampled with the data class (``sample_class = 0``).

    Noise: every pixel i.i.d. uniform on [-1, 1], i.e. the full pixel range like random 8-bit images (chosen over a
    Gaussian, which would need clipping and pile mass on the bounds), drawn once from a generator seeded with
    ``seed``.

    What is what: ``train_images`` is the REAL training set only (memorization is measured against real images)
    and ``train_labels`` its labels (all 0); ``heldout_images`` are the base's. The training dataloader serves
    ``served_images`` = real images followed by the noise images, with ``served_labels`` = [0]*N + [1]*M.
    ``batch_size``, ``num_workers`` and ``pin_memory`` are the base's.

    Args:
        base: the datamodule of real images (unconditional).
        noise_images: number of noise images; None adds as many as there are real training images.
        seed: seed of the noise images and of the shuffling order (the base's seed is not used).
    """

    def __init__(self, base: InMemoryImageDataModule, noise_images: int | None = None, seed: int = 0):
        if not isinstance(base, InMemoryImageDataModule):
            raise TypeError(f"base must be an InMemoryImageDataModule, got {type(base).__name__}")
        if base.num_classes:
            raise ValueError(
                f"the dummy class needs an unconditional base datamodule, got {type(base).__name__} with "
                f"num_classes={base.num_classes}"
            )
        check_optional_count(noise_images, "noise_images")
        super().__init__(
            batch_size=base.batch_size, num_workers=base.num_workers, seed=seed, pin_memory=base.pin_memory
        )
        self.base = base
        self.noise_images = noise_images
        self.num_classes = 2
        self.sample_class = DATA_CLASS
        self._noise: torch.Tensor | None = None
        self._served: tuple[torch.Tensor, torch.Tensor] | None = None

    def origin(self) -> str:
        return self.base.origin()

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def load(self) -> LoadedImages:
        self.base.setup()
        real = self.base.train_images
        count = len(real) if self.noise_images is None else self.noise_images
        generator = torch.Generator().manual_seed(self.seed)
        self._noise = torch.rand((count, *real.shape[1:]), generator=generator) * 2.0 - 1.0
        labels = torch.full((len(real),), DATA_CLASS, dtype=torch.long)
        self._served = (
            torch.cat([real, self._noise]),
            torch.cat([labels, torch.full((count,), NOISE_CLASS, dtype=torch.long)]),
        )
        return real, self.base.heldout_images, labels

    @property
    def served_images(self) -> torch.Tensor:
        self._require_setup()
        return self._served[0]

    @property
    def served_labels(self) -> torch.Tensor:
        self._require_setup()
        return self._served[1]

    def describe(self) -> dict:
        """The wrapper's description (sizes refer to the real images, ``served_size`` to real + noise), the noise
        set's size and hash, and the base's own description."""
        return {
            **super().describe(),
            "noise_images": len(self._noise),
            "noise_hash": self.cached_hash("noise", self._noise),
            "base": self.base.describe(),
        }
