"""Monte Carlo machinery shared by the geometry curves of paper Section 4: points as flat tensors, seeded
generators on the data's device, cluster standard errors, exact pair distances, and the unit roundoff of the distance
products (the noisy copies themselves are :mod:`calmwild.geometry.levels`')."""

from __future__ import annotations

import math

import torch

from calmwild.checks import check_positive
from calmwild.neighbors import flatten

# Elements per batch when distances of explicit (query, reference) pairs are recomputed in float64.
PAIR_BUDGET = 1 << 22


def as_points(x: torch.Tensor, name: str, min_count: int = 1) -> torch.Tensor:
    """[N, ...] float32/float64 tensor -> [N, d] (a view when possible)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, ...], got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [N, ...] with at least 2 dimensions, got {tuple(x.shape)}")
    if x.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} points, got {x.shape[0]}")
    return flatten(x)


def check_shell_t(t: float) -> float:
    """Lemma 4.5's shell parameter t: a finite positive number."""
    return check_positive(t, "shell width parameter t")


def cluster_mean_se(per_cluster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last axis and its standard error std / sqrt(P) (ddof 1) treating each column as one
    independent cluster (a base point with all its noises), so within-point correlation is accounted for.
    The standard error is NaN with a single cluster."""
    p = per_cluster.shape[-1]
    mean = per_cluster.mean(dim=-1)
    if p < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, per_cluster.std(dim=-1, correction=1) / math.sqrt(p)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the matrix products ``squared_distances`` runs in. float32 products may run in TF32 or bf16
    when the global matmul precision is lowered (``torch.set_float32_matmul_precision``), so that is honoured."""
    if dtype == torch.float64:
        return 2.0**-53
    return {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]


def pair_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_k - b_k|| for matched rows, computed directly in float64 (no cancellation), in bounded batches."""
    rows = max(1, PAIR_BUDGET // a.shape[1])
    out = [
        (a[s : s + rows].to(torch.float64) - b[s : s + rows].to(torch.float64)).pow(2).sum(dim=1).sqrt()
        for s in range(0, a.shape[0], rows)
    ]
    return torch.cat(out).cpu()
