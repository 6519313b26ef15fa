"""Geometry of the noise schedule (paper Section 4.1-4.2): posterior concentration, Gaussian-shell coverage, the
bounds that tie coverage to pairwise distances, and the danger zone where both are high.

Notation (PAPER_NOTES 3): training set Y = {y_1..y_N} in R^d, held-out points x from the same distribution,
noise n ~ N(0, I_d), noise level sigma.

- :func:`posterior_weight_curves`: m(sigma) = E_{y_i0 ~ Y} E_n[max_i w_i(y_i0 + sigma n, sigma)] (Def. 4.1) and the
  self weight E[w_i0] (Fig. 7).
- :func:`shell_radii`, :func:`shell_probability_bound`: the Laurent-Massart shell of Lemma 4.5.
- :func:`shell_coverage`: C_sigma(Y) (Def. 4.6) by Monte Carlo with exact shell-membership tests.
- :func:`two_shell_probability` (closed form) and :func:`two_shell_probability_mc`: f_sigma(r) (Def. 4.7).
- :func:`coverage_bounds`: Theorem 4.8, E[f(d_NN(x, Y))] <= C_sigma(Y) <= min(1, N E[f(||x - x'||)]).
- :func:`concentration_thresholds`: Theorem 4.2's per-point noise thresholds.
- :func:`danger_zone`: the sigma band where max weight and coverage are both high (Section 4.2, App. E.4).

Every Monte Carlo estimate carries a standard error. Heavy work is chunked matrix products on the training tensor's
device (float32 or float64, the training tensor's dtype); results are float64 CPU tensors. Noise is drawn from a
``torch.Generator`` on that device, so a seed reproduces a run on the same kind of device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2, ncx2, norm
from tqdm.auto import tqdm

from calmwild.neighbors import flatten, knn, squared_distances
from calmwild.posterior import posterior_summary
from calmwild.schedule import sigma_to_timestep

GEOMETRY_FORMAT_VERSION = 1
# Elements of Gaussian noise held at once per block of base points (64 MiB in float32).
_NOISE_BUDGET = 1 << 24
# Elements per batch when distances of explicit (query, reference) pairs are recomputed in float64.
_PAIR_BUDGET = 1 << 22


# ------------------------------------------------------------------------------------------------ input checks
def _as_points(x: torch.Tensor, name: str, min_count: int = 1) -> torch.Tensor:
    """[N, ...] float32/float64 tensor -> [N, d] (a view when possible)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, ...], got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [N, ...] with at least 2 dimensions, got {tuple(x.shape)}")
    if x.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} points, got {x.shape[0]}")
    return flatten(x)


def _as_sigmas(sigmas: Sequence[float] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Noise levels as a 1-D float64 CPU tensor of finite positive values (order kept)."""
    sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64) if not isinstance(sigmas, torch.Tensor) else sigmas)
    sig = sig.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if sig.numel() == 0:
        raise ValueError("sigmas is empty; expected at least one positive noise level")
    if not torch.all(torch.isfinite(sig) & (sig > 0)):
        raise ValueError(f"sigmas must be finite and positive, got {sig.tolist()}")
    return sig


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_t(t: float) -> float:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise ValueError(f"shell width parameter t must be a finite positive number, got {t!r}")
    return float(t)


def _mean_se(per_cluster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last axis and its standard error std / sqrt(P) (ddof 1) treating each column as one
    independent cluster (a base point with all its noises), so within-point correlation is accounted for.
    The standard error is NaN with a single cluster."""
    p = per_cluster.shape[-1]
    mean = per_cluster.mean(dim=-1)
    if p < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, per_cluster.std(dim=-1, correction=1) / math.sqrt(p)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the matrix products ``squared_distances`` runs in. float32 products may run in TF32 or bf16
    when the global matmul precision is lowered (``torch.set_float32_matmul_precision``), so that is honoured."""
    if dtype == torch.float64:
        return 2.0**-53
    return {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}[torch.get_float32_matmul_precision()]


def _noisy_queries(
    base: torch.Tensor,
    sigmas: torch.Tensor,
    num_noises: int,
    generator: torch.Generator,
    batch_size: int,
    bar: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Noisy copies x = base[p] + sigma_s * n_{p,k} of every base point p, noise k and level s, in batches.

    The same noises n_{p,k} are used at every level (common random numbers), so the curves over sigma are smooth
    and their differences between levels are estimated with little noise. Batches mix levels: each yields
    (x [B, d], sigma [B], cell [B] = s * P + p, p [B]).
    """
    num_base, dim = base.shape
    num_levels = sigmas.shape[0]
    block = max(1, min(num_base, _NOISE_BUDGET // max(1, num_noises * dim)))
    for p0 in range(0, num_base, block):
        pb = min(block, num_base - p0)
        noise = torch.randn(pb, num_noises, dim, generator=generator, device=base.device, dtype=base.dtype)
        total = num_levels * pb * num_noises
        for start in range(0, total, batch_size):
            flat = torch.arange(start, min(start + batch_size, total), device=base.device)
            level = flat // (pb * num_noises)
            local = (flat % (pb * num_noises)) // num_noises
            k = flat % num_noises
            sig = sigmas[level]
            x = base[p0 + local] + sig.unsqueeze(1) * noise[local, k]
            if bar is not None:
                bar.update(int(flat.numel()))
            yield x, sig, level * num_base + p0 + local, p0 + local


# ---------------------------------------------------------------------------------------- posterior weights
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
        w_i(x, sigma) = softmax_i(-||x - y_i||^2 / (2 sigma^2))   (eq. 3; :func:`calmwild.posterior.posterior_summary`).

    The expectation is over TRAINING points only (the paper's definition). ``num_points`` base points are drawn
    uniformly without replacement (all of them if the set is smaller), each noised with ``num_noises`` Gaussian
    noises shared across levels. Standard errors are std / sqrt(P) of the per-base-point means, which accounts
    for the correlation of the noises of one base point. App. E.3 used 100 base points x 400 noises; the error is
    dominated by the spread between base points, so the default of 100 noises loses little and is 4x cheaper.

    All levels are evaluated in the same batches (per-query sigma); memory is O(batch_size * chunk_size).
    """
    y = _as_points(train, "train", min_count=1)
    sig = _as_sigmas(sigmas)
    num_points = _check_positive_int(num_points, "num_points")
    num_noises = _check_positive_int(num_noises, "num_noises")
    batch_size = _check_positive_int(batch_size, "batch_size")
    n, num_levels = y.shape[0], sig.shape[0]
    gen = _generator(y.device, seed)
    base_index = torch.randperm(n, generator=gen, device=y.device)[: min(num_points, n)]
    p = base_index.shape[0]
    sq_norms = (y * y).sum(dim=1)
    sum_max = torch.zeros(num_levels * p, dtype=torch.float64, device=y.device)
    sum_self = torch.zeros_like(sum_max)
    total = num_levels * p * num_noises
    with tqdm(total=total, desc="posterior weights", unit="query", disable=not progress) as bar:
        for x, s, cell, pt in _noisy_queries(
            y[base_index], sig.to(device=y.device, dtype=y.dtype), num_noises, gen, batch_size, bar
        ):
            out = posterior_summary(
                x, y, s, self_index=base_index[pt], want_mean=False, chunk_size=chunk_size, train_sq_norms=sq_norms
            )
            sum_max.index_add_(0, cell, out.max_weight.to(torch.float64))
            sum_self.index_add_(0, cell, out.self_weight.to(torch.float64))
    max_mean, max_se = _mean_se((sum_max / num_noises).reshape(num_levels, p).cpu())
    self_mean, self_se = _mean_se((sum_self / num_noises).reshape(num_levels, p).cpu())
    return WeightCurves(sig, max_mean, max_se, self_mean, self_se, p, num_noises)


# -------------------------------------------------------------------------------------------- Gaussian shells
def shell_radii(d: int, t: float = 5.0) -> tuple[float, float]:
    """Radii (r_-, r_+) of the Gaussian shell of Lemma 4.5 (Laurent-Massart):

        r_- = sqrt(d - 2 sqrt(d t)),  r_+ = sqrt(d + 2 sqrt(d t) + 2 t),  P(r_- <= ||n|| <= r_+) >= 1 - 2 e^{-t}

    for n ~ N(0, I_d). When d - 2 sqrt(d t) < 0 (d < 4 t, e.g. d < 20 at the paper's t = 5) the lower radius is
    clipped to 0: the shell becomes the ball of radius r_+ and the probability bound still holds (it only gets
    looser). The paper uses t = 5.
    """
    d = _check_positive_int(d, "d")
    t = _check_t(t)
    inner = d - 2.0 * math.sqrt(d * t)
    return math.sqrt(max(inner, 0.0)), math.sqrt(d + 2.0 * math.sqrt(d * t) + 2.0 * t)


def shell_probability_bound(t: float = 5.0) -> float:
    """Lemma 4.5's lower bound 1 - 2 e^{-t} on P(r_- <= ||n|| <= r_+) (0.9865 at t = 5)."""
    return 1.0 - 2.0 * math.exp(-_check_t(t))


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


def _any_in_shell(
    x: torch.Tensor,
    lo2: torch.Tensor,
    hi2: torch.Tensor,
    y: torch.Tensor,
    y_sq: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """For each row x_q: does ANY reference y_j satisfy lo2_q <= ||x_q - y_j||^2 <= hi2_q?  (bool [B])

    Squared distances come from one matrix product per chunk (``squared_distances``); its rounding error is at most
    about 2 gamma_d (||x||^2 + ||y||^2) with gamma_d = d u / (1 - d u) (inner products of length d at unit roundoff
    u). One margin per row, M_q = tol (||x_q||^2 + max_j ||y_j||^2) + 4 u hi2_q, bounds that error for every pair of
    the chunk: a computed value in [lo2 + M, hi2 - M] is certainly inside the shell, one outside [lo2 - M, hi2 + M]
    certainly outside. Only a row with no certain hit has its pairs in between recomputed exactly as
    sum((x - y)^2) in float64, so membership is decided exactly (for the stored query values) at any noise level.
    Rows already covered are dropped from later chunks.
    """
    b, dim = x.shape
    u = _unit_roundoff(y.dtype)
    # When d u >= 1/2 the bound is vacuous; a margin of 2 (||x||^2 + ||y||^2) then sends every pair to float64.
    gamma = dim * u / (1.0 - dim * u) if dim * u < 0.5 else 1.0
    tol = 2.0 * gamma + 8.0 * u
    covered = torch.zeros(b, dtype=torch.bool, device=y.device)
    x_sq = (x * x).sum(dim=1)
    pair_batch = max(1, _PAIR_BUDGET // dim)
    for start in range(0, y.shape[0], chunk_size):
        active = (~covered).nonzero(as_tuple=True)[0]
        if active.numel() == 0:
            break
        stop = min(start + chunk_size, y.shape[0])
        xa, yc = x[active], y[start:stop]
        d2 = squared_distances(xa, yc, y_sq[start:stop])
        lo = lo2[active].to(d2.dtype).unsqueeze(1)
        hi = hi2[active].to(d2.dtype).unsqueeze(1)
        margin = tol * (x_sq[active].unsqueeze(1) + y_sq[start:stop].max()) + 4.0 * u * hi
        hit = ((d2 >= lo + margin) & (d2 <= hi - margin)).any(dim=1)
        missed = (~hit).nonzero(as_tuple=True)[0]
        # in a row without a certain hit, every pair inside the widened shell is near a boundary: decide it exactly
        near = (d2[missed] >= lo[missed] - margin[missed]) & (d2[missed] <= hi[missed] + margin[missed])
        rows, cols = near.nonzero(as_tuple=True)
        rows = missed[rows]
        for s in range(0, rows.numel(), pair_batch):
            r, c = rows[s : s + pair_batch], cols[s : s + pair_batch]
            exact = (xa[r].to(torch.float64) - yc[c].to(torch.float64)).pow(2).sum(dim=1)
            inside = (exact >= lo2[active[r]]) & (exact <= hi2[active[r]])
            hit[r[inside]] = True
        covered[active] |= hit
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
    is exact (see :func:`_any_in_shell`); pass float64 tensors to avoid almost all float64 recomputation.
    The standard error is std / sqrt(Q) of the per-query coverage fractions (clusters = held-out points).
    """
    y = _as_points(train, "train", min_count=1)
    h = _as_points(heldout, "heldout", min_count=1)
    if h.shape[1] != y.shape[1]:
        raise ValueError(f"heldout has {h.shape[1]} features per point but train has {y.shape[1]}")
    sig = _as_sigmas(sigmas)
    num_queries = _check_positive_int(num_queries, "num_queries")
    num_noises = _check_positive_int(num_noises, "num_noises")
    batch_size = _check_positive_int(batch_size, "batch_size")
    r_minus, r_plus = shell_radii(y.shape[1], t)
    h = h.to(device=y.device, dtype=y.dtype)
    gen = _generator(y.device, seed)
    query_index = torch.randperm(h.shape[0], generator=gen, device=y.device)[: min(num_queries, h.shape[0])]
    q, num_levels = query_index.shape[0], sig.shape[0]
    sig_dev = sig.to(y.device)
    lo2_levels, hi2_levels = (sig_dev * r_minus) ** 2, (sig_dev * r_plus) ** 2
    y_sq = (y * y).sum(dim=1)
    hits = torch.zeros(num_levels * q, dtype=torch.float64, device=y.device)
    total = num_levels * q * num_noises
    with tqdm(total=total, desc="shell coverage", unit="query", disable=not progress) as bar:
        for x, _, cell, _ in _noisy_queries(h[query_index], sig_dev.to(y.dtype), num_noises, gen, batch_size, bar):
            level = cell // q
            inside = _any_in_shell(x, lo2_levels[level], hi2_levels[level], y, y_sq, chunk_size)
            hits.index_add_(0, cell, inside.to(torch.float64))
    mean, se = _mean_se((hits / num_noises).reshape(num_levels, q).cpu())
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
    d = _check_positive_int(d, "d")
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
    d = _check_positive_int(d, "d")
    num_samples = _check_positive_int(num_samples, "num_samples")
    r_minus, r_plus = shell_radii(d, t)
    ratio = torch.from_numpy(np.sqrt(_ratio_squared(r, sigma)))
    gen = _generator(torch.device("cpu"), seed)
    first, sq_norm = [], []
    rows = max(1, _PAIR_BUDGET // d)
    for start in range(0, num_samples, rows):
        n = torch.randn(min(rows, num_samples - start), d, generator=gen, dtype=torch.float64)
        first.append(n[:, 0])
        sq_norm.append(n.pow(2).sum(dim=1))
    n1, s = torch.cat(first), torch.cat(sq_norm)
    flat = ratio.reshape(-1)
    frac = torch.empty_like(flat)
    for start in range(0, flat.numel(), max(1, _PAIR_BUDGET // num_samples)):
        a = flat[start : start + max(1, _PAIR_BUDGET // num_samples)].unsqueeze(1)
        q = a * a + 2.0 * a * n1.unsqueeze(0) + s.unsqueeze(0)
        frac[start : start + a.shape[0]] = ((q >= r_minus**2) & (q <= r_plus**2)).to(torch.float64).mean(dim=1)
    frac = frac.reshape(ratio.shape)
    return frac, torch.sqrt(frac * (1.0 - frac) / num_samples)


# ---------------------------------------------------------------------------------------- Theorem 4.8 bounds
@dataclass
class CoverageBounds:
    """Result of :func:`coverage_bounds`; tensors are float64 [S] in the order of ``sigmas``.

    ``upper`` is min(1, N E[f]) and ``upper_se`` the standard error of the uncapped N E[f] (``upper_uncapped``).
    """

    sigmas: torch.Tensor
    lower: torch.Tensor
    lower_se: torch.Tensor
    upper: torch.Tensor
    upper_se: torch.Tensor
    upper_uncapped: torch.Tensor
    num_queries: int
    num_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": {"mean": self.lower.tolist(), "se": self.lower_se.tolist()},
            "upper": {
                "mean": self.upper.tolist(),
                "se": self.upper_se.tolist(),
                "uncapped": self.upper_uncapped.tolist(),
            },
        }


def _pair_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_k - b_k|| for matched rows, computed directly in float64 (no cancellation), in bounded batches."""
    rows = max(1, _PAIR_BUDGET // a.shape[1])
    out = [
        (a[s : s + rows].to(torch.float64) - b[s : s + rows].to(torch.float64)).pow(2).sum(dim=1).sqrt()
        for s in range(0, a.shape[0], rows)
    ]
    return torch.cat(out).cpu()


def coverage_bounds(
    train: torch.Tensor,
    heldout: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    t: float = 5.0,
    num_pairs: int = 10_000,
    num_queries: int | None = None,
    seed: int = 0,
) -> CoverageBounds:
    """Theorem 4.8's bounds on the coverage, with f_sigma from :func:`two_shell_probability` (closed form):

        lower = E_x[ f_sigma(d_NN(x, Y)) ]  <=  C_sigma(Y)  <=  min(1, N E_{x, x'}[ f_sigma(||x - x'||) ]) = upper.

    The lower bound averages over held-out points x (``num_queries`` drawn without replacement, default all) with
    their exact nearest-neighbour distance into the training set (:func:`calmwild.neighbors.knn`). The upper bound
    averages over ``num_pairs`` independent pairs (x held-out, x' training), drawn with replacement -- x' stands for
    an independent draw from the data distribution, as in App. E.2. Standard errors: std / sqrt(count) of the
    summands (times N for the upper bound).
    """
    y = _as_points(train, "train", min_count=1)
    h = _as_points(heldout, "heldout", min_count=1)
    if h.shape[1] != y.shape[1]:
        raise ValueError(f"heldout has {h.shape[1]} features per point but train has {y.shape[1]}")
    sig = _as_sigmas(sigmas)
    num_pairs = _check_positive_int(num_pairs, "num_pairs")
    n, m, dim = y.shape[0], h.shape[0], y.shape[1]
    h = h.to(device=y.device, dtype=y.dtype)
    gen = _generator(torch.device("cpu"), seed)
    count = m if num_queries is None else min(_check_positive_int(num_queries, "num_queries"), m)
    query_index = torch.randperm(m, generator=gen)[:count].to(y.device)
    nn_dist = knn(h[query_index], y, k=1)[0][:, 0].to(device="cpu", dtype=torch.float64)
    i = torch.randint(m, (num_pairs,), generator=gen).to(y.device)
    j = torch.randint(n, (num_pairs,), generator=gen).to(y.device)
    pair_dist = _pair_distances(h[i], y[j])
    f_nn = two_shell_probability(nn_dist.unsqueeze(0), sig.unsqueeze(1), dim, t)
    f_pair = two_shell_probability(pair_dist.unsqueeze(0), sig.unsqueeze(1), dim, t)
    lower, lower_se = _mean_se(f_nn)
    upper_mean, upper_se = _mean_se(f_pair)
    uncapped = n * upper_mean
    return CoverageBounds(sig, lower, lower_se, uncapped.clamp(max=1.0), n * upper_se, uncapped, count, num_pairs)


# ------------------------------------------------------------------------------------- Theorem 4.2 thresholds
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
    return _pair_distances(q, y[arg])


def concentration_thresholds(
    train: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    eps: float = 0.05,
    delta: float = 0.05,
    chunk_size: int = 4096,
) -> ConcentrationThresholds:
    """Theorem 4.2's noise thresholds for posterior concentration, per selected training point y_1 (= train[i]).

    Derived following the paper's proof; the paper's exact constants were lost in extraction (PAPER_NOTES 3).
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
    y = _as_points(train, "train", min_count=2)
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


# ------------------------------------------------------------------------------------------------ danger zone
def _crossings(u: np.ndarray, values: np.ndarray, level: float) -> list[tuple[float, int]]:
    """Points where the piecewise-linear curve (u, values) crosses ``level``: (u*, direction) with direction +1 when
    the curve goes from below to at-or-above the level with increasing u, -1 for the reverse."""
    out = []
    above = values >= level
    for k in range(len(u) - 1):
        if above[k] != above[k + 1]:
            frac = (level - values[k]) / (values[k + 1] - values[k])
            out.append((float(u[k] + frac * (u[k + 1] - u[k])), 1 if above[k + 1] else -1))
    return out


@dataclass
class DangerZone:
    """Result of :func:`danger_zone` (sigmas in the EDM convention, timesteps of the DDPM linear schedule)."""

    band: tuple[float, float] | None
    intervals: list[tuple[float, float]]
    crossing_sigma: float | None
    crossing_level: float | None
    weight_crossing_sigma: float | None
    coverage_crossing_sigma: float | None
    max_joint_level: float
    weight_level: float
    coverage_level: float
    ddpm: dict[str, float] = field(default_factory=dict)

    def _timestep(self, sigma: float | None) -> float | None:
        return None if sigma is None else float(sigma_to_timestep(sigma, **self.ddpm))

    def to_dict(self) -> dict[str, Any]:
        return {
            "empty": self.band is None,
            "sigma": None if self.band is None else list(self.band),
            "timesteps": None if self.band is None else [self._timestep(s) for s in self.band],
            "intervals": [list(iv) for iv in self.intervals],
            "crossing": {
                "sigma": self.crossing_sigma,
                "timestep": self._timestep(self.crossing_sigma),
                "level": self.crossing_level,
            },
            "weight_crossing_sigma": self.weight_crossing_sigma,
            "coverage_crossing_sigma": self.coverage_crossing_sigma,
            "max_joint_level": self.max_joint_level,
            "weight_level": self.weight_level,
            "coverage_level": self.coverage_level,
            "ddpm": dict(self.ddpm),
        }


def danger_zone(
    sigmas: Sequence[float] | torch.Tensor,
    max_weight: Sequence[float] | torch.Tensor,
    coverage: Sequence[float] | torch.Tensor,
    weight_level: float = 0.5,
    coverage_level: float = 0.5,
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> DangerZone:
    """The danger zone (Section 4.2, App. E.4): the sigma band where max posterior weight >= ``weight_level`` AND
    coverage >= ``coverage_level``, with both curves interpolated linearly in log sigma between grid points.

    Defaults 0.5 / 0.5: "high" read as "majority" for both quantities -- the nearest training image carries more
    than half of the posterior mass (the empirical denoiser's output is dominated by one image), and more than half
    of the noised test distribution lies in the supervised shells. With two sharp monotone transitions the band is
    non-empty exactly when the curves intersect above 0.5, matching the paper's reading of its Fig. 3 / Fig. 8 (a
    narrow interval containing the intersection point). The levels are arguments, as the paper gives no numbers.

    Returns the widest interval as ``band`` (all of them in ``intervals``; noisy curves can split one), or
    ``band = None`` when no sigma meets both levels -- no band is invented; then ``crossing_sigma`` (where the two
    curves intersect, weight falling below coverage; the highest such crossing) and ``max_joint_level``
    (max over sigma of min(weight, coverage), the level both reach together) describe what was reached.
    ``weight_crossing_sigma``: the largest sigma where the weight falls through its level;
    ``coverage_crossing_sigma``: the smallest sigma where the coverage rises through its level (None if never).
    DDPM timesteps (``T``, ``beta_*``) come from :func:`calmwild.schedule.sigma_to_timestep` (clamped to [1, T]).
    """
    sig = _as_sigmas(sigmas).numpy()
    w = np.asarray(torch.as_tensor(max_weight, dtype=torch.float64).cpu().reshape(-1), dtype=np.float64)
    c = np.asarray(torch.as_tensor(coverage, dtype=torch.float64).cpu().reshape(-1), dtype=np.float64)
    if not (sig.shape == w.shape == c.shape) or sig.size < 2:
        raise ValueError(
            f"sigmas, max_weight and coverage must be 1-D of the same length >= 2, got {sig.size}, {w.size}, {c.size}"
        )
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(c))):
        raise ValueError("max_weight and coverage must be finite")
    for name, level in (("weight_level", weight_level), ("coverage_level", coverage_level)):
        if not 0.0 < level <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {level}")
    order = np.argsort(sig)
    if np.any(np.diff(sig[order]) == 0):
        raise ValueError(f"sigmas must be distinct, got {sig.tolist()}")
    u, w, c = np.log(sig[order]), w[order], c[order]

    w_cross, c_cross = _crossings(u, w, weight_level), _crossings(u, c, coverage_level)
    breaks = np.unique(np.concatenate([u, [p for p, _ in w_cross], [p for p, _ in c_cross]]))
    mids = 0.5 * (breaks[:-1] + breaks[1:])
    good = (np.interp(mids, u, w) >= weight_level) & (np.interp(mids, u, c) >= coverage_level)
    intervals: list[tuple[float, float]] = []
    for k in np.flatnonzero(good):
        if intervals and math.isclose(intervals[-1][1], breaks[k], rel_tol=0, abs_tol=1e-12):
            intervals[-1] = (intervals[-1][0], float(breaks[k + 1]))
        else:
            intervals.append((float(breaks[k]), float(breaks[k + 1])))
    band = max(intervals, key=lambda iv: iv[1] - iv[0]) if intervals else None

    diff_cross = _crossings(u, w - c, 0.0)
    falling = [p for p, direction in diff_cross if direction < 0] or [p for p, _ in diff_cross]
    crossing_u = max(falling, key=lambda p: float(np.interp(p, u, w))) if falling else None
    joint_u = np.concatenate([u, [p for p, _ in diff_cross]])
    joint = np.minimum(np.interp(joint_u, u, w), np.interp(joint_u, u, c))
    weight_down = [p for p, direction in w_cross if direction < 0]
    coverage_up = [p for p, direction in c_cross if direction > 0]

    def sigma_of(value: float | None) -> float | None:
        return None if value is None else float(math.exp(value))

    return DangerZone(
        band=None if band is None else (sigma_of(band[0]), sigma_of(band[1])),
        intervals=[(sigma_of(a), sigma_of(b)) for a, b in intervals],
        crossing_sigma=sigma_of(crossing_u),
        crossing_level=None if crossing_u is None else float(np.interp(crossing_u, u, w)),
        weight_crossing_sigma=sigma_of(max(weight_down)) if weight_down else None,
        coverage_crossing_sigma=sigma_of(min(coverage_up)) if coverage_up else None,
        max_joint_level=float(joint.max()),
        weight_level=float(weight_level),
        coverage_level=float(coverage_level),
        ddpm={"T": int(T), "beta_start": float(beta_start), "beta_end": float(beta_end)},
    )


# ------------------------------------------------------------------------------------------------ full result
GEOMETRY_KEYS = (
    "format_version",
    "dataset",
    "settings",
    "sigmas",
    "timesteps",
    "max_weight",
    "self_weight",
    "coverage",
    "coverage_bounds",
    "thresholds",
    "danger_zone",
)


@dataclass
class GeometryResult:
    """Everything :func:`calmwild.analysis.analyze_geometry` computes; :meth:`to_dict` gives the JSON report with
    the stable top-level keys :data:`GEOMETRY_KEYS`:

    - ``format_version`` (int), ``dataset`` {num_train, num_heldout, dim}, ``settings`` (all parameters, the
      shell radii and Lemma 4.5's probability bound, the DDPM schedule used for timesteps);
    - ``sigmas`` (ascending) and ``timesteps`` (their DDPM timesteps);
    - ``max_weight``, ``self_weight``, ``coverage``: {mean, se} per sigma;
    - ``coverage_bounds``: {lower: {mean, se}, upper: {mean, se, uncapped}} (Theorem 4.8);
    - ``thresholds``: Theorem 4.2 per point and summary, plus ``timesteps`` of the mean thresholds;
    - ``danger_zone``: see :class:`DangerZone`.
    Non-finite numbers become null in JSON.
    """

    dataset: dict[str, int]
    settings: dict[str, Any]
    weights: WeightCurves
    coverage: CoverageCurve
    bounds: CoverageBounds
    thresholds: ConcentrationThresholds
    danger: DangerZone

    def to_dict(self) -> dict[str, Any]:
        ddpm = self.danger.ddpm
        mean_lo = self.thresholds.summary["sigma_lo"]["mean"]
        mean_hi = self.thresholds.summary["sigma_hi"]["mean"]
        thresholds = self.thresholds.to_dict()
        thresholds["timesteps"] = {
            name: None if value is None else float(sigma_to_timestep(value, **ddpm))
            for name, value in (("sigma_lo_mean", mean_lo), ("sigma_hi_mean", mean_hi))
        }
        return {
            "format_version": GEOMETRY_FORMAT_VERSION,
            "dataset": dict(self.dataset),
            "settings": dict(self.settings),
            "sigmas": self.weights.sigmas.tolist(),
            "timesteps": sigma_to_timestep(self.weights.sigmas, **ddpm).tolist(),
            **self.weights.to_dict(),
            **self.coverage.to_dict(),
            "coverage_bounds": self.bounds.to_dict(),
            "thresholds": thresholds,
            "danger_zone": self.danger.to_dict(),
        }
