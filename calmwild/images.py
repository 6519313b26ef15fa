"""Image grids: plain grids of samples and [sample | nearest training image] pairs with memorized pairs framed."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

MEMORIZED_COLOR = (1.0, 0.85, 0.0)  # yellow frame, as in the paper's App. E.8 figures
NOVEL_COLOR = (0.35, 0.35, 0.35)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, as 3-channel float (grayscale repeated)."""
    images = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def enlarge(images: torch.Tensor, min_side: int = 32) -> torch.Tensor:
    """Images [N, C, H, W] upsampled by the smallest integer factor (nearest neighbour, pixels stay sharp) that makes
    their width at least ``min_side``; unchanged when already that large. For grids of small images (8x8 digits)."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(images.shape)}")
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """A [3, H', W'] grid in [0, 1] of images given in [-1, 1]."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [N, C, H, W], got shape {tuple(images.shape)}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    return make_grid(to_unit_range(images), nrow=nrow, padding=padding, pad_value=1.0)


def _framed(images: torch.Tensor, colors: torch.Tensor, width: int) -> torch.Tensor:
    """Pads each image [N,3,H,W] with a frame of its row's colour [N,3]."""
    n, c, h, w = images.shape
    out = colors.reshape(n, c, 1, 1).expand(n, c, h + 2 * width, w + 2 * width).clone()
    out[:, :, width : width + h, width : width + w] = images
    return out


def pair_grid(
    samples: torch.Tensor, nearest: torch.Tensor, memorized: torch.Tensor, pairs_per_row: int | None = None
) -> torch.Tensor:
    """Grid of [sample | its nearest training image] pairs (inputs in [-1, 1]); memorized pairs get a yellow frame,
    the others a grey one. Returns a [3, H', W'] tensor in [0, 1]."""
    if samples.shape != nearest.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and nearest images {tuple(nearest.shape)} differ in shape")
    if memorized.shape[0] != samples.shape[0]:
        raise ValueError(f"{memorized.shape[0]} memorization flags for {samples.shape[0]} samples")
    width = max(1, samples.shape[-1] // 16)
    colors = torch.where(
        memorized.reshape(-1, 1).cpu(), torch.tensor(MEMORIZED_COLOR), torch.tensor(NOVEL_COLOR)
    )
    pairs = torch.cat([to_unit_range(samples), to_unit_range(nearest)], dim=3)
    framed = _framed(pairs, colors, width)
    nrow = pairs_per_row or max(1, math.ceil(math.sqrt(samples.shape[0])))
    return make_grid(framed, nrow=nrow, padding=2, pad_value=1.0)


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """Writes a [3, H, W] grid in [0, 1] as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
    return path
