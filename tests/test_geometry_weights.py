"""calmwild.geometry.weights: posterior-weight curves and Theorem 4.2 thresholds
against independent computations (closed forms, brute-force softmax over explicit noise draws, Monte Carlo with
tolerances derived from the sample size)."""

import math

import numpy as np
import pytest
import torch
from points import clusters, simplex
from scipy.special import expit

from calmwild.geometry import (
    concentration_thresholds,
    danger_zone,
    posterior_weight_curves,
    shell_coverage,
    shell_probability_bound,
)
from calmwild.geometry.weights import ConcentrationThresholds, WeightCurves, remark_4_3


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
    train = clusters(6, 5, seed=2, centers=3, spread=0.5)
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
    train, heldout = clusters(30, 64, seed=7), clusters(20, 64, seed=8)
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
    train = clusters(40, 32, seed=12, centers=6, spread=0.6).double()
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
    train = clusters(3, 8, seed=1)
    th = concentration_thresholds(train, [0, 1], eps=0.05, delta=0.05)  # (N-1) eps = 0.1 < 0.95
    assert torch.all(torch.isnan(th.sigma_hi)) and "1 - eps" in th.upper_reason
    assert torch.all(torch.isfinite(th.sigma_lo))
    assert th.to_dict()["sigma_hi"] == [None, None] and th.summary["sigma_hi"]["mean"] is None
    with pytest.raises(ValueError, match="eps"):
        concentration_thresholds(train, [0], eps=1.5)
    with pytest.raises(ValueError, match="indices"):
        concentration_thresholds(train, [3])


# ------------------------------------------------------------------------------------------------ danger zone


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
    pts = simplex(n + m, d, distance)
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


def test_remark_4_3_compares_the_median_thresholds_with_the_curve_crossings():
    """A weight curve 1 -> 0.5 -> 0 over sigma 0.1, 1, 10 (linear in log sigma) crosses 0.95 at 0.1 * 10^0.1 and
    0.05 at 10^0.9; the ratios are the median thresholds over those."""
    sigmas = torch.tensor([1.0, 0.1, 10.0], dtype=torch.float64)  # any order
    weights = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    curves = WeightCurves(sigmas, weights, torch.zeros(3), weights, torch.zeros(3), num_points=4, num_noises=2)
    lo, hi = torch.tensor([0.05, 0.06, 0.08], dtype=torch.float64), torch.tensor([12.0, 15.0, 30.0])
    thresholds = ConcentrationThresholds(torch.arange(3), lo, hi, lo, hi, z=2.0, eps=0.05, delta=0.05, num_train=40,
                                         summary={"sigma_lo": {"median": 0.06}, "sigma_hi": {"median": 15.0}})
    remark = remark_4_3(curves, thresholds)
    assert remark["curve_sigma"]["high_weight"] == pytest.approx(0.1 * 10**0.1)
    assert remark["curve_sigma"]["low_weight"] == pytest.approx(10**0.9)
    assert remark["ratio"]["high_weight"] == pytest.approx(0.06 / (0.1 * 10**0.1))
    assert remark["ratio"]["low_weight"] == pytest.approx(15.0 / 10**0.9)
    assert remark["levels"] == {"high_weight": 0.95, "low_weight": 0.05} and remark["num_points"] == 3
    flat = WeightCurves(sigmas, torch.full((3,), 0.5, dtype=torch.float64), torch.zeros(3), weights, torch.zeros(3),
                        num_points=4, num_noises=2)
    assert remark_4_3(flat, thresholds)["ratio"] == {"high_weight": None, "low_weight": None}


def test_curves_work_in_bounded_chunks_at_any_training_set_size(monkeypatch):
    """50,000 training points: every product of the weight and coverage curves sees at most ``batch_size`` noisy
    copies against ``chunk_size`` training points (memory O(batch x chunk)), and the training set is walked in
    ceil(N / chunk) chunks per block of copies."""
    from calmwild.geometry import levels, shells, weights

    seen = []
    original = levels.level_terms

    def counting(base, noise, y, y_sq):
        seen.append((noise.shape[0] * noise.shape[1], y.shape[0]))
        return original(base, noise, y, y_sq)

    monkeypatch.setattr(weights, "level_terms", counting)
    monkeypatch.setattr(shells, "level_terms", counting)
    train = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(0))
    posterior_weight_curves(train, [0.1, 1.0, 10.0], num_points=6, num_noises=4, chunk_size=8192, batch_size=8)
    assert max(rows for rows, _ in seen) <= 8 and max(chunk for _, chunk in seen) <= 8192
    blocks = math.ceil(6 / (8 // 4))
    assert len(seen) == blocks * math.ceil(50_000 / 8192)
    seen.clear()
    shell_coverage(train, train[:5], [0.1, 1.0, 10.0], num_queries=5, num_noises=4, chunk_size=8192, batch_size=8)
    assert seen and max(rows for rows, _ in seen) <= 8 and max(chunk for _, chunk in seen) <= 8192
