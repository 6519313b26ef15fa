"""Exact k nearest neighbours: ``calmwild.neighbors.knn`` against its peers, Q queries against N references in d
dimensions, measured side by side in one run:

- ``faiss_flat_l2``: faiss ``IndexFlatL2`` (exhaustive search, the reference implementation most users reach for;
  the index is built once outside the timing, only ``search`` is timed), when ``faiss`` is installed
  (``pip install faiss-cpu``; never a calmwild dependency);
- ``naive_cdist_topk``: the dense ``torch.cdist`` + ``topk`` over the full [Q, N] matrix, when it fits in memory.

Throughput is matrix-product TFLOP/s, 2 Q N d / seconds, next to a plain ``torch.mm`` of the same shape (the
attainable matmul rate of this device at full float32 precision, and with TF32 on CUDA). Exactness is measured where
it matters for memorization, on **near-copies**: a sample of queries that are training images plus a small
perturbation (d1 tiny, where the matrix-product identity cancels), against float64 distances from explicit
differences: the largest relative error of d1, and how many ratio-test verdicts (d1/d2 < 1/3) flip.
"""

from __future__ import annotations

import torch

from calmwild.neighbors import knn

from .common import (
    dense_fits, exact_distances, matmul_rates, random_images, rate, ratio, say, time_side_by_side, tf32,
)

ERROR_SAMPLE = 64
NEAR_COPY_SCALE = 1e-3  # perturbation of a near-copy query: d1 ~ 1e-3 sqrt(d), far below typical distances
RATIO_THRESHOLD = 1 / 3


def faiss_index(reference: torch.Tensor):
    """faiss ``IndexFlatL2`` over the references (float32, CPU), or None with the reason when faiss is missing."""
    try:
        import faiss
    except ImportError:
        return None, "faiss not installed (pip install faiss-cpu): peer skipped"
    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(reference.float().cpu().contiguous().numpy())
    return index, f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads"


def faiss_search(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    squared, ids = index.search(queries.float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(squared).clamp_min(0).sqrt(), torch.from_numpy(ids)


def _exactness(dist: torch.Tensor, index: torch.Tensor, exact: torch.return_types.topk) -> dict:
    """Against float64 distances from explicit differences: the largest relative error of d1 and of any d_k, the
    share of neighbour indices that agree, and the ratio-test verdicts that flip."""
    rows = exact.values.shape[0]
    got, want = dist[:rows].double().cpu(), exact.values.cpu()
    relative = (got - want).abs() / want.clamp_min(1e-30)

    def verdict(d: torch.Tensor) -> torch.Tensor:
        return d[:, 0] / d[:, 1] < RATIO_THRESHOLD

    return {
        "max_relative_error_d1": float(relative[:, 0].max()),
        "max_abs_distance_error": float((got - want).abs().max()),
        "index_agreement": float((index[:rows].cpu() == exact.indices.cpu()).double().mean()),
        "ratio_test_flips": int((verdict(got) != verdict(want)).sum()),
    }


def run(num_queries: int, num_references: int, shape: tuple[int, int, int], k: int, device: torch.device,
        repeats: int, memory_fraction: float) -> dict:
    dim = shape[0] * shape[1] * shape[2]
    say(f"knn: {num_queries} queries vs {num_references} references, d={dim}, k={k}")
    reference = random_images(num_references, shape, seed=10, device=device).reshape(num_references, dim)
    queries = random_images(num_queries, shape, seed=11, device=device).reshape(num_queries, dim)
    sample = min(ERROR_SAMPLE, num_queries, num_references)
    gen = torch.Generator(device=device).manual_seed(12)
    near = reference[:sample] + NEAR_COPY_SCALE * torch.randn(sample, dim, generator=gen, device=device)
    queries[:sample] = near  # the first queries are near-copies: exactness is judged on them
    flops = 2.0 * num_queries * num_references * dim

    calls = {"calmwild_knn": lambda: knn(queries, reference, k=k)}
    index, faiss_note = faiss_index(reference)
    if index is not None:
        calls["faiss_flat_l2"] = lambda: faiss_search(index, queries, k)
    fits, note = dense_fits(3 * 4 * num_queries * num_references, device, memory_fraction)
    if fits:
        calls["naive_cdist_topk"] = lambda: torch.cdist(queries, reference).topk(k, dim=1, largest=False)
    with tf32(False) as settings:  # knn forces full float32 precision itself; the others get the same
        times, results = time_side_by_side(calls, device, repeats)

    exact = exact_distances(queries[:sample], reference).topk(k, dim=1, largest=False)
    out = {
        "sizes": {"queries": num_queries, "references": num_references, "dim": dim, "k": k, "repeats": repeats,
                  "near_copy_queries": sample, "near_copy_scale": NEAR_COPY_SCALE},
        "flops_per_call": flops,
        "precision": settings,
        "note": note,
        "faiss": faiss_note,
    }
    for name, result in results.items():
        out[name] = {**rate(times[name], flops / 1e12, "tflops"), **_exactness(result[0], result[1], exact)}
    out.update(matmul_rates(queries, reference, device, repeats))
    for peer in ("faiss_flat_l2", "naive_cdist_topk"):
        if peer in out:
            out[f"speed_ratio_calmwild_to_{peer}"] = ratio(out["calmwild_knn"]["tflops"], out[peer]["tflops"])
    out["fraction_of_torch_mm_fp32"] = ratio(out["calmwild_knn"]["tflops"], out["torch_mm_fp32"]["tflops"])
    return out
