"""Geometry curves (the paper's Figure 3): ``calmwild.geometry.posterior_weight_curves`` and ``shell_coverage`` over
S noise levels, against the plain code a user would write: a Python loop over the levels that computes each level by
brute force (dense [Q, N] distance matrix of that level's noisy queries, full softmax / any-in-shell test), batched
over all queries of a level, once in float64 and once in float32.

Queries per level: ``points`` base points x ``noises`` noises (P x M) for both curves. The two implementations draw
their own noise, so their curves are independent Monte Carlo estimates of the same quantities; the report gives the
largest difference next to the library's largest standard error as a sanity check (they should be of one order).
"""

from __future__ import annotations

import math

import torch

from calmwild.geometry import posterior_weight_curves, shell_coverage, shell_radii

from .common import dense_fits, random_images, rate, ratio, say, time_side_by_side, tf32


def naive_weight_curves(train: torch.Tensor, sigmas: list[float], points: int, noises: int, seed: int):
    """Per level: max and self posterior weight of ``points`` training points x ``noises`` noises, averaged."""
    y = train.reshape(len(train), -1)
    gen = torch.Generator(device=y.device).manual_seed(seed)
    index = torch.randperm(len(y), generator=gen, device=y.device)[:points]
    noise = torch.randn(len(index), noises, y.shape[1], generator=gen, device=y.device)
    self_index = index.repeat_interleave(noises).unsqueeze(1)
    max_w, self_w = [], []
    for sigma in sigmas:
        x = (y[index].unsqueeze(1) + sigma * noise).reshape(-1, y.shape[1])
        weights = torch.softmax(torch.cdist(x, y).square_().mul_(-0.5 / sigma**2), dim=1)
        max_w.append(float(weights.max(dim=1).values.mean()))
        self_w.append(float(weights.gather(1, self_index).mean()))
    return torch.tensor(max_w, dtype=torch.float64), torch.tensor(self_w, dtype=torch.float64)


def naive_coverage(train: torch.Tensor, heldout: torch.Tensor, sigmas: list[float], points: int, noises: int,
                   seed: int, t: float = 5.0) -> torch.Tensor:
    """Per level: fraction of noisy held-out points with some training point at a distance in
    [sigma r_-, sigma r_+] (radii of Lemma 4.5 from ``shell_radii``)."""
    y, h = train.reshape(len(train), -1), heldout.reshape(len(heldout), -1)
    r_minus, r_plus = shell_radii(y.shape[1], t)
    gen = torch.Generator(device=y.device).manual_seed(seed)
    index = torch.randperm(len(h), generator=gen, device=y.device)[:points]
    noise = torch.randn(len(index), noises, y.shape[1], generator=gen, device=y.device)
    covered = []
    for sigma in sigmas:
        x = (h[index].unsqueeze(1) + sigma * noise).reshape(-1, y.shape[1])
        d2 = torch.cdist(x, y).square_()
        inside = ((d2 >= (sigma * r_minus) ** 2) & (d2 <= (sigma * r_plus) ** 2)).any(dim=1)
        covered.append(float(inside.double().mean()))
    return torch.tensor(covered, dtype=torch.float64)


def run(num_train: int, shape: tuple[int, int, int], num_sigmas: int, points: int, noises: int,
        device: torch.device, repeats: int, memory_fraction: float) -> dict:
    dim = shape[0] * shape[1] * shape[2]
    say(f"geometry: {num_sigmas} sigmas x {points * noises} queries vs {num_train} training images, d={dim}")
    train = random_images(num_train, shape, seed=30, device=device)
    heldout = random_images(points, shape, seed=31, device=device)
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), num_sigmas, dtype=torch.float64).tolist()

    library = {
        "posterior_weight_curves": lambda: posterior_weight_curves(train, sigmas, num_points=points,
                                                                   num_noises=noises, seed=0),
        "shell_coverage": lambda: shell_coverage(train, heldout, sigmas, num_queries=points, num_noises=noises,
                                                 seed=0),
    }
    naive = {}
    for precision, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        y, h = train.to(dtype), heldout.to(dtype)
        naive[f"naive_weight_loop_{precision}"] = lambda y=y: naive_weight_curves(y, sigmas, points, noises, seed=1)
        naive[f"naive_coverage_loop_{precision}"] = lambda y=y, h=h: naive_coverage(y, h, sigmas, points, noises,
                                                                                   seed=1)
    fits, note = dense_fits(3 * 8 * points * noises * num_train, device, memory_fraction)
    with tf32(False) as settings:
        times, results = time_side_by_side({**library, **(naive if fits else {})}, device, repeats)

    def median(name: str) -> float:
        return rate(times[name], 1.0, "per_s")["seconds"]

    def entry(name: str) -> dict:
        summary = rate(times[name], 1.0, "per_s")
        return {key: summary[key] for key in ("seconds", "seconds_min", "seconds_all")}

    total = median("posterior_weight_curves") + median("shell_coverage")
    out = {
        "sizes": {"train": num_train, "dim": dim, "num_sigmas": num_sigmas, "queries_per_sigma": points * noises,
                  "base_points": points, "noises_per_point": noises, "repeats": repeats},
        "precision": settings,
        "note": note,
        "calmwild": {name: entry(name) for name in library},
        "calmwild_total_seconds": total,
    }
    if fits:
        weights, coverage = results["posterior_weight_curves"], results["shell_coverage"]
        naive_max, naive_self = results["naive_weight_loop_float64"]
        out["naive"] = {name: entry(name) for name in naive}
        for precision in ("float64", "float32"):
            naive_total = median(f"naive_weight_loop_{precision}") + median(f"naive_coverage_loop_{precision}")
            out[f"naive_{precision}_total_seconds"] = naive_total
            out[f"speed_ratio_calmwild_to_naive_{precision}"] = ratio(naive_total, total)
        out["agreement"] = {
            "max_weight_max_abs_diff": float((weights.max_weight - naive_max).abs().max()),
            "self_weight_max_abs_diff": float((weights.self_weight - naive_self).abs().max()),
            "coverage_max_abs_diff": float((coverage.coverage - results["naive_coverage_loop_float64"]).abs().max()),
            "calmwild_max_standard_error": float(torch.nan_to_num(torch.cat(
                [weights.max_weight_se, weights.self_weight_se, coverage.coverage_se])).max()),
        }
    return out
