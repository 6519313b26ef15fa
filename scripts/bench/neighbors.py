"""Exact k nearest neighbours: ``calmwild.neighbors.knn`` against the naive dense ``torch.cdist`` + ``topk`` over the
full [Q, N] matrix, Q queries against N references in d dimensions.

Throughput is reported as matrix-product TFLOP/s, 2 Q N d / seconds, next to a plain ``torch.mm`` of the same shape
measured in the same run (the attainable matmul rate of this device at full float32 precision, and with TF32 on
CUDA). Accuracy: on a sample of queries both results are compared with float64 distances from explicit differences
(max |distance error| and the fraction of neighbour indices that agree).
"""

from __future__ import annotations

import torch

from calmwild.neighbors import knn

from .common import (
    dense_fits, exact_distances, matmul_rates, random_images, rate, ratio, say, time_side_by_side, tf32,
)

ERROR_SAMPLE = 64


def _errors(dist: torch.Tensor, index: torch.Tensor, exact: torch.return_types.topk) -> dict:
    rows = exact.values.shape[0]
    return {
        "max_abs_distance_error": float((dist[:rows].double().cpu() - exact.values.cpu()).abs().max()),
        "index_agreement": float((index[:rows].cpu() == exact.indices.cpu()).double().mean()),
    }


def run(num_queries: int, num_references: int, shape: tuple[int, int, int], k: int, device: torch.device,
        repeats: int, memory_fraction: float) -> dict:
    dim = shape[0] * shape[1] * shape[2]
    say(f"knn: {num_queries} queries vs {num_references} references, d={dim}, k={k}")
    reference = random_images(num_references, shape, seed=10, device=device).reshape(num_references, dim)
    queries = random_images(num_queries, shape, seed=11, device=device).reshape(num_queries, dim)
    flops = 2.0 * num_queries * num_references * dim

    calls = {"calmwild_knn": lambda: knn(queries, reference, k=k)}
    fits, note = dense_fits(3 * 4 * num_queries * num_references, device, memory_fraction)
    if fits:
        calls["naive_cdist_topk"] = lambda: torch.cdist(queries, reference).topk(k, dim=1, largest=False)
    with tf32(False) as settings:  # knn forces full float32 precision itself; the naive path gets the same
        times, results = time_side_by_side(calls, device, repeats)

    sample = min(ERROR_SAMPLE, num_queries)
    exact = exact_distances(queries[:sample], reference).topk(k, dim=1, largest=False)
    out = {
        "sizes": {"queries": num_queries, "references": num_references, "dim": dim, "k": k, "repeats": repeats,
                  "error_sample_queries": sample},
        "flops_per_call": flops,
        "precision": settings,
        "note": note,
    }
    for name, result in results.items():
        out[name] = {**rate(times[name], flops / 1e12, "tflops"), **_errors(result[0], result[1], exact)}
    out.update(matmul_rates(queries, reference, device, repeats))
    if fits:
        out["ratio_calmwild_to_naive"] = ratio(out["calmwild_knn"]["tflops"], out["naive_cdist_topk"]["tflops"])
    out["fraction_of_torch_mm_fp32"] = ratio(out["calmwild_knn"]["tflops"], out["torch_mm_fp32"]["tflops"])
    return out
