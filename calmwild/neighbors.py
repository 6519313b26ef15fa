"""Exact Euclidean distances between image sets, chunked on the device.

Squared distances use ||x - y||^2 = ||x||^2 - 2 <x, y> + ||y||^2 as one matrix product per chunk. In float32 the
identity loses accuracy when x and y are close (cancellation); callers that need exact small distances recompute
them directly for the few candidates that matter (see :func:`knn`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from calmwild.checks import check_count


def flatten(images: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N, d] (a view when possible)."""
    return images.reshape(images.shape[0], math.prod(images.shape[1:]))


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


# Extra candidates kept per query beyond k before the exact re-scoring (default of ``knn(candidates=None)``).
DEFAULT_MARGIN = 6
# Elements (query x reference x feature) per block when distances are formed from explicit differences.
_DIFF_BUDGET = 1 << 22


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """float32 matrix products at full precision (no TF32 / bf16) for the duration, so the error bound holds."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _exact_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_q - y_qc||^2 in float64 for x [q, d] and candidates y [q, c, d], from the differences (no cancellation)."""
    return (x.unsqueeze(1).double() - y.double()).square_().sum(dim=2)


def _sort_by_distance_then_index(d2: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by (distance, index): a stable sort on the index, then a stable sort on the distance."""
    order = torch.sort(index, dim=1, stable=True).indices
    d2, index = d2.gather(1, order), index.gather(1, order)
    order = torch.sort(d2, dim=1, stable=True).indices
    return d2.gather(1, order), index.gather(1, order)


def _rescore_viable(
    x: torch.Tensor, y: torch.Tensor, computed: torch.Tensor, index: torch.Tensor, k: int, bound: torch.Tensor
) -> torch.Tensor:
    """Exact squared distances [q, c] (float64, from the differences) from x [q, d] to the candidate rows ``index``
    [q, c] of ``y`` whose computed squared distance can still be among the k smallest; +inf for the others.

    A computed value a_j is within ``bound`` [q] of the true t_j, so t_j <= t_(k) <= a_(k) + bound needs
    a_j <= a_(k) + 2 bound (a_(k) the k-th smallest computed value of the row). A candidate outside that set has a
    true distance strictly above the k-th: dropping it changes neither the result nor its ties. Pairs are
    rescored in blocks of about ``_DIFF_BUDGET`` differences."""
    kth = computed[:, k - 1 : k].double()
    rows, cols = (computed.double() <= kth + 2.0 * bound.unsqueeze(1)).nonzero(as_tuple=True)
    exact = torch.full(computed.shape, math.inf, dtype=torch.float64, device=x.device)
    block = max(1, _DIFF_BUDGET // max(1, x.shape[1]))
    for s in range(0, rows.numel(), block):
        r, c = rows[s : s + block], cols[s : s + block]
        neighbors = y[index[r, c].to(y.device)].to(x.device)
        exact[r, c] = _exact_sq_distances(x[r], neighbors.unsqueeze(1))[:, 0]
    return exact


def _brute_force(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of x [q, d] (compute device) among all rows of ``y`` (any device) from explicit differences in
    float64, chunked; ties go to the smaller index."""
    n, dim = y.shape
    cols = min(n, max(1, _DIFF_BUDGET // dim))
    rows = max(1, _DIFF_BUDGET // (cols * dim))
    out_d, out_i = [], []
    for qs in range(0, x.shape[0], rows):
        xb = x[qs : qs + rows]
        best_d = torch.empty(xb.shape[0], 0, dtype=torch.float64, device=x.device)
        best_i = torch.empty(xb.shape[0], 0, dtype=torch.long, device=x.device)
        for rs in range(0, n, cols):
            yb = y[rs : rs + cols].to(x.device)
            d2 = _exact_sq_distances(xb, yb.unsqueeze(0))
            idx = torch.arange(rs, rs + yb.shape[0], device=x.device).expand(xb.shape[0], -1)
            best_d, best_i = _sort_by_distance_then_index(torch.cat([best_d, d2], 1), torch.cat([best_i, idx], 1))
            best_d, best_i = best_d[:, :k], best_i[:, :k]
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def knn(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int = 2,
    query_chunk: int = 1024,
    ref_chunk: int = 8192,
    candidates: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (Euclidean): distances [Q, k] (float32, ascending) and indices [Q, k] (long).

    1. Candidate search: the references ranked by ||y||^2 - 2 <x, y> (the squared distance less the query's own
       ||x||^2, which no ranking of one query's neighbours needs: one matrix product with the norms as its bias, no
       further pass over the matrix), chunked over ``query_chunk`` queries and ``ref_chunk`` references (memory
       O(query_chunk * ref_chunk) whatever the reference size), keeping a running best ``candidates`` (default
       k + 6) per query; ||x||^2 is added to those alone. float32 inputs are multiplied at full float32 precision
       (TF32 is switched off for the duration); float64 inputs stay float64.
    2. Cancellation fix: the retained candidates that can still be among the k nearest (computed value within
       twice the error bound below of the k-th computed value) are re-scored exactly as ||x - y|| from the
       differences (in float64), then sorted by (distance, index) and cut to k. Ties: the smaller reference
       index comes first.
    3. Certificate: a computed squared distance of the identity differs from the true one by at most
       gamma (||x|| + ||y||)^2 with gamma = (d + 3) u / (1 - (d + 3) u) (u the unit roundoff; standard dot-product
       error bound). Every reference left out has a computed value >= the largest retained one, a_c, so if the
       exact k-th squared distance is < a_c - gamma (||x|| + max ||y||)^2 nothing left out can be as near. Queries
       that fail this test (near-ties at the candidate boundary, very large norms) are redone by brute force from
       explicit differences, so the result is exact in every case.

    Duplicated reference images: a query equal to one of them has d1 = d2 = 0 with both indices reported (smaller
    first). Computation runs on ``device`` if given, else on ``reference``'s device; results stay there.
    """
    x, y = flatten(queries), flatten(reference)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {x.shape[1]} features, references {y.shape[1]}")
    n, dim = y.shape
    if n == 0:
        raise ValueError("the reference set is empty")
    k = check_count(k, "k")
    if k > n:
        raise ValueError(f"k must lie in [1, {n}] (the reference size), got {k}")
    query_chunk, ref_chunk = check_count(query_chunk, "query_chunk"), check_count(ref_chunk, "ref_chunk")
    keep = k + DEFAULT_MARGIN if candidates is None else check_count(candidates, "candidates")
    if keep < k:
        raise ValueError(f"candidates must be at least k = {k}, got {candidates}")
    keep = min(keep, n)
    device = torch.device(device) if device is not None else y.device
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    unit_roundoff = torch.finfo(dtype).eps / 2
    slack = (dim + 3) * unit_roundoff
    gamma = slack / (1 - slack) if slack < 1 else math.inf

    y_sq = torch.cat([y[s : s + ref_chunk].to(device, dtype).square().sum(dim=1) for s in range(0, n, ref_chunk)])
    if not torch.isfinite(y_sq).all():
        raise ValueError("reference contains non-finite values (NaN or inf)")
    y_norm_max = float(y_sq.max().double().sqrt())

    out_d, out_i = [], []
    # one buffer for every chunk's scores: a fresh [query_chunk, ref_chunk] tensor per chunk would cost as much as
    # the product itself on a CPU (the allocator returns large blocks to the system, every page faults back in)
    scores = torch.empty(min(query_chunk, x.shape[0]) * min(ref_chunk, n), dtype=dtype, device=device)
    with _full_precision_matmul():
        for qs in range(0, x.shape[0], query_chunk):
            xq = x[qs : qs + query_chunk].to(device, dtype)
            if not torch.isfinite(xq).all():
                bad = (~torch.isfinite(xq).all(dim=1)).nonzero()[:, 0] + qs
                raise ValueError(f"queries contain non-finite values (NaN or inf) in rows {bad[:10].tolist()}")
            best_d = torch.empty(xq.shape[0], 0, dtype=dtype, device=device)
            best_i = torch.empty(xq.shape[0], 0, dtype=torch.long, device=device)
            for rs in range(0, n, ref_chunk):
                yc = y[rs : rs + ref_chunk].to(device, dtype)
                partial = scores[: xq.shape[0] * yc.shape[0]].view(xq.shape[0], yc.shape[0])
                torch.addmm(y_sq[rs : rs + ref_chunk].unsqueeze(0), xq, yc.T, alpha=-2.0, out=partial)
                top = torch.topk(partial, min(keep, partial.shape[1]), dim=1, largest=False)
                cand_d, cand_i = torch.cat([best_d, top.values], 1), torch.cat([best_i, top.indices + rs], 1)
                top = torch.topk(cand_d, min(keep, cand_d.shape[1]), dim=1, largest=False)
                best_d, best_i = top.values, cand_i.gather(1, top.indices)
            best_d = best_d + (xq * xq).sum(dim=1, keepdim=True)  # the computed squared distances of the candidates

            bound = gamma * (xq.double().norm(dim=1) + y_norm_max).square()
            rescored = _rescore_viable(xq, y, best_d, best_i, k, bound)
            exact, index = _sort_by_distance_then_index(rescored, best_i)
            exact, index = exact[:, :k], index[:, :k]
            if keep < n:
                uncertain = (exact[:, -1] >= best_d.double().max(dim=1).values - bound).nonzero()[:, 0]
                if uncertain.numel() > 0:
                    exact[uncertain], index[uncertain] = _brute_force(xq[uncertain], y, k)
            out_d.append(exact.sqrt().float())
            out_i.append(index)
    if not out_d:
        return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    return torch.cat(out_d), torch.cat(out_i)
