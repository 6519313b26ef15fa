"""Posterior concentration (paper Section 4.1): the expected maximum and self posterior weight along the noise
schedule (Def. 4.1, Fig. 7), Theorem 4.2's per-point noise thresholds, and Remark 4.3's comparison of the two.

Notation: training set Y = {y_1..y_N} in R^d, noise n ~ N(0, I_d), noise level sigma, posterior weights
w_i(x, sigma) = softmax_i(-||x - y_i||^2 / (2 sigma^2)) (paper eq. 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import norm
from tqdm.auto import tqdm

from calmwild.checks import check_count, check_sigmas
from calmwild.geometry.zone import level_crossings
from calmwild.geometry.levels import level_terms, logits_at, noise_blocks
from calmwild.geometry.noise import as_points, cluster_mean_se, pair_distances, seeded_generator
from calmwild.neighbors import knn, squared_distances
from calmwild.posterior import log_probability_floor


@dataclass
class WeightCurves:
    """Result of :func:`posterior_weight_curves`; tensors are float64 [S] in the order of ``sigmas``."""

    sigmas: torch.Tensor
    max_weight: torch.Tensor
    max_weight_se: torch.Tensor
    self_weight: torch.Tensor
    self_weight_se: torch.Tensor
    num_points: int
    num_noises: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_weight": {"mean": self.max_weight.tolist(), "se": self.max_weight_se.tolist()},
            "self_weight": {"mean": self.self_weight.tolist(), "se": self.self_weight_se.tolist()},
        }


def posterior_weight_curves(
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_points: int = 100,
    num_noises: int = 100,
    seed: int = 0,
    chunk_size: int = 4096,
    batch_size: int = 1024,
    progress: bool = False,
) -> WeightCurves:
    """Expected maximum posterior weight m(sigma) (Def. 4.1) and expected self weight (paper Fig. 7, App. E.3).

        m(sigma)  = E_{i0 ~ uniform(Y)} E_n [ max_i w_i(y_i0 + sigma n, sigma) ],
        self(sigma) = E_{i0 ~ uniform(Y)} E_n [ w_i0(y_i0 + sigma n, sigma) ],
        w_i(x, sigma) = softmax_i(-||x - y_i||^2 / (2 sigma^2))   (eq. 3).

    The expectation is over TRAINING points only (the paper's definition). ``num_points`` base points are drawn
    uniformly without replacement (all of them if the set is smaller), each noised with ``num_noises`` Gaussian
    noises shared across levels. Standard errors are std / sqrt(P) of the per-base-point means, which accounts
    for the correlation of the noises of one base point. App. E.3 used 100 base points x 400 noises; the error is
    dominated by the spread between base points, so the default of 100 noises loses little and is 4x cheaper.

    All levels come from one matrix product per block of ``batch_size`` noisy copies and chunk of ``chunk_size``
    training points (:mod:`calmwild.geometry.levels`); the softmax is a streaming log-sum-exp per copy and level,
    so memory is O(batch_size * chunk_size) at any N. The noised point's own logit is exactly 0 (relative to the
    per-copy constant the softmax does not see), not a rounded difference of large numbers.
    """
    y = as_points(train, "train", min_count=1)
    sig = check_sigmas(sigmas)
    num_points = check_count(num_points, "num_points")
    num_noises = check_count(num_noises, "num_noises")
    batch_size = check_count(batch_size, "batch_size")
    n, levels = y.shape[0], sig.tolist()
    gen = seeded_generator(y.device, seed)
    base_index = torch.randperm(n, generator=gen, device=y.device)[: min(num_points, n)]
    p = base_index.shape[0]
    sq_norms = (y * y).sum(dim=1)
    floor = log_probability_floor(y.dtype, n)
    max_weight = torch.zeros(len(levels), p, dtype=torch.float64, device=y.device)
    self_weight = torch.zeros_like(max_weight)
    with tqdm(total=len(levels) * p * num_noises, desc="posterior weights", unit="query", disable=not progress) as bar:
        for p0, noise in noise_blocks(y[base_index], num_noises, gen, batch_size):
            own = base_index[p0 : p0 + noise.shape[0]]
            run_max = torch.full((len(levels), *noise.shape[:2]), -torch.inf, dtype=y.dtype, device=y.device)
            run_sum = torch.zeros_like(run_max)
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                terms = level_terms(y[own], noise, y[start:stop], sq_norms[start:stop])
                rows = ((own >= start) & (own < stop)).nonzero(as_tuple=True)[0]
                terms.a[rows, own[rows] - start] = 0.0  # the noised point itself: ||b - y|| = 0 exactly
                terms.b[rows, :, own[rows] - start] = 0.0
                for s, sigma in enumerate(levels):
                    logits = logits_at(terms, sigma)
                    new_max = torch.maximum(run_max[s], logits.amax(dim=2))
                    probs = logits.sub_(new_max.unsqueeze(2)).clamp_min_(floor).exp_()
                    run_sum[s] = run_sum[s] * torch.exp(run_max[s] - new_max) + probs.sum(dim=2)
                    run_max[s] = new_max
            cols = slice(p0, p0 + noise.shape[0])
            max_weight[:, cols] = (1.0 / run_sum).double().mean(dim=2)
            self_weight[:, cols] = (torch.exp(-run_max) / run_sum).double().mean(dim=2)
            bar.update(len(levels) * noise.shape[0] * num_noises)
    max_mean, max_se = cluster_mean_se(max_weight.cpu())
    self_mean, self_se = cluster_mean_se(self_weight.cpu())
    return WeightCurves(sig, max_mean, max_se, self_mean, self_se, p, num_noises)


_QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def _summary(values: torch.Tensor) -> dict[str, float | int | None]:
    """mean, quantiles, min and max of the finite entries (None when there are none) and how many were finite."""
    finite = values[torch.isfinite(values)]
    out: dict[str, float | int | None] = {"count": int(finite.numel())}
    if finite.numel() == 0:
        out.update({"mean": None, "min": None, "max": None, **{k: None for k in _QUANTILES}})
        return out
    out["mean"] = float(finite.mean())
    out.update({k: float(torch.quantile(finite, q)) for k, q in _QUANTILES.items()})
    out["min"], out["max"] = float(finite.min()), float(finite.max())
    return out


@dataclass
class ConcentrationThresholds:
    """Result of :func:`concentration_thresholds`: float64 [K] tensors per selected training point.

    ``sigma_lo`` may be +inf (concentration holds at every sigma for these eps/N); ``sigma_hi`` is NaN when
    (N - 1) eps <= 1 - eps (then ``upper_reason`` says why).
    """

    indices: torch.Tensor
    d_min: torch.Tensor
    d_max: torch.Tensor
    sigma_lo: torch.Tensor
    sigma_hi: torch.Tensor
    z: float
    eps: float
    delta: float
    num_train: int
    upper_reason: str | None = None
    summary: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "indices": self.indices.tolist(),
            "d_min": self.d_min.tolist(),
            "d_max": self.d_max.tolist(),
            "sigma_lo": [v if math.isfinite(v) else None for v in self.sigma_lo.tolist()],
            "sigma_hi": [v if math.isfinite(v) else None for v in self.sigma_hi.tolist()],
            "z": self.z,
            "eps": self.eps,
            "delta": self.delta,
            "upper_reason": self.upper_reason,
            "summary": self.summary,
        }


def _farthest_distances(q: torch.Tensor, y: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """max_j ||q_k - y_j|| per row: arg-max by chunked matrix products, then that pair recomputed in float64."""
    y_sq = (y * y).sum(dim=1)
    best = torch.full((q.shape[0],), -math.inf, dtype=y.dtype, device=y.device)
    arg = torch.zeros(q.shape[0], dtype=torch.long, device=y.device)
    for start in range(0, y.shape[0], chunk_size):
        value, index = squared_distances(q, y[start : start + chunk_size], y_sq[start : start + chunk_size]).max(dim=1)
        arg = torch.where(value > best, index + start, arg)
        best = torch.maximum(best, value)
    return pair_distances(q, y[arg])


def concentration_thresholds(
    train: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    eps: float = 0.05,
    delta: float = 0.05,
    chunk_size: int = 4096,
) -> ConcentrationThresholds:
    """Theorem 4.2's noise thresholds for posterior concentration, per selected training point y_1 (= train[i]).

    Derived following the paper's proof; the paper's exact constants were lost in extraction .
    With x = y_1 + sigma n, D_j = ||y_1 - y_j|| and g_j = <(y_1 - y_j) / D_j, n> ~ N(0, 1),
    w_1 = 1 / (1 + sum_{j != 1} exp(-D_j^2 / (2 sigma^2) - D_j g_j / sigma)). A union bound over the N - 1
    projections with z = Phi^{-1}(1 - delta / (N - 1)) gives, each with probability >= 1 - delta:

    (1) sigma <= sigma_lo = D_min / (z + sqrt(z^2 + 2 ln((N - 1)(1 - eps) / eps)))   =>  w_1 >= 1 - eps;
    (2) sigma >= sigma_hi = D_max / (-z + sqrt(z^2 + 2 ln((N - 1) eps / (1 - eps))))  =>  w_1 <= eps,
        valid only when (N - 1) eps > 1 - eps (otherwise sigma_hi is NaN and ``upper_reason`` says so).

    D_min is the exact nearest-neighbour distance (:func:`calmwild.neighbors.knn`), D_max the farthest distance.
    If z^2 + 2 ln((N - 1)(1 - eps) / eps) < 0, (1) holds at every sigma and sigma_lo = +inf. Requires N >= 2 and
    delta < (N - 1) / 2 (so z > 0, which the monotonicity step of the proof uses).
    The summary gives mean, median, quantiles, min and max of each threshold over the selected points.
    """
    y = as_points(train, "train", min_count=2)
    n = y.shape[0]
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    if not 0.0 < delta < 1.0 or delta >= (n - 1) / 2.0:
        raise ValueError(f"delta must lie in (0, min(1, (N-1)/2)) with N = {n}, got {delta}")
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"indices must be a non-empty list of training indices in [0, {n}), got {idx.tolist()}")
    queries = y[idx.to(y.device)]
    nn_dist, nn_index = knn(queries, y, k=2)
    nn_dist, nn_index = nn_dist.to("cpu", torch.float64), nn_index.cpu()
    d_min = torch.where(nn_index[:, 0] == idx, nn_dist[:, 1], nn_dist[:, 0])
    d_max = _farthest_distances(queries, y, chunk_size)

    z = float(norm.isf(delta / (n - 1)))
    log_lo = math.log((n - 1) * (1 - eps) / eps)
    disc = z * z + 2.0 * log_lo
    denominator_lo = z + math.sqrt(disc) if disc >= 0 else -math.inf
    sigma_lo = d_min / denominator_lo if denominator_lo > 0 else torch.full_like(d_min, math.inf)
    reason = None
    if (n - 1) * eps > 1 - eps:
        sigma_hi = d_max / (-z + math.sqrt(z * z + 2.0 * math.log((n - 1) * eps / (1 - eps))))
    else:
        sigma_hi = torch.full_like(d_max, math.nan)
        reason = (
            f"(N-1) eps = {(n - 1) * eps:.4g} <= 1 - eps = {1 - eps:.4g}: even uniform weights exceed eps, "
            "so no noise level forces w_1 <= eps"
        )
    return ConcentrationThresholds(
        indices=idx,
        d_min=d_min,
        d_max=d_max,
        sigma_lo=sigma_lo,
        sigma_hi=sigma_hi,
        z=z,
        eps=float(eps),
        delta=float(delta),
        num_train=n,
        upper_reason=reason,
        summary={"sigma_lo": _summary(sigma_lo), "sigma_hi": _summary(sigma_hi)},
    )


def _falling_through(sigmas: torch.Tensor, curve: torch.Tensor, level: float) -> float | None:
    """The largest sigma where ``curve`` (over ascending ``sigmas``, linear in log sigma between grid points) falls
    from at-or-above ``level`` to below it; None when it never does on the grid."""
    u = torch.log(sigmas.double()).numpy()
    falls = [point for point, direction in level_crossings(u, curve.double().numpy(), level) if direction < 0]
    return math.exp(max(falls)) if falls else None


def remark_4_3(curves: WeightCurves, thresholds: ConcentrationThresholds) -> dict[str, Any]:
    """Remark 4.3: Theorem 4.2's thresholds against the max-weight curve, which the paper says "compare well".

    With eps the thresholds' level: ``curve_sigma`` gives the sigma where the expected max weight m(sigma)
    (Def. 4.1) falls through 1 - eps (``high_weight``) and through eps (``low_weight``); ``threshold_sigma`` the
    median over the selected training points of sigma_lo (below it w_1 >= 1 - eps) and sigma_hi (above it
    w_1 <= eps); ``ratio`` = threshold / curve for each (None where either is missing). Theorem 4.2 is a bound
    holding with probability 1 - delta, so sigma_lo is expected below its crossing and sigma_hi above it."""
    order = torch.argsort(curves.sigmas)
    sigmas, weight = curves.sigmas[order], curves.max_weight[order]
    eps = thresholds.eps
    curve = {"high_weight": _falling_through(sigmas, weight, 1 - eps), "low_weight": _falling_through(sigmas, weight,
                                                                                                     eps)}
    median = {"high_weight": thresholds.summary["sigma_lo"].get("median"),
              "low_weight": thresholds.summary["sigma_hi"].get("median")}
    ratio = {key: None if curve[key] is None or median[key] is None else median[key] / curve[key] for key in curve}
    return {"eps": eps, "levels": {"high_weight": 1 - eps, "low_weight": eps}, "curve_sigma": curve,
            "threshold_sigma": median, "ratio": ratio, "num_points": int(thresholds.indices.numel())}
