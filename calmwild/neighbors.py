"""Exact Euclidean distances between image sets, chunked on the device.

Squared distances use ||x - y||^2 = ||x||^2 - 2 <x, y> + ||y||^2 as one matrix product per chunk. In float32 the
identity loses accuracy when x and y are close (cancellation); callers that need exact small distances recompute
them directly for the few candidates that matter (see :func:`knn`).
"""

from __future__ import annotations

import torch


def flatten(images: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, d] (a view when possible)."""
    return images.reshape(images.shape[0], -1)


def squared_distances(
    x: torch.Tensor, y: torch.Tensor, y_sq_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Matrix of squared distances [len(x), len(y)] between rows of flattened ``x`` and ``y`` via one matmul,
    clamped at zero. ``y_sq_norms`` (||y_j||^2) may be passed to avoid recomputing it for every query chunk."""
    x, y = flatten(x), flatten(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {x.shape[1]} features, references {y.shape[1]}")
    if y_sq_norms is None:
        y_sq_norms = (y * y).sum(dim=1)
    x_sq = (x * x).sum(dim=1, keepdim=True)
    d2 = torch.addmm(x_sq + y_sq_norms.unsqueeze(0), x, y.T, beta=1.0, alpha=-2.0)
    return d2.clamp_min_(0.0)
