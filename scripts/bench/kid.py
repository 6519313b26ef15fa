"""KID (Binkowski et al. 2018): ``calmwild.fid.kernel_distance`` against torchmetrics' per-subset ``poly_mmd`` loop,
the computation of ``torchmetrics.image.KernelInceptionDistance``, on the same features and the same subsets.

calmwild evaluates the cubic kernel k(x, y) = (x.y / F + 1)^3 once on every pair of rows any subset uses and gets
each subset's block sums from one product with the subsets' indicator vectors; torchmetrics computes the three kernel
matrices of every subset again (3 m^2 F multiply-adds each). Both in float64. Accuracy: the two KID means agree.
"""

from __future__ import annotations

import torch

from calmwild.fid import kernel_distance

from .common import rate, ratio, say, time_side_by_side


def torchmetrics_kid(a: torch.Tensor, b: torch.Tensor, subsets: int, subset_size: int, seed: int) -> float:
    """The mean of torchmetrics' MMD^2_u over the subsets calmwild draws (same generator, same order)."""
    from torchmetrics.image.kid import poly_mmd

    gen = torch.Generator().manual_seed(seed)
    values = [poly_mmd(a[torch.randperm(a.shape[0], generator=gen)[:subset_size]],
                       b[torch.randperm(b.shape[0], generator=gen)[:subset_size]]) for _ in range(subsets)]
    return float(torch.stack(values).mean())


def run(num_samples: int, num_reference: int, dim: int, subsets: int, subset_size: int, repeats: int) -> dict:
    say(f"KID: {num_samples} samples vs {num_reference} reference features of dimension {dim}, "
        f"{subsets} subsets of {subset_size}")
    gen = torch.Generator().manual_seed(30)
    samples = torch.randn(num_samples, dim, generator=gen, dtype=torch.float64)
    reference = 1.1 * torch.randn(num_reference, dim, generator=gen, dtype=torch.float64) + 0.05
    m = min(subset_size, num_samples, num_reference)
    calls = {"calmwild_kernel_distance": lambda: kernel_distance(samples, reference, subsets, m, seed=0)["kid"],
             "torchmetrics_poly_mmd_per_subset": lambda: torchmetrics_kid(samples, reference, subsets, m, 0)}
    times, results = time_side_by_side(calls, torch.device("cpu"), repeats)
    ours, theirs = results["calmwild_kernel_distance"], results["torchmetrics_poly_mmd_per_subset"]
    evaluations = {name: rate(t, subsets, "subsets_per_s") for name, t in times.items()}
    return {
        "sizes": {"samples": num_samples, "reference": num_reference, "dim": dim, "subsets": subsets,
                  "subset_size": m, "repeats": repeats},
        "results": evaluations,
        "speed_ratio_vs_torchmetrics": ratio(evaluations["calmwild_kernel_distance"]["subsets_per_s"],
                                             evaluations["torchmetrics_poly_mmd_per_subset"]["subsets_per_s"]),
        "kid": {"calmwild": ours, "torchmetrics": theirs,
                "relative_difference": abs(ours - theirs) / max(abs(theirs), 1e-300)},
    }
