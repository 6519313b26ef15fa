"""Pixel conversions shared by every datamodule: uint8 <-> [-1, 1], grayscale, centre crop, resize, content hash.

All functions take and return batched tensors [N, C, H, W] (or a single image [C, H, W] where stated).
"""

from __future__ import annotations

import hashlib

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# ITU-R BT.601 luma weights (R, G, B): Y' = 0.299 R' + 0.587 G' + 0.114 B'. They sum to 1, so the transform commutes
# with the affine map [0, 255] -> [-1, 1] and can be applied in either range.
LUMA_601 = (0.299, 0.587, 0.114)


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]: x / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (round to nearest, clamped): the inverse of :func:`uint8_to_signed`."""
    return ((images.detach().to(torch.float32) + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB -> [..., 1, H, W] luma with the ITU-R BT.601 weights; one channel is returned unchanged."""
    channels = images.shape[-3]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f"grayscale conversion needs 1 or 3 channels, got {channels} (shape {tuple(images.shape)})")
    weights = torch.tensor(LUMA_601, dtype=images.dtype, device=images.device).reshape(3, 1, 1)
    return (images * weights).sum(dim=-3, keepdim=True)


def center_crop_square(images: torch.Tensor) -> torch.Tensor:
    """The largest centred square of [..., H, W] (side min(H, W); for an odd excess the extra row/column is dropped
    at the bottom/right)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize float images [..., H, W] to resolution x resolution: bilinear with antialiasing (torchvision v2), so a
    downscale averages over the source pixels; bilinear never leaves the input range. A no-op at the same size."""
    if tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    if not images.is_floating_point():
        raise TypeError(f"resize expects float images, got dtype {images.dtype}")
    return TF.resize(images, [resolution, resolution], interpolation=InterpolationMode.BILINEAR, antialias=True)


def content_hash(images: torch.Tensor, length: int = 16) -> str:
    """Short fingerprint of an image set: the first ``length`` hex digits of sha256 over its shape and its
    uint8-quantised pixels (:func:`quantize_uint8`), so float noise below half a grey level does not change it."""
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(quantize_uint8(images.cpu()).contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]
