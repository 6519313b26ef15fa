"""Image files -> one in-memory tensor: listing a folder, decoding with PIL, cropping, grayscale and resizing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from calmwild.data.convert import center_crop_square, resize_square, to_grayscale, uint8_to_signed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_image_files(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All files under ``root`` (recursive) whose suffix is one of ``extensions`` (case-insensitive), sorted by path
    so the order - and with it every train / held-out split - is the same on every machine.

    Raises FileNotFoundError for a missing folder and ValueError for a folder without matching images, naming the
    folder and the extensions searched."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a directory)")
    wanted = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise ValueError(f"no images with extensions {sorted(wanted)} found under {root} (searched recursively)")
    return files


def read_image(path: Path) -> torch.Tensor:
    """Decode one file into uint8 RGB [3, H, W]; an unreadable, corrupt or truncated file is a ValueError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return TF.pil_to_tensor(rgb)


def load_image_files(
    paths: Sequence[Path], resolution: int | None = None, grayscale: bool = False, center_crop: bool = False
) -> torch.Tensor:
    """Decode ``paths`` into float32 [N, C, H, W] in [-1, 1] (C = 1 with ``grayscale``, else 3).

    Per image: largest centred square (``center_crop``), ITU-R 601 luma (``grayscale``), antialiased bilinear resize
    to ``resolution`` x ``resolution`` (when given). Without ``resolution`` all images must share one size; otherwise
    a ValueError names the first file and the first file of a different size, with both sizes."""
    if not paths:
        raise ValueError("no image files to load")
    images: list[torch.Tensor] = []
    for path in paths:
        image = read_image(path)
        if center_crop:
            image = center_crop_square(image)
        image = uint8_to_signed(image)
        if grayscale:
            image = to_grayscale(image)
        if resolution is not None:
            image = resize_square(image, resolution).clamp_(-1.0, 1.0)
        elif images and image.shape != images[0].shape:
            first = tuple(images[0].shape[-2:])
            cropped = " after the centre crop" if center_crop else ""
            raise ValueError(
                f"images differ in size{cropped}: {paths[0]} is {first[1]}x{first[0]} (WxH) but {path} is "
                f"{image.shape[-1]}x{image.shape[-2]}; pass a resolution to resize them all (optionally with "
                "center_crop) or use images of one size"
            )
        images.append(image)
    return torch.stack(images)
