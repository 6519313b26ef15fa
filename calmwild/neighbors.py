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


def knn(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int = 2,
    query_chunk: int = 1024,
    ref_chunk: int = 8192,
    margin: int = 8,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours: distances [Q, k] (float32, ascending) and indices [Q, k] into ``reference``.

    Candidates are found with the matrix-product identity, chunked over queries and references (memory
    O(query_chunk * ref_chunk)); the best k + ``margin`` candidates of each query are then re-scored exactly as
    ||x - y|| (difference first, so no cancellation) and re-sorted. Among equal distances the smaller index wins.
    """
    x, y = flatten(queries), flatten(reference)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {x.shape[1]} features, references {y.shape[1]}")
    n = y.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] (the reference size), got {k}")
    device = torch.device(device) if device is not None else y.device
    y = y.to(device)
    y_sq = (y.float() * y.float()).sum(dim=1)
    keep = min(n, k + margin)
    dists, indices = [], []
    for qs in range(0, x.shape[0], query_chunk):
        xq = x[qs : qs + query_chunk].to(device)
        best_d = torch.full((xq.shape[0], 0), torch.inf, device=device)
        best_i = torch.zeros((xq.shape[0], 0), dtype=torch.long, device=device)
        for rs in range(0, n, ref_chunk):
            d2 = squared_distances(xq.float(), y[rs : rs + ref_chunk].float(), y_sq[rs : rs + ref_chunk])
            cand_d = torch.cat([best_d, d2], dim=1)
            cand_i = torch.cat([best_i, torch.arange(rs, rs + d2.shape[1], device=device).expand(d2.shape[0], -1)],
                               dim=1)
            top = torch.topk(cand_d, min(keep, cand_d.shape[1]), dim=1, largest=False)
            best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
        exact = (xq.unsqueeze(1).double() - y[best_i].double()).norm(dim=2)
        # sort by (distance, index): stable sort on index first, then on distance
        order_i = torch.argsort(best_i, dim=1)
        exact, best_i = torch.gather(exact, 1, order_i), torch.gather(best_i, 1, order_i)
        order = torch.sort(exact, dim=1, stable=True).indices[:, :k]
        dists.append(torch.gather(exact, 1, order).float())
        indices.append(torch.gather(best_i, 1, order))
    return torch.cat(dists).cpu(), torch.cat(indices).cpu()
