"""Any folder of images as a training set (and the held-out set from its tail or from a second folder)."""

from __future__ import annotations

from pathlib import Path

from calmwild.checks import check_optional_count, check_subset
from calmwild.data.base import InMemoryImageDataModule, LoadedImages
from calmwild.data.files import IMAGE_EXTENSIONS, list_image_files, load_image_files


class ImageFolderDataModule(InMemoryImageDataModule):
    """Images of a folder, searched recursively and sorted by path (so the split is the same on every machine).

    Split: without ``heldout_root``, the first ``num_train`` files are the training set and the next
    ``num_heldout`` the held-out set (``num_train`` None: everything before the last ``num_heldout`` files;
    ``num_heldout`` None: everything after the first ``num_train``; one of them must be given). With
    ``heldout_root``, the training set is the first ``num_train`` files of ``root`` (None: all) and the held-out
    set the first ``num_heldout`` files of ``heldout_root`` (None: all).

    Each image is decoded with PIL (any mode; RGB unless ``grayscale``), optionally centre-cropped to a square,
    converted to ITU-R 601 luma and resized (antialiased bilinear) to ``resolution``. Without ``resolution`` all
    images must have one size. Corrupt files and mixed sizes are errors naming the files.

    Args:
        root: folder of training images (searched recursively).
        num_train: number of training images; None as described above.
        num_heldout: number of held-out images; None as described above.
        resolution: resize every image to resolution x resolution; None keeps the (common) native size.
        grayscale: one luma channel (ITU-R BT.601) instead of RGB.
        center_crop: crop the largest centred square before resizing (avoids stretching non-square images).
        extensions: file suffixes counted as images (case-insensitive).
        heldout_root: a separate folder of held-out images; None splits ``root``.
    """

    def __init__(
        self,
        root: str,
        num_train: int | None = None,
        num_heldout: int | None = 100,
        resolution: int | None = None,
        grayscale: bool = False,
        center_crop: bool = False,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        heldout_root: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_optional_count(num_train, "num_train")
        check_optional_count(num_heldout, "num_heldout")
        check_optional_count(resolution, "resolution")
        if heldout_root is None and num_train is None and num_heldout is None:
            raise ValueError("to split one folder into training and held-out images, give num_train or num_heldout")
        self.root = Path(root)
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.resolution = resolution
        self.grayscale = grayscale
        self.center_crop = center_crop
        self.extensions = tuple(extensions)
        self.heldout_root = None if heldout_root is None else Path(heldout_root)

    def origin(self) -> str:
        return str(self.root) if self.heldout_root is None else f"{self.root} (held-out: {self.heldout_root})"

    def _split(self) -> tuple[list[Path], list[Path]]:
        files = list_image_files(self.root, self.extensions)
        where = f"the image folder {self.root}"
        if self.heldout_root is not None:
            heldout = list_image_files(self.heldout_root, self.extensions)
            num_train = len(files) if self.num_train is None else self.num_train
            num_heldout = len(heldout) if self.num_heldout is None else self.num_heldout
            check_subset(num_train, "num_train", len(files), where)
            check_subset(num_heldout, "num_heldout", len(heldout), f"the held-out folder {self.heldout_root}")
            return files[:num_train], heldout[:num_heldout]
        if self.num_train is None:
            check_subset(self.num_heldout, "num_heldout", len(files) - 1, f"{where} (keeping one training image)")
            num_train, num_heldout = len(files) - self.num_heldout, self.num_heldout
        elif self.num_heldout is None:
            check_subset(self.num_train, "num_train", len(files) - 1, f"{where} (keeping one held-out image)")
            num_train, num_heldout = self.num_train, len(files) - self.num_train
        else:
            num_train, num_heldout = self.num_train, self.num_heldout
            check_subset(
                num_train + num_heldout, f"num_train + num_heldout = {num_train} + {num_heldout}", len(files), where
            )
        return files[:num_train], files[num_train : num_train + num_heldout]

    def load(self) -> LoadedImages:
        train_paths, heldout_paths = self._split()
        # one pass over both lists, so a size mismatch between a training and a held-out file also names the files
        images = load_image_files(
            train_paths + heldout_paths,
            resolution=self.resolution,
            grayscale=self.grayscale,
            center_crop=self.center_crop,
        )
        return images[: len(train_paths)], images[len(train_paths) :], None
