"""Empirical optimal denoiser: ``calmwild.denoisers.EmpiricalDenoiser`` (streaming log-sum-exp over chunks of the
training set) against the naive dense softmax over the full [Q, N] distance matrix,

    D(x; sigma) = softmax(-||x - y_i||^2 / (2 sigma^2)) @ Y     (paper eqs. 2-3),

for Q noisy queries x = h + sigma n (h held-out images) at each of several noise levels. Two matrix products per
level, so throughput is 4 Q N d / seconds. The naive path is skipped, with a note, when its dense matrices would not
fit in memory. Accuracy: both results against float64 (distances from explicit differences) on a sample of queries.
"""

from __future__ import annotations

import torch

from calmwild.denoisers import EmpiricalDenoiser

from .common import (
    dense_fits, exact_distances, matmul_rates, random_images, rate, ratio, say, time_side_by_side, tf32,
)

ERROR_SAMPLE = 64


def naive_denoise(x: torch.Tensor, train_flat: torch.Tensor, sigma: float) -> torch.Tensor:
    """The dense reference: all Q x N squared distances at once, a full softmax, one product with the data."""
    logits = torch.cdist(x.reshape(len(x), -1), train_flat).square_().mul_(-0.5 / sigma**2)
    return (torch.softmax(logits, dim=1) @ train_flat).reshape(x.shape)


def float64_denoise(x: torch.Tensor, train_flat: torch.Tensor, sigma: float) -> torch.Tensor:
    logits = exact_distances(x, train_flat).square_().mul_(-0.5 / sigma**2)
    return (torch.softmax(logits, dim=1) @ train_flat.double()).reshape(x.shape)


def run(num_queries: int, num_train: int, shape: tuple[int, int, int], sigmas: list[float], device: torch.device,
        repeats: int, memory_fraction: float) -> dict:
    dim = shape[0] * shape[1] * shape[2]
    say(f"empirical denoiser: {num_queries} queries x {len(sigmas)} sigmas vs {num_train} training images, d={dim}")
    train = random_images(num_train, shape, seed=20, device=device)
    heldout = random_images(num_queries, shape, seed=21, device=device)
    gen = torch.Generator(device=device).manual_seed(22)
    noisy = [heldout + s * torch.randn(heldout.shape, generator=gen, device=device) for s in sigmas]
    train_flat = train.reshape(num_train, dim)
    denoiser = EmpiricalDenoiser(train)

    calls = {"calmwild_empirical_denoiser": lambda: [denoiser(x, s) for x, s in zip(noisy, sigmas)]}
    fits, note = dense_fits(3 * 4 * num_queries * num_train, device, memory_fraction)
    if fits:
        calls["naive_dense_softmax"] = lambda: [naive_denoise(x, train_flat, s) for x, s in zip(noisy, sigmas)]
    with tf32(False) as settings:
        times, results = time_side_by_side(calls, device, repeats)

    sample = min(ERROR_SAMPLE, num_queries)
    exact = [float64_denoise(x[:sample], train_flat, s) for x, s in zip(noisy, sigmas)]
    flops = 4.0 * num_queries * num_train * dim * len(sigmas)
    out = {
        "sizes": {"queries_per_sigma": num_queries, "train": num_train, "dim": dim, "sigmas": sigmas,
                  "repeats": repeats, "error_sample_queries": sample},
        "flops_per_call": flops,
        "precision": settings,
        "note": note,
    }
    for name, outputs in results.items():
        errors = [float((o[:sample].double() - e).abs().max()) for o, e in zip(outputs, exact)]
        out[name] = {**rate(times[name], flops / 1e12, "tflops"), "max_abs_error_vs_float64": max(errors),
                     "max_abs_error_per_sigma": errors}
    if fits:
        out["ratio_calmwild_to_naive"] = ratio(out["calmwild_empirical_denoiser"]["tflops"],
                                               out["naive_dense_softmax"]["tflops"])
    out.update(matmul_rates(noisy[0].reshape(num_queries, dim), train_flat, device, repeats))
    out["fraction_of_torch_mm_fp32"] = ratio(out["calmwild_empirical_denoiser"]["tflops"],
                                             out["torch_mm_fp32"]["tflops"])
    return out
