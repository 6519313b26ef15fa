"""calmwild.geometry.shells: Lemma 4.5 radii, the two-shell function, coverage and Theorem 4.8
against independent computations (closed forms, brute-force softmax over explicit noise draws, Monte Carlo with
tolerances derived from the sample size)."""

import math

import numpy as np
import pytest
import torch
from points import clusters
from scipy.stats import chi2, ncx2

from calmwild.geometry import (
    coverage_bounds,
    shell_coverage,
    shell_probability_bound,
    shell_radii,
    two_shell_probability,
    two_shell_probability_mc,
)
from calmwild.geometry import shells


def test_shell_radii_formula_clipping_and_lemma_probability():
    r_minus, r_plus = shell_radii(3072, 5.0)
    assert r_minus == pytest.approx(math.sqrt(3072 - 2 * math.sqrt(3072 * 5)))
    assert r_plus == pytest.approx(math.sqrt(3072 + 2 * math.sqrt(3072 * 5) + 10))
    assert shell_radii(16, 5.0)[0] == 0.0  # 16 - 2 sqrt(80) < 0: clipped
    assert shell_probability_bound(5.0) == pytest.approx(0.98652, abs=1e-5)
    # Lemma 4.5 against the exact chi-square law of ||n||^2.
    for d in (1, 16, 64, 3072):
        lo, hi = shell_radii(d, 5.0)
        assert chi2.cdf(hi**2, d) - chi2.cdf(lo**2, d) >= shell_probability_bound(5.0)
    with pytest.raises(ValueError, match="t must be"):
        shell_radii(10, -1.0)
    with pytest.raises(ValueError, match="d must be"):
        shell_radii(0)


# ---------------------------------------------------------------------------------------- two-shell function


@pytest.mark.parametrize("d", [2, 64, 3072])
def test_two_shell_closed_form_matches_monte_carlo(d):
    t, sigma, samples = 5.0, 0.7, 20_000
    width = math.sqrt(2 * math.sqrt(d * t) + 2 * t)  # r / sigma where the two shells start to separate
    ratios = torch.tensor([0.0, 0.3, 0.8, 1.0, 1.2, 1.6], dtype=torch.float64) * width
    closed = two_shell_probability(ratios * sigma, sigma, d, t)
    mc, mc_se = two_shell_probability_mc(ratios * sigma, sigma, d, t, num_samples=samples, seed=1)
    binomial_se = torch.sqrt(closed * (1 - closed) / samples).clamp_min(1.0 / samples)
    assert torch.all((closed - mc).abs() <= 4 * binomial_se), (closed, mc)
    assert torch.all(mc_se <= 0.5 / math.sqrt(samples) + 1e-12)
    assert closed[0] > 0.99 and closed[-1] < closed[2]  # the transition is inside the tested range


def test_two_shell_closed_form_matches_direct_sampling():
    """Literal Def. 4.7: sample n in R^d and test sigma r_- <= ||r e_1 + sigma n|| <= sigma r_+."""
    d, t, sigma, samples = 64, 5.0, 2.0, 20_000
    r = torch.tensor([0.0, 3.0, 6.0, 7.5, 9.0], dtype=torch.float64) * sigma
    gen = torch.Generator().manual_seed(3)
    n = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    lo, hi = shell_radii(d, t)
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0] = 1.0
    for k, rk in enumerate(r):
        norm = (rk * e1 + sigma * n).norm(dim=1)
        direct = ((norm >= sigma * lo) & (norm <= sigma * hi)).double().mean()
        closed = two_shell_probability(rk, sigma, d, t)
        tol = 4 * max(math.sqrt(float(closed) * (1 - float(closed)) / samples), 1.0 / samples)
        assert abs(float(closed) - float(direct)) <= tol, (k, float(closed), float(direct))


def test_two_shell_broadcasting_huge_noncentrality_and_validation():
    out = two_shell_probability(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0.5], [1.0]]), 3072)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    lo, hi = shell_radii(3072, 5.0)
    assert float(out[0, 0]) == pytest.approx(chi2.cdf(hi**2, 3072) - chi2.cdf(lo**2, 3072), rel=1e-12)
    huge = two_shell_probability(np.array([1e3, 1e9, 1e12, 1e300]), 1e-2, 3072)  # nc up to 1e604 (inf)
    assert torch.all(torch.isfinite(huge)) and torch.all(huge == 0)
    with pytest.raises(ValueError, match="distances r"):
        two_shell_probability(-1.0, 1.0, 10)
    with pytest.raises(ValueError, match="sigma must be"):
        two_shell_probability(1.0, 0.0, 10)


def test_two_shell_normal_fallback_when_scipy_fails(monkeypatch):
    d, sigma = 3072, 1.0
    ratios = np.linspace(0.0, 40.0, 41)
    reference = two_shell_probability(ratios * sigma, sigma, d).numpy()

    class Failing:
        @staticmethod
        def cdf(x, df, nc):
            return np.full(np.broadcast(x, nc).shape, np.nan)

    monkeypatch.setattr(shells, "ncx2", Failing)
    fallback = two_shell_probability(ratios * sigma, sigma, d).numpy()
    assert np.all(np.isfinite(fallback))
    # The moment-matched normal is accurate to a few 1e-3 at d = 3072 (CLT with skewness ~ sqrt(8 / d)).
    assert np.max(np.abs(fallback - reference)) < 0.01
    assert ncx2 is not Failing  # scipy itself untouched


# ---------------------------------------------------------------------------------------------- coverage


def test_coverage_single_training_point_equals_two_shell_average():
    """With one training point y, C_sigma = E_x f_sigma(||x - y||) exactly (Def. 4.6 with a single shell)."""
    d = 32
    y = clusters(1, d, seed=5)
    heldout = clusters(40, d, seed=6)
    sigmas = torch.tensor([0.05, 0.1, 0.14, 0.2, 0.4])
    cov = shell_coverage(y, heldout, sigmas, num_queries=40, num_noises=200, seed=0)
    dist = (heldout.double() - y.double()).norm(dim=1)
    expected = two_shell_probability(dist.unsqueeze(0), sigmas.double().unsqueeze(1), d).mean(dim=1)
    noise_se = torch.sqrt(expected * (1 - expected) / (40 * 200)).clamp_min(1e-3)
    assert torch.all((cov.coverage - expected).abs() <= 4 * torch.maximum(cov.coverage_se, noise_se)), (
        cov.coverage,
        expected,
    )
    assert cov.num_queries == 40 and cov.num_noises == 200


@pytest.mark.parametrize("d", [16, 256])
def test_monte_carlo_coverage_lies_between_theorem_4_8_bounds(d):
    train, heldout = clusters(200, d, seed=10), clusters(100, d, seed=11)
    # centre the grid on the coverage transition: shells reach the nearest neighbour when
    # d_NN^2 ~ sigma^2 (r_+^2 - d) (see the simplex test)
    nn = torch.cdist(heldout.double(), train.double()).min(dim=1).values.median()
    sigmas = float(nn) / math.sqrt(2 * math.sqrt(5.0 * d) + 10.0) * torch.logspace(-0.6, 0.6, 12)
    queries, noises = 100, 20
    cov = shell_coverage(train, heldout, sigmas, num_queries=queries, num_noises=noises, seed=1)
    bounds = coverage_bounds(train, heldout, sigmas, num_pairs=4000, seed=2)
    floor = 3.0 / (queries * noises)  # a rate this small can be observed as 0 (rule of three)
    slack_lo = 4 * torch.sqrt(cov.coverage_se**2 + bounds.lower_se**2) + floor
    slack_hi = 4 * torch.sqrt(cov.coverage_se**2 + bounds.upper_se**2) + floor
    assert torch.all(bounds.lower <= cov.coverage + slack_lo), (bounds.lower, cov.coverage)
    assert torch.all(cov.coverage <= bounds.upper + slack_hi), (bounds.upper, cov.coverage)
    assert torch.all(bounds.upper <= 1.0) and torch.all(bounds.upper_uncapped >= bounds.upper)
    # not vacuous: the grid spans the transition, and there the bounds are informative
    assert cov.coverage[0] < 0.05 and cov.coverage[-1] > 0.95
    middle = (cov.coverage > 0.1) & (cov.coverage < 0.9)
    assert middle.any() and torch.all(bounds.lower[middle] > 0.05)
    assert torch.any(bounds.upper_uncapped[cov.coverage < 0.1] < 1.0)
    assert bounds.num_queries == 100 and bounds.upper_exact and bounds.num_pairs == 0


def _planted_close_pairs(n: int, m: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points far apart, and held-out points of which a quarter are near-copies of training points."""
    gen = torch.Generator().manual_seed(seed)
    train = 3.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    heldout = 3.0 * torch.randn(m, d, generator=gen, dtype=torch.float64)
    copies = m // 4
    heldout[:copies] = train[:copies] + 0.02 * torch.randn(copies, d, generator=gen, dtype=torch.float64)
    return train, heldout


def _all_pairs_upper(train, heldout, sigmas, d):
    """N E_{x, x'} f(||x - x'||) over every (held-out, training) pair, from a plain double loop of cdist rows."""
    total = torch.zeros(len(sigmas), dtype=torch.float64)
    for x in heldout:
        r = torch.cdist(x[None], train)[0]
        total += two_shell_probability(r[None], torch.as_tensor(sigmas, dtype=torch.float64)[:, None], d).sum(dim=1)
    return total / len(heldout)


def test_theorem_4_8_upper_bound_is_the_all_pairs_sum_and_never_below_the_lower_bound():
    d, sigmas = 16, torch.logspace(-1.5, 0.5, 8)
    train, heldout = _planted_close_pairs(64, 40, d, seed=3)
    exact = coverage_bounds(train, heldout, sigmas)
    assert exact.upper_exact and exact.exact_neighbors == 64
    # rtol: the library sums f at calmwild.neighbors.knn's distances (float32 products, relative error ~1e-8)
    torch.testing.assert_close(exact.upper_uncapped, _all_pairs_upper(train, heldout, sigmas, d), rtol=1e-6, atol=0)
    assert torch.all(exact.upper >= exact.lower)
    # the sampled path keeps every query's nearest points exact: it cannot miss the planted pairs, stays above the
    # lower bound, and agrees with the exact sum within its standard error
    sampled = coverage_bounds(train, heldout, sigmas, num_pairs=4000, exact_budget=0)
    assert not sampled.upper_exact and sampled.exact_neighbors == 32 and sampled.num_pairs == 4000
    assert torch.all(sampled.upper_uncapped >= sampled.lower)
    assert torch.all((sampled.upper_uncapped - exact.upper_uncapped).abs() <= 4 * sampled.upper_se + 1e-12)
    # even with very few random pairs (random pairs alone would then usually miss every planted pair)
    few = coverage_bounds(train, heldout, sigmas, num_pairs=20, exact_budget=0)
    assert torch.all(few.upper_uncapped >= few.lower) and torch.all(few.lower == exact.lower)


def test_two_shell_probability_mc_takes_python_scalars():
    f, se = two_shell_probability_mc(1.0, 0.5, 8, num_samples=20_000)
    assert f.shape == () and float(se) > 0
    assert float(f) == pytest.approx(float(two_shell_probability(torch.tensor(1.0), torch.tensor(0.5), 8)),
                                     abs=5 * float(se))


def test_shell_membership_is_exact_under_float32_cancellation():
    """Points far from the origin (||x||^2 ~ 1e8, float32 spacing ~ 8) with shell boundaries within 1e-7 relative of
    the true squared distances (~1e2): the float32 matrix product cannot resolve them; the test must still agree
    with float64 differences."""
    gen = torch.Generator().manual_seed(0)
    d = 64
    offset = torch.full((d,), 1.25e3)
    y = offset + torch.randn(300, d, generator=gen)
    x = offset + torch.randn(40, d, generator=gen)
    exact = torch.cdist(x.double(), y.double()) ** 2
    nearest, farthest = exact.min(dim=1).values, exact.max(dim=1).values
    group = torch.arange(40) % 4
    # 0: outer radius just above the nearest (inside); 1: just below it (outside);
    # 2: inner radius just below the farthest (inside); 3: just above it (outside)
    lo2 = torch.where(group == 2, farthest * (1 - 1e-7), torch.where(group == 3, farthest * (1 + 1e-7), 0.0))
    hi2 = torch.where(group == 0, nearest * (1 + 1e-7), torch.where(group == 1, nearest * (1 - 1e-7), 2 * farthest))
    truth = ((exact >= lo2.unsqueeze(1)) & (exact <= hi2.unsqueeze(1))).any(dim=1)
    assert torch.equal(truth, (group % 2 == 0))
    # the copies are the points themselves (zero noise, one level at sigma 0), the shells one per copy
    got = shells._in_shells(x, torch.zeros(40, 1, d), y, (y * y).sum(dim=1), [0.0], lo2.reshape(1, 40, 1),
                            hi2.reshape(1, 40, 1), chunk_size=64)
    assert torch.equal(got.reshape(40), truth)


# --------------------------------------------------------------------------------------- posterior weights
