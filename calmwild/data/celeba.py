"""Grayscale, downscaled CelebA (the setup of Bonnaire et al. 2025 used in the paper's Section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torchvision.datasets import CelebA

from calmwild.checks import check_count, check_subset
from calmwild.data.base import InMemoryImageDataModule, LoadedImages
from calmwild.data.download import download_or_explain
from calmwild.data.files import list_image_files, load_image_files

BASE_FOLDER = "celeba"  # torchvision's layout: <root>/celeba/{img_align_celeba/, list_eval_partition.txt, ...}
IMAGE_FOLDER = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
SPLIT_CODES = {"train": "0", "valid": "1", "test": "2"}  # second column of list_eval_partition.txt


def read_partition(path: Path, split: str) -> list[str]:
    """File names of one split of CelebA's ``list_eval_partition.txt`` (lines ``<file> <0|1|2>``), in file order."""
    code = SPLIT_CODES[split]
    names = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in SPLIT_CODES.values():
                raise ValueError(f"{path}:{line_no}: expected '<image file> <0|1|2>', got {line.strip()!r}")
            if fields[1] == code:
                names.append(fields[0])
    return names


class CelebADataModule(InMemoryImageDataModule):
    """Aligned CelebA faces, by default grayscale 1x32x32 as in Bonnaire et al. (2025) and the paper's Section 5.

    Each image: largest centred square (``center_crop``; 178x178 of the aligned 178x218 faces), ITU-R 601 luma
    (``grayscale``), antialiased bilinear resize to ``resolution``, values in [-1, 1].

    Sources:

    - ``torchvision``: torchvision's layout ``<root>/celeba/img_align_celeba/*.jpg`` with
      ``<root>/celeba/list_eval_partition.txt``; training images are the first ``num_train`` of the official train
      split, held-out images the first ``num_heldout`` of the test split (read directly; the other annotation
      files are not needed). ``download`` fetches it with torchvision (Google Drive; needs ``gdown``).
    - ``folder``: any folder (searched recursively, sorted by path) of aligned CelebA images; the first
      ``num_train`` files are the training set, the next ``num_heldout`` the held-out set.

    Args:
        root: folder holding torchvision's ``celeba`` folder (source torchvision) or the images (source folder).
        num_train: number of training images.
        num_heldout: number of held-out images.
        resolution: side of the square images after resizing.
        grayscale: convert to one luma channel (ITU-R BT.601); False keeps RGB.
        source: ``torchvision`` (official splits) or ``folder`` (sorted files of a folder).
        download: fetch the data set with torchvision when missing (source torchvision only).
        center_crop: crop the largest centred square before resizing (keeps the aspect ratio of faces).
        download_timeout: seconds a network operation may stall before the download is abandoned.
    """

    def __init__(
        self,
        root: str = "data/celeba",
        num_train: int = 1024,
        num_heldout: int = 1024,
        resolution: int = 32,
        grayscale: bool = True,
        source: Literal["torchvision", "folder"] = "torchvision",
        download: bool = False,
        center_crop: bool = True,
        download_timeout: float = 30.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_count(num_train, "num_train")
        check_count(num_heldout, "num_heldout")
        check_count(resolution, "resolution")
        if source not in ("torchvision", "folder"):
            raise ValueError(f"source must be 'torchvision' or 'folder', got {source!r}")
        if download and source == "folder":
            raise ValueError("download=True needs source='torchvision'; a folder source is read as it is")
        self.root = Path(root)
        self.num_train = num_train
        self.num_heldout = num_heldout
        self.resolution = resolution
        self.grayscale = grayscale
        self.source = source
        self.download = download
        self.center_crop = center_crop
        self.download_timeout = download_timeout

    @property
    def folder(self) -> Path:
        return self.root / BASE_FOLDER if self.source == "torchvision" else self.root

    def origin(self) -> str:
        return str(self.folder)

    def _torchvision_present(self) -> bool:
        return (self.folder / IMAGE_FOLDER).is_dir() and (self.folder / PARTITION_FILE).is_file()

    def prepare_data(self) -> None:
        """Downloads (source torchvision, ``download``) or explains which path was searched and what is missing."""
        if self.source == "folder":
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"CelebA image folder {self.root} does not exist: point root at a folder of aligned CelebA images, "
                    "or use source='torchvision' with torchvision's celeba folder under root"
                )
            return
        if self._torchvision_present():
            return
        manual = (
            f"Alternatively place torchvision's `{BASE_FOLDER}` folder ({IMAGE_FOLDER}/ and {PARTITION_FILE}) under "
            f"root={self.root}, or use source='folder' with a folder of aligned CelebA images."
        )
        if not self.download:
            raise FileNotFoundError(
                f"CelebA not found: searched {self.folder} for {IMAGE_FOLDER}/ and {PARTITION_FILE}. Pass "
                f"download=True (torchvision, needs gdown), place torchvision's `{BASE_FOLDER}` folder under "
                f"root={self.root}, or use source='folder' with a folder of aligned CelebA images."
            )
        download_or_explain(
            lambda: CelebA(str(self.root), split="all", target_type=[], download=True),
            "CelebA", str(self.root), self.download_timeout, manual,
        )

    def _paths(self) -> tuple[list[Path], list[Path]]:
        if self.source == "folder":
            files = list_image_files(self.root)
            check_subset(
                self.num_train + self.num_heldout,
                f"num_train + num_heldout = {self.num_train} + {self.num_heldout}", len(files),
                f"the image folder {self.root}",
            )
            return files[: self.num_train], files[self.num_train : self.num_train + self.num_heldout]
        partition = self.folder / PARTITION_FILE
        train, test = read_partition(partition, "train"), read_partition(partition, "test")
        check_subset(self.num_train, "num_train", len(train), f"the CelebA train split ({partition})")
        check_subset(self.num_heldout, "num_heldout", len(test), f"the CelebA test split ({partition})")
        images = self.folder / IMAGE_FOLDER
        return [images / n for n in train[: self.num_train]], [images / n for n in test[: self.num_heldout]]

    def load(self) -> LoadedImages:
        self.prepare_data()
        train_paths, heldout_paths = self._paths()
        options = dict(resolution=self.resolution, grayscale=self.grayscale, center_crop=self.center_crop)
        return load_image_files(train_paths, **options), load_image_files(heldout_paths, **options), None
