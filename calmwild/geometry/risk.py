"""Which training images get memorized: per-image risk scores from the data alone, and how to score them.

Idea (seed 002, Merger & Goldt, "Local coverage governs memorization"): the empirical optimal
denoiser is a Gaussian kernel density estimate of the training set, and a trained network memorizes where the
training data cover their neighbourhood sparsely. An isolated training image y_i keeps the posterior weight
w_i(x, sigma) (paper eq. 3) to itself over a wider range of noise levels than an image in a dense cluster, so the
denoiser is pulled to it from further away. The same picture is in the paper's Theorem 4.2: the noise level below
which w_i >= 1 - eps grows linearly with the nearest-neighbour distance D_min of y_i. Every score below is higher
for a more isolated image ("higher = more at risk"):

- :func:`nearest_neighbor_score`:   r_i = d_1(i) / median_j d_1(j), with d_1(i) = min_{j != i} ||y_i - y_j||
  (the D_min of Theorem 4.2, relative to its typical value).
- :func:`knn_distance_score`:       r_i = dbar_k(i) / median_j dbar_k(j), dbar_k(i) the mean distance from y_i to
  its k nearest other training images (a k-NN density estimate: density ~ dbar_k^-d).
- :func:`kernel_self_weight`:       s_i(sigma) = w_i(y_i, sigma) = 1 / sum_j exp(-||y_i - y_j||^2 / (2 sigma^2))
  (j over all N images, the j = i term is 1): the posterior weight the noiseless image gives itself, i.e.
  1 / (1 + (N - 1) rho_i), rho_i the leave-one-out Gaussian KDE at y_i with bandwidth sigma (unnormalised).
- :func:`expected_self_weight`:     S_i(sigma) = E_n[ w_i(y_i + sigma n, sigma) ], the per-image version of the
  paper's expected self weight (Def. 4.1 / Fig. 7), by Monte Carlo.

For the two kernel scores, sigma is a bandwidth; tying it to the danger zone (Section 4) asks how much one image
owns its neighbourhood at the noise levels where memorization forms.

Scoring a score against what a model reproduced: :func:`reproduction_counts` (how many memorized samples have
image i as nearest training image), :func:`calmwild.stats.auroc` (exact AUROC via ranks, the Mann-Whitney U
statistic), :func:`calmwild.stats.spearman` (rank correlation, ties as midranks) and :func:`random_score_baseline`
(a seeded random score and the null standard deviations of both statistics).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from calmwild.checks import check_count, check_images, check_positive
from calmwild.neighbors import flatten, knn
from calmwild.posterior import posterior_summary
from calmwild.stats import as_mask, as_vector, auroc, auroc_null_std, spearman, spearman_null_std


# ------------------------------------------------------------------------------------------------ risk scores
def leave_one_out_neighbors(train: torch.Tensor, k: int = 1, device: torch.device | str | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances [N, k] (ascending, float32) and indices [N, k] of the k nearest OTHER training images of every
    training image, exact (:func:`calmwild.neighbors.knn` with k + 1 neighbours, then the image itself removed by
    index). An exact duplicate of y_i is another image: it appears at distance 0."""
    train = check_images(train, "train", min_count=2, finite=True)
    k = check_count(k, "k")
    n = train.shape[0]
    if k > n - 1:
        raise ValueError(f"k must lie in [1, {n - 1}] (the number of other training images), got {k}")
    dist, index = knn(train, train, k=k + 1, device=device)
    dist, index = dist.cpu(), index.cpu()
    is_self = index == torch.arange(n).unsqueeze(1)
    # Drop the self entry; a row without it (self tied beyond k + 1 duplicates at distance 0) drops its last entry.
    drop = torch.where(is_self.any(dim=1), is_self.float().argmax(dim=1), torch.full((n,), k))
    keep = torch.ones_like(is_self)
    keep[torch.arange(n), drop] = False
    return dist[keep].reshape(n, k), index[keep].reshape(n, k)


def _relative_to_median(values: torch.Tensor) -> torch.Tensor:
    median = float(values.double().median())
    if median <= 0:
        raise ValueError("the median neighbour distance is 0 (more than half the training images are duplicated): "
                         "a relative distance is undefined")
    return values.double() / median


def nearest_neighbor_score(train: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """r_i = d_1(i) / median_j d_1(j), d_1(i) the distance from y_i to its nearest other training image (float64
    [N]); > 1 means more isolated than the typical image. D_min of the paper's Theorem 4.2, read per image."""
    return _relative_to_median(leave_one_out_neighbors(train, 1, device)[0][:, 0])


def knn_distance_score(train: torch.Tensor, k: int = 5, device: torch.device | str | None = None) -> torch.Tensor:
    """r_i = dbar_k(i) / median_j dbar_k(j), dbar_k(i) the mean distance from y_i to its k nearest other training
    images (float64 [N]): the inverse of a k-NN local density estimate (density ~ dbar_k^-d), relative."""
    return _relative_to_median(leave_one_out_neighbors(train, k, device)[0].double().mean(dim=1))


def kernel_self_weight(train: torch.Tensor, sigma: float, chunk_size: int = 4096) -> torch.Tensor:
    """s_i = w_i(y_i, sigma) = 1 / sum_j exp(-||y_i - y_j||^2 / (2 sigma^2)) (float64 [N], in [1/N, 1]): the posterior
    weight (paper eq. 3) that the noiseless training image y_i gives itself, a decreasing function of the
    leave-one-out Gaussian KDE at y_i with bandwidth ``sigma``. Computed in float64 by
    :func:`calmwild.posterior.posterior_summary` (streaming log-sum-exp)."""
    train = check_images(train, "train", min_count=1, finite=True)
    sigma = check_positive(sigma, "sigma")
    y = flatten(train).double()
    out = posterior_summary(y, y, sigma, self_index=torch.arange(y.shape[0], device=y.device), want_mean=False,
                            chunk_size=chunk_size)
    return out.self_weight.cpu()


def expected_self_weight(
    train: torch.Tensor,
    sigma: float,
    num_noises: int = 64,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """S_i = E_n[ w_i(y_i + sigma n, sigma) ] (float64 [N]) by Monte Carlo over ``num_noises`` standard Gaussian noises
    per image: the per-image expected self weight of the paper (Def. 4.1, Fig. 7) at one noise level.

    Noise draw (a documented contract, so results are reproducible): for r in range(num_noises), one
    ``torch.randn(N, *image_shape, generator=generator, dtype=float64)`` on the CPU, in that order. Weights are
    computed in float64 by :func:`calmwild.posterior.posterior_summary`.
    """
    train = check_images(train, "train", min_count=1, finite=True)
    sigma = check_positive(sigma, "sigma")
    num_noises = check_count(num_noises, "num_noises")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    y = train.double()
    index = torch.arange(y.shape[0], device=y.device)
    total = torch.zeros(y.shape[0], dtype=torch.float64)
    for _ in range(num_noises):
        noise = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device)
        out = posterior_summary(y + sigma * noise, y, sigma, self_index=index, want_mean=False, chunk_size=chunk_size)
        total += out.self_weight.cpu()
    return total / num_noises


PRIMARY_SCORE = "nearest_neighbor"  # declared before looking at any result: Theorem 4.2's D_min, read per image


def danger_zone_bandwidth(danger_zone: dict[str, Any]) -> float | None:
    """The kernel bandwidth tied to the danger zone (``danger_zone`` entry of a geometry report,
    :func:`calmwild.geometry.report.analyze_geometry`): sqrt(sigma_lo * sigma_hi), the zone's geometric centre (it spans
    decades of sigma); for an empty zone the sigma where the weight and coverage curves cross; None if neither."""
    if not danger_zone.get("empty") and danger_zone.get("sigma"):
        lo, hi = (float(v) for v in danger_zone["sigma"])
        return math.sqrt(lo * hi)
    crossing = (danger_zone.get("crossing") or {}).get("sigma")
    return None if crossing is None else float(crossing)


def risk_scores(
    train: torch.Tensor,
    sigma: float | None = None,
    k: int = 5,
    num_noises: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Every per-image risk score of a training set (float64 [N] each, higher = more at risk), keyed by name:
    ``nearest_neighbor`` (:data:`PRIMARY_SCORE`), ``knn<k>_distance`` (k clipped to N - 1) and, when a bandwidth
    ``sigma`` is given (e.g. :func:`danger_zone_bandwidth`), ``kernel_self_weight`` and ``expected_self_weight``
    (``num_noises`` Monte Carlo noises from a generator seeded with ``seed``). Every score is computed on ``device``
    (default: where ``train`` is)."""
    train = check_images(train, "train", min_count=2, finite=True)
    k = min(check_count(k, "k"), train.shape[0] - 1)
    scores = {PRIMARY_SCORE: nearest_neighbor_score(train, device),
              f"knn{k}_distance": knn_distance_score(train, k, device)}
    if sigma is not None:
        placed = train.to(device) if device is not None else train
        scores["kernel_self_weight"] = kernel_self_weight(placed, sigma)
        scores["expected_self_weight"] = expected_self_weight(
            placed, sigma, num_noises, generator=torch.Generator().manual_seed(int(seed)))
    return scores


# ------------------------------------------------------------------------------------------------ what was reproduced
def reproduction_counts(nearest_index: object, memorized: object, num_train: int) -> torch.Tensor:
    """counts[i] = number of memorized samples (ratio test passed) whose nearest training image is i (long [N]);
    ``counts > 0`` is the mask of reproduced training images."""
    num_train = check_count(num_train, "num_train")
    index = torch.as_tensor(nearest_index).detach().cpu().reshape(-1)
    flags = torch.as_tensor(as_mask(memorized, "memorized"))
    if index.numel() != flags.numel():
        raise ValueError(f"{index.numel()} nearest indices for {flags.numel()} memorization flags")
    if index.is_floating_point() or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_train)):
        raise ValueError(f"nearest_index must hold integer indices in [0, {num_train}), got "
                         f"{index[:5].tolist()}")
    return torch.bincount(index[flags].long(), minlength=num_train)


def random_scores(num: int, seed: int = 0) -> torch.Tensor:
    """The seeded random risk score of the baseline: ``torch.rand(num, generator=Generator().manual_seed(seed),
    dtype=float64)``."""
    num = check_count(num, "num")
    return torch.rand(num, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def random_score_baseline(
    reproduced_mask: object, counts: object | None = None, seed: int = 0, num_draws: int = 0
) -> dict[str, Any]:
    """What a score that knows nothing achieves: the AUROC (and, given ``counts``, the Spearman correlation with the
    reproduction counts) of :func:`random_scores` with ``seed``, beside the expected values (0.5 and 0) and their
    null standard deviations (:func:`calmwild.stats.auroc_null_std`,
    :func:`~calmwild.stats.spearman_null_std`). With ``num_draws`` > 0, also the
    mean and standard deviation of each statistic over the random scores of seeds seed, ..., seed + num_draws - 1
    (``auroc_draws`` / ``spearman_draws``), which show where the one seeded draw falls. Statistics that are undefined
    (one class empty, constant counts) are None."""
    pos = as_mask(reproduced_mask, "reproduced_mask")
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 0:
        raise ValueError(f"num_draws must be a non-negative integer, got {num_draws!r}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    c = None
    if counts is not None:
        c = as_vector(counts, "counts")
        if c.size != pos.size:
            raise ValueError(f"{c.size} counts for {pos.size} mask entries")
        if c.size < 2 or np.all(c == c[0]):
            c = None  # constant counts: no rank correlation
    draws = [random_scores(pos.size, seed + i) for i in range(max(1, num_draws))]
    aurocs = [auroc(d, pos) for d in draws] if n_pos and n_neg else None
    rhos = [spearman(d, c) for d in draws] if c is not None else None

    def spread(values: list[float] | None) -> dict[str, float] | None:
        if values is None or num_draws == 0:
            return None
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "num": len(values)}

    return {"seed": int(seed), "num": int(pos.size), "num_reproduced": n_pos,
            "auroc_expected": 0.5, "auroc": None if aurocs is None else aurocs[0],
            "auroc_null_std": auroc_null_std(n_pos, n_neg) if aurocs is not None else None,
            "auroc_draws": spread(aurocs),
            "spearman_expected": 0.0, "spearman": None if rhos is None else rhos[0],
            "spearman_null_std": spearman_null_std(pos.size) if rhos is not None else None,
            "spearman_draws": spread(rhos)}
