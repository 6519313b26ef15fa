"""Point sets the geometry and risk tests share: Gaussian clusters and regular simplices in R^d."""

import math

import torch


def clusters(n: int, d: int, seed: int, centers: int = 4, spread: float = 0.3) -> torch.Tensor:
    """n points from a mixture of Gaussian clusters in R^d with unit-scale pairwise distances."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=gen) / math.sqrt(2.0)
    labels = torch.randint(centers, (n,), generator=gen)
    return means[labels] + spread * torch.randn(n, d, generator=gen) / math.sqrt(d)


def simplex(count: int, d: int, distance: float) -> torch.Tensor:
    """``count`` vertices of a regular simplex with all pairwise distances ``distance`` (scaled basis vectors)."""
    pts = torch.zeros(count, d)
    pts[torch.arange(count), torch.arange(count)] = distance / math.sqrt(2.0)
    return pts


# ------------------------------------------------------------------------------------------------- shells
