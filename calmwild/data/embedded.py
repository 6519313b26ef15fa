"""The embedded default data set: scikit-learn's handwritten digits, no download needed."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from calmwild.checks import check_count, check_subset
from calmwild.data.base import InMemoryImageDataModule, LoadedImages
from calmwild.data.convert import resize_square

DIGITS_MAX = 16.0  # load_digits() pixels are counts of set bits in 4x4 blocks of a 32x32 bitmap: 0..16


class DigitsDataModule(InMemoryImageDataModule):
    """scikit-learn's ``load_digits()``: 1,797 grayscale 8x8 handwritten digits (pixel values 0..16), mapped to
    [-1, 1] by x / 8 - 1 and resized (antialiased bilinear) to ``resolution`` x ``resolution``.

    Why the default: these are real images that ship inside an installed package (no download, no network), and
    they are so small that a network trained on a few hundred of them memorizes within minutes on a CPU, which is
    the regime calmwild studies.

    Split (deterministic, no shuffling): after the optional class filter, the FIRST ``num_train`` digits are the
    training set and the LAST ``num_heldout`` digits the held-out set; they never overlap (their sum must not exceed
    the digits available).

    Args:
        num_train: number of training images (the first ones after the class filter).
        num_heldout: number of held-out images (the last ones after the class filter).
        resolution: side of the resized square images; a power of two (the U-Net halves it repeatedly). 8 keeps the
            native size.
        classes: keep only these digit labels (0-9), in their original order; None keeps all ten.
    """

    def __init__(
        self,
        num_train: int = 500,
        num_heldout: int = 500,
        resolution: int = 16,
        classes: list[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_count(num_train, "num_train")
        check_count(num_heldout, "num_heldout")
        check_count(resolution, "resolution")
        if resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two, got {resolution}")
        if classes is not None:
            bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9]
            if bad or not classes:
                raise ValueError(f"classes must be a non-empty list of digits 0-9, got {classes!r}")
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.resolution = resolution
        self.classes = None if classes is None else sorted(set(classes))

    def origin(self) -> str:
        return "sklearn.datasets.load_digits"

    def load(self) -> LoadedImages:
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [1797, 1, 8, 8]
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        where = "load_digits()"
        if self.classes is not None:
            keep = torch.isin(labels, torch.tensor(self.classes))
            images = images[keep]
            where = f"load_digits() restricted to classes {self.classes}"
        check_subset(
            self.num_train + self.num_heldout,
            f"num_train + num_heldout = {self.num_train} + {self.num_heldout}",
            len(images),
            where,
        )
        images = resize_square(images / (DIGITS_MAX / 2) - 1.0, self.resolution).clamp_(-1.0, 1.0)
        return images[: self.num_train], images[len(images) - self.num_heldout :], None
