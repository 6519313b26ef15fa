"""Gaussian shells (paper Section 4.1): the Laurent-Massart shell of Lemma 4.5, the shell coverage of the
noised data distribution (Def. 4.6), the two-shell function (Def. 4.7) and Theorem 4.8's bounds on the coverage.

Notation: training set Y = {y_1..y_N} in R^d, held-out points x from the same distribution, noise n ~ N(0, I_d).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2, ncx2, norm
from tqdm.auto import tqdm

from calmwild.checks import check_count, check_sigmas
from calmwild.geometry.levels import MARGIN_FACTOR, level_terms, noise_blocks, squared_at
from calmwild.geometry.noise import (
    PAIR_BUDGET,
    as_points,
    check_shell_t,
    cluster_mean_se,
    pair_distances,
    seeded_generator,
    unit_roundoff,
)
from calmwild.neighbors import knn


def shell_radii(d: int, t: float = 5.0) -> tuple[float, float]:
    """Radii (r_-, r_+) of the Gaussian shell of Lemma 4.5 (Laurent-Massart):

        r_- = sqrt(d - 2 sqrt(d t)),  r_+ = sqrt(d + 2 sqrt(d t) + 2 t),  P(r_- <= ||n|| <= r_+) >= 1 - 2 e^{-t}

    for n ~ N(0, I_d). When d - 2 sqrt(d t) < 0 (d < 4 t, e.g. d < 20 at the paper's t = 5) the lower radius is
    clipped to 0: the shell becomes the ball of radius r_+ and the probability bound still holds (it only gets
    looser). The paper uses t = 5.
    """
    d = check_count(d, "d")
    t = check_shell_t(t)
    inner = d - 2.0 * math.sqrt(d * t)
    return math.sqrt(max(inner, 0.0)), math.sqrt(d + 2.0 * math.sqrt(d * t) + 2.0 * t)


def shell_probability_bound(t: float = 5.0) -> float:
    """Lemma 4.5's lower bound 1 - 2 e^{-t} on P(r_- <= ||n|| <= r_+) (0.9865 at t = 5)."""
    return 1.0 - 2.0 * math.exp(-check_shell_t(t))


@dataclass
class CoverageCurve:
    """Result of :func:`shell_coverage`; tensors are float64 [S] in the order of ``sigmas``."""

    sigmas: torch.Tensor
    coverage: torch.Tensor
    coverage_se: torch.Tensor
    num_queries: int
    num_noises: int
    t: float

    def to_dict(self) -> dict[str, Any]:
        return {"coverage": {"mean": self.coverage.tolist(), "se": self.coverage_se.tolist()}}


def _in_shells(
    base: torch.Tensor,
    noise: torch.Tensor,
    y: torch.Tensor,
    y_sq: torch.Tensor,
    sigmas: Sequence[float],
    lo2: torch.Tensor,
    hi2: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """For every level s and noisy copy x = b_p + sigma_s n_pk: does ANY training point y_j satisfy
    lo2 <= ||x - y_j||^2 <= hi2? ``lo2`` / ``hi2`` broadcast to [S, P, M]; returns bool [S, P, M].

    Squared distances at every level come from one product per chunk (:mod:`calmwild.geometry.levels`). A computed
    value within the per-copy margin M = MARGIN_FACTOR (2 gamma + 8 u) (||b|| + max ||y|| + sigma ||n||)^2 + 4 u hi2
    of a boundary is undecided: a copy without a certain hit has those pairs recomputed from explicit differences in
    float64, so membership is decided exactly at any noise level. Levels whose copies are all covered are skipped
    in later chunks."""
    num_levels, (p, m, dim) = len(sigmas), noise.shape
    lo2, hi2 = lo2.expand(num_levels, p, m), hi2.expand(num_levels, p, m)
    u = unit_roundoff(y.dtype)
    # When d u >= 1/2 the bound is vacuous; a margin of the whole magnitude then sends every pair to float64.
    gamma = dim * u / (1.0 - dim * u) if dim * u < 0.5 else 1.0
    tol = MARGIN_FACTOR * (2.0 * gamma + 8.0 * u)
    reach = base.norm(dim=1).unsqueeze(1) + float(y_sq.max().sqrt())  # ||b|| + max ||y||, [P, 1]
    noise_norm = noise.norm(dim=2)
    covered = torch.zeros(num_levels, p, m, dtype=torch.bool, device=y.device)
    pair_batch = max(1, PAIR_BUDGET // dim)
    for start in range(0, y.shape[0], chunk_size):
        open_levels = [s for s in range(num_levels) if not bool(covered[s].all())]
        if not open_levels:
            break
        stop = min(start + chunk_size, y.shape[0])
        terms = level_terms(base, noise, y[start:stop], y_sq[start:stop])
        for s in open_levels:
            sigma = sigmas[s]
            d2 = squared_at(terms, sigma)
            margin = (tol * (reach + sigma * noise_norm) ** 2 + 4.0 * u * hi2[s]).unsqueeze(2)
            lo, hi = lo2[s].unsqueeze(2), hi2[s].unsqueeze(2)
            hit = ((d2 >= lo + margin) & (d2 <= hi - margin)).any(dim=2)
            # a copy without a certain hit: every pair within the widened shell is near a boundary, decide it exactly
            rows, ks = (~hit & ~covered[s]).nonzero(as_tuple=True)
            near = (d2[rows, ks] >= lo[rows, ks] - margin[rows, ks]) & (d2[rows, ks] <= hi[rows, ks] + margin[rows, ks])
            pick, cols = near.nonzero(as_tuple=True)
            for b0 in range(0, pick.numel(), pair_batch):
                r, k, c = rows[pick[b0 : b0 + pair_batch]], ks[pick[b0 : b0 + pair_batch]], cols[b0 : b0 + pair_batch]
                x = base[r].to(torch.float64) + sigma * noise[r, k].to(torch.float64)
                exact = (x - y[start + c].to(torch.float64)).pow(2).sum(dim=1)
                inside = (exact >= lo2[s, r, k].to(torch.float64)) & (exact <= hi2[s, r, k].to(torch.float64))
                hit[r[inside], k[inside]] = True
            covered[s] |= hit
    return covered


def shell_coverage(
    train: torch.Tensor,
    heldout: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_queries: int = 500,
    num_noises: int = 20,
    t: float = 5.0,
    seed: int = 0,
    chunk_size: int = 4096,
    batch_size: int = 1024,
    progress: bool = False,
) -> CoverageCurve:
    """Gaussian-shell coverage C_sigma(Y) (Def. 4.6) by Monte Carlo:

        C_sigma(Y) = P_{x ~ p_data, n}( x + sigma n lies in  U_i S_sigma(y_i) ),
        S_sigma(y) = { z : sigma r_- <= ||z - y|| <= sigma r_+ }   (radii from :func:`shell_radii`).

    x runs over ``num_queries`` held-out points drawn without replacement (all of them if there are fewer), each
    with ``num_noises`` noises shared across levels. A noisy point is covered iff SOME training point lies at a
    distance in [sigma r_-, sigma r_+] -- not only the nearest one, which may be too close (inside r_-). The test
    is exact (see :func:`_in_shells`); pass float64 tensors to avoid almost all float64 recomputation.
    The standard error is std / sqrt(Q) of the per-query coverage fractions (clusters = held-out points).
    """
    y = as_points(train, "train", min_count=1)
    h = as_points(heldout, "heldout", min_count=1)
    if h.shape[1] != y.shape[1]:
        raise ValueError(f"heldout has {h.shape[1]} features per point but train has {y.shape[1]}")
    sig = check_sigmas(sigmas)
    num_queries = check_count(num_queries, "num_queries")
    num_noises = check_count(num_noises, "num_noises")
    batch_size = check_count(batch_size, "batch_size")
    r_minus, r_plus = shell_radii(y.shape[1], t)
    h = h.to(device=y.device, dtype=y.dtype)
    gen = seeded_generator(y.device, seed)
    query_index = torch.randperm(h.shape[0], generator=gen, device=y.device)[: min(num_queries, h.shape[0])]
    q, levels = query_index.shape[0], sig.tolist()
    bounds = torch.tensor(levels, dtype=torch.float64, device=y.device).reshape(-1, 1, 1)
    lo2, hi2 = (bounds * r_minus) ** 2, (bounds * r_plus) ** 2
    y_sq = (y * y).sum(dim=1)
    fractions = torch.zeros(len(levels), q, dtype=torch.float64, device=y.device)
    with tqdm(total=len(levels) * q * num_noises, desc="shell coverage", unit="query", disable=not progress) as bar:
        for q0, noise in noise_blocks(h[query_index], num_noises, gen, batch_size):
            base = h[query_index[q0 : q0 + noise.shape[0]]]
            covered = _in_shells(base, noise, y, y_sq, levels, lo2.to(y.dtype), hi2.to(y.dtype), chunk_size)
            fractions[:, q0 : q0 + noise.shape[0]] = covered.double().mean(dim=2)
            bar.update(len(levels) * noise.shape[0] * num_noises)
    mean, se = cluster_mean_se(fractions.cpu())
    return CoverageCurve(sig, mean, se, q, num_noises, float(t))


# ------------------------------------------------------------------------------------------ two-shell function
def _ratio_squared(r: Any, sigma: Any) -> np.ndarray:
    """(r / sigma)^2 broadcast, as float64 numpy; validates r >= 0 and sigma > 0."""
    r_np = np.asarray(r.detach().cpu().numpy() if isinstance(r, torch.Tensor) else r, dtype=np.float64)
    s_np = np.asarray(sigma.detach().cpu().numpy() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    if np.any(~np.isfinite(r_np)) or np.any(r_np < 0):
        raise ValueError(f"distances r must be finite and non-negative, got min {np.min(r_np, initial=0.0)}")
    if np.any(~np.isfinite(s_np)) or np.any(s_np <= 0):
        raise ValueError(f"sigma must be finite and positive, got {s_np.tolist()}")
    with np.errstate(over="ignore"):
        return (r_np / s_np) ** 2


def _two_shell_normal(nc: np.ndarray, d: int, lo: float, hi: float) -> np.ndarray:
    """Normal approximation of P(lo <= X <= hi), X ~ noncentral chi2(d, nc), matching mean d + nc and variance
    2 (d + 2 nc). Used only where scipy's noncentral chi-square returns a non-finite value (huge nc, where the
    true answer underflows to 0 and so does this one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = d + nc
        std = np.sqrt(2.0 * (d + 2.0 * nc))
        return norm.cdf((hi - mean) / std) - norm.cdf((lo - mean) / std)


def two_shell_probability(r: Any, sigma: Any, d: int, t: float = 5.0) -> torch.Tensor:
    """Two-shell function f_sigma(r) (Def. 4.7) in closed form:

        f_sigma(r) = P_n( sigma r_- <= || r e_1 + sigma n || <= sigma r_+ )
                   = F(r_+^2) - F(r_-^2),   F = CDF of the noncentral chi-square(df = d, nc = (r / sigma)^2),

    since ||(r / sigma) e_1 + n||^2 is noncentral chi-square (central when r = 0). ``r`` and ``sigma`` broadcast
    (arrays or tensors); returns a float64 CPU tensor of the broadcast shape. scipy's ``ncx2`` is accurate for
    d up to at least 12288 and nc up to ~1e18; beyond that it returns NaN and a moment-matched normal
    approximation (which is 0 there, like the truth) is used instead.
    """
    d = check_count(d, "d")
    r_minus, r_plus = shell_radii(d, t)
    nc = _ratio_squared(r, sigma)
    lo, hi = r_minus**2, r_plus**2
    out = np.empty(nc.shape, dtype=np.float64)
    central = nc == 0
    out[central] = chi2.cdf(hi, d) - chi2.cdf(lo, d)
    rest = ~central
    with np.errstate(all="ignore"):
        out[rest] = ncx2.cdf(hi, d, nc[rest]) - ncx2.cdf(lo, d, nc[rest])
    failed = ~np.isfinite(out)
    if np.any(failed):
        out[failed] = _two_shell_normal(nc[failed], d, lo, hi)
    return torch.from_numpy(np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float64))


def two_shell_probability_mc(
    r: Any, sigma: Any, d: int, t: float = 5.0, num_samples: int = 100_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo estimate of f_sigma(r) (Def. 4.7) and its binomial standard error sqrt(f (1 - f) / M).

    One set of M = ``num_samples`` Gaussian vectors n ~ N(0, I_d) is drawn (seeded, CPU) and reused for every r,
    as in App. E.2: ||(r / sigma) e_1 + n||^2 = (r / sigma)^2 + 2 (r / sigma) n_1 + ||n||^2, so only n_1 and ||n||^2
    of each sample are kept. Returns float64 CPU tensors of the broadcast shape of ``r`` and ``sigma``.
    """
    d = check_count(d, "d")
    num_samples = check_count(num_samples, "num_samples")
    r_minus, r_plus = shell_radii(d, t)
    ratio = torch.as_tensor(np.asarray(np.sqrt(_ratio_squared(r, sigma))))  # 0-d for Python scalars
    gen = seeded_generator(torch.device("cpu"), seed)
    first, sq_norm = [], []
    rows = max(1, PAIR_BUDGET // d)
    for start in range(0, num_samples, rows):
        n = torch.randn(min(rows, num_samples - start), d, generator=gen, dtype=torch.float64)
        first.append(n[:, 0])
        sq_norm.append(n.pow(2).sum(dim=1))
    n1, s = torch.cat(first), torch.cat(sq_norm)
    flat = ratio.reshape(-1)
    frac = torch.empty_like(flat)
    for start in range(0, flat.numel(), max(1, PAIR_BUDGET // num_samples)):
        a = flat[start : start + max(1, PAIR_BUDGET // num_samples)].unsqueeze(1)
        q = a * a + 2.0 * a * n1.unsqueeze(0) + s.unsqueeze(0)
        frac[start : start + a.shape[0]] = ((q >= r_minus**2) & (q <= r_plus**2)).to(torch.float64).mean(dim=1)
    frac = frac.reshape(ratio.shape)
    return frac, torch.sqrt(frac * (1.0 - frac) / num_samples)


# ---------------------------------------------------------------------------------------- Theorem 4.8 bounds
@dataclass
class CoverageBounds:
    """Result of :func:`coverage_bounds`; tensors are float64 [S] in the order of ``sigmas``.

    ``upper`` is min(1, N E[f]) and ``upper_se`` the standard error of the uncapped N E[f] (``upper_uncapped``; 0
    when it was computed exactly). ``exact_neighbors`` training points per query entered the upper bound exactly
    (all N when ``upper_exact``); ``num_pairs`` random pairs estimated the rest.
    """

    sigmas: torch.Tensor
    lower: torch.Tensor
    lower_se: torch.Tensor
    upper: torch.Tensor
    upper_se: torch.Tensor
    upper_uncapped: torch.Tensor
    num_queries: int
    num_pairs: int
    exact_neighbors: int = 0

    @property
    def upper_exact(self) -> bool:
        """Whether the upper bound is the exact all-pairs sum (no random pairs were needed)."""
        return self.num_pairs == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": {"mean": self.lower.tolist(), "se": self.lower_se.tolist()},
            "upper": {
                "mean": self.upper.tolist(),
                "se": self.upper_se.tolist(),
                "uncapped": self.upper_uncapped.tolist(),
                "exact": self.upper_exact,
                "exact_neighbors": self.exact_neighbors,
            },
        }


EXACT_UPPER_BUDGET = 2_000_000  # f evaluations, queries x N x sigmas, of an exact upper bound (~2 us each on a CPU)
UPPER_NEAREST = 32  # otherwise: each query's nearest training points enter exactly, the rest by sampling


def coverage_bounds(
    train: torch.Tensor,
    heldout: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    t: float = 5.0,
    num_pairs: int = 10_000,
    num_queries: int | None = None,
    seed: int = 0,
    exact_budget: int = EXACT_UPPER_BUDGET,
) -> CoverageBounds:
    """Theorem 4.8's bounds on the coverage, with f_sigma from :func:`two_shell_probability` (closed form):

        lower = E_x[ f_sigma(d_NN(x, Y)) ]  <=  C_sigma(Y)  <=  min(1, N E_{x, x'}[ f_sigma(||x - x'||) ]) = upper.

    Both average over the same held-out queries x (``num_queries`` drawn without replacement, default all); the
    training points stand in for the independent draw x' (App. E.2), so N E_{x'}[f(||x - x'||)] = sum_j f(||x - y_j||).

    The upper bound is that sum, computed exactly when queries x N x sigmas is at most ``exact_budget``. Otherwise the
    ``UPPER_NEAREST`` nearest training points of each query enter exactly and the rest is estimated without bias from
    ``num_pairs`` random (query, training point) pairs, N f(||x - y_j||) 1[y_j not among x's nearest]: the close pairs
    that dominate the sum at small sigma are never missed (random pairs alone miss them and can fall below the lower
    bound). Either way the sum contains the nearest-neighbour term f(d_NN(x)) itself, so upper >= lower always.
    Standard errors: std / sqrt(count) of the summands (the upper's over the random pairs only; 0 when exact).
    """
    y = as_points(train, "train", min_count=1)
    h = as_points(heldout, "heldout", min_count=1)
    if h.shape[1] != y.shape[1]:
        raise ValueError(f"heldout has {h.shape[1]} features per point but train has {y.shape[1]}")
    sig = check_sigmas(sigmas)
    num_pairs = check_count(num_pairs, "num_pairs")
    n, m, dim = y.shape[0], h.shape[0], y.shape[1]
    h = h.to(device=y.device, dtype=y.dtype)
    gen = seeded_generator(torch.device("cpu"), seed)
    count = m if num_queries is None else min(check_count(num_queries, "num_queries"), m)
    query_index = torch.randperm(m, generator=gen)[:count].to(y.device)
    exact = count * n * len(sig) <= exact_budget
    k = n if exact else min(n, UPPER_NEAREST)
    near_dist, near_index = knn(h[query_index], y, k=k)
    near_dist = near_dist.to(device="cpu", dtype=torch.float64)
    f_near = two_shell_probability(near_dist.unsqueeze(0), sig.view(-1, 1, 1), dim, t)  # [S, Q, k]
    lower, lower_se = cluster_mean_se(f_near[:, :, 0])
    upper_mean = f_near.sum(dim=2).mean(dim=1)
    upper_se = torch.zeros_like(upper_mean)
    if not exact:
        i = torch.randint(count, (num_pairs,), generator=gen)
        j = torch.randint(n, (num_pairs,), generator=gen)
        far = ~(near_index.cpu()[i] == j.unsqueeze(1)).any(dim=1)  # pairs outside the exact part
        pair_dist = pair_distances(h[query_index[i.to(y.device)]], y[j.to(y.device)])
        f_pair = two_shell_probability(pair_dist.unsqueeze(0), sig.unsqueeze(1), dim, t) * far.to(torch.float64)
        rest, rest_se = cluster_mean_se(f_pair)
        upper_mean, upper_se = upper_mean + n * rest, n * rest_se
    return CoverageBounds(sig, lower, lower_se, upper_mean.clamp(max=1.0), upper_se, upper_mean, count,
                          0 if exact else num_pairs, k)
