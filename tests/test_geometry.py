"""Tests of calmwild.geometry against independent computations: closed forms (chi-square tails, a 1-D Gaussian
integral, distances of a regular simplex), brute-force softmax over explicit noise draws, and Monte Carlo with
tolerances derived from the sample size."""

import math

import numpy as np
import pytest
import torch
from scipy.special import expit
from scipy.stats import chi2, ncx2

from calmwild import geometry
from calmwild.geometry import (
    concentration_thresholds,
    coverage_bounds,
    danger_zone,
    posterior_weight_curves,
    shell_coverage,
    shell_probability_bound,
    shell_radii,
    two_shell_probability,
    two_shell_probability_mc,
)
from calmwild.schedule import sigma_to_timestep


def _clusters(n: int, d: int, seed: int, centers: int = 4, spread: float = 0.3) -> torch.Tensor:
    """n points from a mixture of Gaussian clusters in R^d with unit-scale pairwise distances."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=gen) / math.sqrt(2.0)
    labels = torch.randint(centers, (n,), generator=gen)
    return means[labels] + spread * torch.randn(n, d, generator=gen) / math.sqrt(d)


def _simplex(count: int, d: int, distance: float) -> torch.Tensor:
    """``count`` vertices of a regular simplex with all pairwise distances ``distance`` (scaled basis vectors)."""
    pts = torch.zeros(count, d)
    pts[torch.arange(count), torch.arange(count)] = distance / math.sqrt(2.0)
    return pts


# ------------------------------------------------------------------------------------------------- shells
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

    monkeypatch.setattr(geometry, "ncx2", Failing)
    fallback = two_shell_probability(ratios * sigma, sigma, d).numpy()
    assert np.all(np.isfinite(fallback))
    # The moment-matched normal is accurate to a few 1e-3 at d = 3072 (CLT with skewness ~ sqrt(8 / d)).
    assert np.max(np.abs(fallback - reference)) < 0.01
    assert ncx2 is not Failing  # scipy itself untouched


# ---------------------------------------------------------------------------------------------- coverage
def test_coverage_single_training_point_equals_two_shell_average():
    """With one training point y, C_sigma = E_x f_sigma(||x - y||) exactly (Def. 4.6 with a single shell)."""
    d = 32
    y = _clusters(1, d, seed=5)
    heldout = _clusters(40, d, seed=6)
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
    train, heldout = _clusters(200, d, seed=10), _clusters(100, d, seed=11)
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
    assert bounds.num_queries == 100 and bounds.num_pairs == 4000


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
    got = geometry._any_in_shell(x, lo2, hi2, y, (y * y).sum(dim=1), chunk_size=64)
    assert torch.equal(got, truth)


# --------------------------------------------------------------------------------------- posterior weights
def test_weight_curves_two_points_match_gaussian_integral():
    """N = 2 at distance D: w_self = sigmoid(a^2 / 2 + a g) with a = D / sigma and g ~ N(0, 1) (the noise
    orthogonal to y_1 - y_2 cancels), so E[w_self] and E[max(w, 1 - w)] are 1-D Gaussian integrals."""
    d, distance = 8, 1.0
    train = torch.zeros(2, d)
    train[1, 0] = distance
    sigmas = torch.tensor([0.2, 0.5, 1.0, 3.0])
    noises = 5000
    curves = posterior_weight_curves(train, sigmas, num_points=2, num_noises=noises, seed=0, batch_size=777)
    g = np.linspace(-12, 12, 240_001)
    density = np.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    for k, sigma in enumerate(sigmas.tolist()):
        a = distance / sigma
        w = expit(a * a / 2 + a * g)
        for name, values in (("self", w), ("max", np.maximum(w, 1 - w))):
            mean = np.trapezoid(values * density, g)
            std = math.sqrt(max(np.trapezoid((values - mean) ** 2 * density, g), 0.0))
            got = float(curves.self_weight[k] if name == "self" else curves.max_weight[k])
            assert abs(got - mean) <= 4 * std / math.sqrt(2 * noises) + 1e-6, (name, sigma, got, mean)
    assert curves.num_points == 2 and curves.num_noises == noises


def test_weight_curves_agree_with_bruteforce_softmax():
    """Both estimates average over all 6 base points; each has standard error sqrt(mean within-point variance /
    (6 K)), so they must agree within 4 sqrt(2) of that."""
    noises = 1500
    train = _clusters(6, 5, seed=2, centers=3, spread=0.5)
    sigmas = torch.tensor([0.05, 0.2, 0.4, 1.0])
    curves = posterior_weight_curves(train, sigmas, num_points=6, num_noises=noises, seed=4)
    gen = torch.Generator().manual_seed(99)
    y = train.double()
    for k, sigma in enumerate(sigmas.double()):
        per_point_max, per_point_self = [], []
        for i in range(6):
            x = y[i] + sigma * torch.randn(noises, 5, generator=gen, dtype=torch.float64)
            w = torch.softmax(-torch.cdist(x, y) ** 2 / (2 * sigma**2), dim=1)
            per_point_max.append(w.max(dim=1).values)
            per_point_self.append(w[:, i])
        for got, samples in ((curves.max_weight[k], per_point_max), (curves.self_weight[k], per_point_self)):
            samples = torch.stack(samples)
            se = math.sqrt(float(samples.var(dim=1).mean()) / samples.numel())
            assert abs(float(got) - float(samples.mean())) <= 4 * math.sqrt(2) * se + 1e-9, (k, float(got))
    assert curves.max_weight[0] > 0.99 and curves.max_weight[-1] < 0.9  # the grid spans the transition


def test_limits_of_weight_and_coverage():
    train, heldout = _clusters(30, 64, seed=7), _clusters(20, 64, seed=8)
    dist = torch.cdist(train.double(), train.double())
    closest = float(dist[dist > 0].min())
    farthest = float(torch.cdist(heldout.double(), train.double()).max())
    sigmas = torch.tensor([1e-3 * closest, 1e3 * farthest])
    curves = posterior_weight_curves(train, sigmas, num_points=30, num_noises=10)
    assert curves.max_weight[0] == pytest.approx(1.0, abs=1e-6)
    assert curves.self_weight[0] == pytest.approx(1.0, abs=1e-6)
    assert curves.max_weight[1] == pytest.approx(1 / 30, rel=1e-2)
    cov = shell_coverage(train, heldout, sigmas, num_queries=20, num_noises=50)
    assert cov.coverage[0] == 0.0
    assert cov.coverage[1] >= shell_probability_bound(5.0) - 4 * max(float(cov.coverage_se[1]), 1e-3)


# -------------------------------------------------------------------------------------- Theorem 4.2 thresholds
def test_concentration_thresholds_hold_empirically():
    eps, delta, noises = 0.05, 0.05, 2000
    train = _clusters(40, 32, seed=12, centers=6, spread=0.6).double()
    points = [0, 7, 19]
    th = concentration_thresholds(train, points, eps=eps, delta=delta)
    dist = torch.cdist(train, train)
    for k, i in enumerate(points):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        assert float(th.d_min[k]) == pytest.approx(float(others.min()), rel=1e-6)
        assert float(th.d_max[k]) == pytest.approx(float(others.max()), rel=1e-6)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - delta / 39.0, dtype=torch.float64))
    assert th.z == pytest.approx(float(z), rel=1e-6)
    gen = torch.Generator().manual_seed(13)

    def self_weights(i: int, sigma: float) -> torch.Tensor:
        x = train[i] + sigma * torch.randn(noises, train.shape[1], generator=gen, dtype=torch.float64)
        return torch.softmax(-torch.cdist(x, train) ** 2 / (2 * sigma**2), dim=1)[:, i]

    for k, i in enumerate(points):
        lo, hi = float(th.sigma_lo[k]), float(th.sigma_hi[k])
        assert 0 < lo < hi < math.inf
        for sigma in (lo, 0.5 * lo):
            assert (self_weights(i, sigma) >= 1 - eps).double().mean() >= 1 - delta
        for sigma in (hi, 2.0 * hi):
            assert (self_weights(i, sigma) <= eps).double().mean() >= 1 - delta
    assert th.summary["sigma_lo"]["count"] == 3
    assert th.summary["sigma_lo"]["median"] == pytest.approx(float(th.sigma_lo.median()))
    assert th.upper_reason is None


def test_concentration_upper_threshold_invalid_for_tiny_sets_and_bad_input():
    train = _clusters(3, 8, seed=1)
    th = concentration_thresholds(train, [0, 1], eps=0.05, delta=0.05)  # (N-1) eps = 0.1 < 0.95
    assert torch.all(torch.isnan(th.sigma_hi)) and "1 - eps" in th.upper_reason
    assert torch.all(torch.isfinite(th.sigma_lo))
    assert th.to_dict()["sigma_hi"] == [None, None] and th.summary["sigma_hi"]["mean"] is None
    with pytest.raises(ValueError, match="eps"):
        concentration_thresholds(train, [0], eps=1.5)
    with pytest.raises(ValueError, match="indices"):
        concentration_thresholds(train, [3])


# ------------------------------------------------------------------------------------------------ danger zone
def test_danger_zone_interpolates_in_log_sigma():
    sigmas = [100.0, 10.0, 1.0, 0.1]  # any order
    weight = [0.0, 0.3, 0.9, 1.0]
    cover = [1.0, 0.8, 0.2, 0.0]
    zone = danger_zone(sigmas, weight, cover)
    # weight: 0.9 -> 0.3 over log10 sigma 0 -> 1 crosses 0.5 at 2/3; coverage 0.2 -> 0.8 crosses at 1/2
    assert zone.band == pytest.approx((10**0.5, 10 ** (2 / 3)))
    assert zone.coverage_crossing_sigma == pytest.approx(10**0.5)
    assert zone.weight_crossing_sigma == pytest.approx(10 ** (2 / 3))
    # weight - coverage: 0.7 -> -0.5 crosses 0 at 7/12; level 0.9 - 0.6 * 7/12 = 0.55
    assert zone.crossing_sigma == pytest.approx(10 ** (7 / 12))
    assert zone.crossing_level == pytest.approx(0.55)
    assert zone.max_joint_level == pytest.approx(0.55)
    report = zone.to_dict()
    assert report["empty"] is False
    assert report["timesteps"] == pytest.approx([float(sigma_to_timestep(s)) for s in zone.band])
    assert report["crossing"]["timestep"] == pytest.approx(float(sigma_to_timestep(10 ** (7 / 12))))

    empty = danger_zone(sigmas, weight, cover, weight_level=0.6, coverage_level=0.6)
    assert empty.band is None and empty.intervals == [] and empty.to_dict()["empty"] is True
    assert empty.to_dict()["sigma"] is None
    assert empty.crossing_sigma == pytest.approx(10 ** (7 / 12)) and empty.max_joint_level == pytest.approx(0.55)

    with pytest.raises(ValueError, match="same length"):
        danger_zone([1.0, 2.0], [0.5], [0.5, 0.6])
    with pytest.raises(ValueError, match="weight_level"):
        danger_zone([1.0, 2.0], [0.5, 0.4], [0.5, 0.6], weight_level=0.0)


def test_simplex_transitions_land_where_distances_predict():
    """N training + M held-out vertices of a regular simplex (all pairwise distances D) in R^d.

    Weight: for x = y_1 + sigma n, log(w_j / w_1) = -a^2 / 2 - a g_j with a = D / sigma, and the g_j have pairwise
    correlation 1/2 (the edges y_1 - y_j meet at 60 degrees), g_j = (h_0 + h_j) / sqrt(2). Then
    sum_j w_j / w_1 ~ (N - 1) exp(-a^2 / 2 + a^2 / 4), which is 1 at a^2 = 4 ln(N - 1):
    the weight transition sits near sigma_w = D / (2 sqrt(ln(N - 1))).
    Coverage: ||x - y_j + sigma n||^2 / sigma^2 = a^2 + 2 a g_j + ||n||^2 with ||n||^2 ~ d and the shell's outer
    radius^2 = d + 2 sqrt(d t) + 2 t, so shells start to reach held-out points when a^2 ~ 2 sqrt(d t) + 2 t:
    sigma_c = D / sqrt(2 sqrt(d t) + 2 t) (the inner radius never binds: a^2 + ||n||^2 > d - 2 sqrt(d t)).
    """
    n, m, d, distance, t = 50, 50, 256, 10.0, 5.0
    pts = _simplex(n + m, d, distance)
    train, heldout = pts[:n], pts[n:]
    sigmas = torch.logspace(math.log10(distance / 40), math.log10(distance), 25)
    curves = posterior_weight_curves(train, sigmas, num_points=50, num_noises=40, seed=0)
    cov = shell_coverage(train, heldout, sigmas, num_queries=50, num_noises=40, t=t, seed=1)
    zone = danger_zone(sigmas, curves.max_weight, cov.coverage)
    sigma_w = distance / (2 * math.sqrt(math.log(n - 1)))
    sigma_c = distance / math.sqrt(2 * math.sqrt(d * t) + 2 * t)
    # leading-order predictions (the max over j and the quenched average push sigma_w up by ~25%): a factor 1.5
    assert sigma_w / 1.5 < zone.weight_crossing_sigma < 1.5 * sigma_w
    assert sigma_c / 1.5 < zone.coverage_crossing_sigma < 1.5 * sigma_c
    assert zone.band == pytest.approx((zone.coverage_crossing_sigma, zone.weight_crossing_sigma))
    assert zone.band[0] < zone.crossing_sigma < zone.band[1]
