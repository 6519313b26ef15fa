"""calmwild.geometry.risk: per-image risk scores against brute-force distances, explicit softmax weights, and a
synthetic set whose isolated points must score highest."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from calmwild.geometry.risk import (
    PRIMARY_SCORE,
    danger_zone_bandwidth,
    expected_self_weight,
    kernel_self_weight,
    knn_distance_score,
    leave_one_out_neighbors,
    nearest_neighbor_score,
    random_score_baseline,
    random_scores,
    reproduction_counts,
    risk_scores,
)
from calmwild.stats import auroc, auroc_null_std


def brute_auroc(scores, positives) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, ties counting one half: every pair enumerated."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def brute_distances(train: torch.Tensor) -> torch.Tensor:
    flat = train.flatten(1).double()
    return ((flat.unsqueeze(1) - flat.unsqueeze(0)) ** 2).sum(-1).sqrt()


def clustered_with_outliers(seed: int = 0):
    """Four tight clusters of 20 points in 16-d plus 6 isolated points far from everything (indices 80-85)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    clusters = (centres.repeat_interleave(20, 0) + 0.1 * torch.randn(80, 16, generator=g, dtype=torch.float64))
    outliers = 8.0 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    return torch.cat([clusters, outliers]).float().reshape(86, 1, 4, 4), torch.arange(80, 86)


# ------------------------------------------------------------------------------------------------ rank statistics


def test_random_baseline_is_chance_level():
    """The seeded draw is reported as is; over many seeds the mean AUROC is 0.5 within 4 standard errors, the mean
    Spearman rho is 0 likewise, and the spreads match the null standard deviations."""
    mask = np.zeros(60, dtype=bool)
    mask[:20] = True
    counts = np.arange(60) % 7
    out = random_score_baseline(mask, counts, seed=3, num_draws=400)
    assert out["auroc"] == pytest.approx(auroc(random_scores(60, 3), mask))
    assert out["spearman"] == pytest.approx(stats.spearmanr(random_scores(60, 3).numpy(), counts).statistic)
    null_auroc, null_rho = auroc_null_std(20, 40), 1 / math.sqrt(59)
    assert out["auroc_null_std"] == pytest.approx(null_auroc)
    assert out["spearman_null_std"] == pytest.approx(null_rho)
    draws = np.array([auroc(random_scores(60, s), mask) for s in range(3, 403)])
    assert out["auroc_draws"]["mean"] == pytest.approx(draws.mean()) and out["auroc_draws"]["num"] == 400
    assert abs(out["auroc_draws"]["mean"] - 0.5) < 4 * null_auroc / math.sqrt(400)
    assert 0.8 * null_auroc < out["auroc_draws"]["std"] < 1.2 * null_auroc
    assert abs(out["spearman_draws"]["mean"]) < 4 * null_rho / math.sqrt(400)
    assert 0.8 * null_rho < out["spearman_draws"]["std"] < 1.2 * null_rho


def test_random_baseline_undefined_statistics_are_none():
    out = random_score_baseline([True, True, True], counts=[2, 2, 2], num_draws=5)
    assert out["auroc"] is None and out["spearman"] is None
    assert out["auroc_draws"] is None and out["spearman_draws"] is None
    with pytest.raises(ValueError, match="num_draws"):
        random_score_baseline([True, False], num_draws=-1)


def test_leave_one_out_neighbors_match_brute_force(gen):
    train = torch.randn(40, 1, 4, 4, generator=gen(1))
    dist, index = leave_one_out_neighbors(train, k=3)
    full = brute_distances(train)
    full.fill_diagonal_(math.inf)
    expected_d, expected_i = torch.sort(full, dim=1, stable=True)
    torch.testing.assert_close(dist.double(), expected_d[:, :3], rtol=1e-5, atol=1e-6)
    assert torch.equal(index, expected_i[:, :3])


def test_leave_one_out_keeps_duplicates_as_neighbours(gen):
    train = torch.randn(10, 1, 2, 2, generator=gen(2))
    train[7] = train[2]
    dist, index = leave_one_out_neighbors(train, k=1)
    assert index[2, 0] == 7 and index[7, 0] == 2
    assert dist[2, 0] == 0 and dist[7, 0] == 0
    assert (index[:, 0] != torch.arange(10)).all()


def test_neighbour_scores_are_relative_distances(gen):
    train = torch.randn(31, 1, 3, 3, generator=gen(3))
    full = brute_distances(train)
    full.fill_diagonal_(math.inf)
    d1 = full.min(dim=1).values
    torch.testing.assert_close(nearest_neighbor_score(train), d1 / d1.median(), rtol=1e-5, atol=1e-6)
    mean5 = torch.sort(full, dim=1).values[:, :5].mean(dim=1)
    torch.testing.assert_close(knn_distance_score(train, k=5), mean5 / mean5.median(), rtol=1e-5, atol=1e-6)


def test_scores_refuse_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        nearest_neighbor_score([[0.0, 1.0]])
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbor_score(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"k must lie in \[1, 4\]"):
        knn_distance_score(torch.randn(5, 1, 2, 2), k=5)
    with pytest.raises(ValueError, match="median neighbour distance is 0"):
        nearest_neighbor_score(torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="sigma"):
        kernel_self_weight(torch.randn(4, 1, 2, 2), sigma=0.0)
    with pytest.raises(ValueError, match="num_noises"):
        expected_self_weight(torch.randn(4, 1, 2, 2), sigma=1.0, num_noises=0)


# ------------------------------------------------------------------------------------------------ kernel scores


def test_kernel_self_weight_matches_explicit_softmax(gen):
    train = torch.randn(25, 1, 3, 3, generator=gen(4))
    sigma = 1.3
    d2 = brute_distances(train) ** 2
    expected = torch.softmax(-d2 / (2 * sigma**2), dim=1).diagonal()
    torch.testing.assert_close(kernel_self_weight(train, sigma, chunk_size=7), expected, rtol=1e-10, atol=1e-12)


def test_kernel_self_weight_limits(gen):
    train = torch.randn(12, 1, 2, 2, generator=gen(5))
    torch.testing.assert_close(kernel_self_weight(train, 1e-3), torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(kernel_self_weight(train, 1e4), torch.full((12,), 1 / 12, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_expected_self_weight_matches_explicit_monte_carlo(gen):
    """Same documented noise draws, weights by an explicit softmax over explicit distances."""
    train = torch.randn(15, 1, 2, 3, generator=gen(6))
    sigma, num_noises = 0.8, 5
    got = expected_self_weight(train, sigma, num_noises, generator=gen(11), chunk_size=4)
    g, y = gen(11), train.double().flatten(1)
    total = torch.zeros(15, dtype=torch.float64)
    for _ in range(num_noises):
        x = y + sigma * torch.randn(train.shape, generator=g, dtype=torch.float64).flatten(1)
        d2 = ((x.unsqueeze(1) - y.unsqueeze(0)) ** 2).sum(-1)
        total += torch.softmax(-d2 / (2 * sigma**2), dim=1).diagonal()
    torch.testing.assert_close(got, total / num_noises, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["nn", "knn", "kernel", "expected"])
def test_isolated_points_get_the_highest_scores(score, gen):
    train, isolated = clustered_with_outliers()
    if score == "nn":
        values = nearest_neighbor_score(train)
    elif score == "knn":
        values = knn_distance_score(train, k=5)
    elif score == "kernel":
        values = kernel_self_weight(train, sigma=1.0)
    else:
        values = expected_self_weight(train, sigma=1.0, num_noises=8, generator=gen(0))
    top = torch.topk(values, len(isolated)).indices
    assert set(top.tolist()) == set(isolated.tolist())
    mask = torch.zeros(len(train), dtype=torch.bool)
    mask[isolated] = True
    assert auroc(values, mask) == 1.0


# ------------------------------------------------------------------------------------------------ reproduction


def test_reproduction_counts_count_only_memorized_samples():
    counts = reproduction_counts(torch.tensor([0, 2, 2, 1, 2, 0]), torch.tensor([True, True, True, False, False, True]),
                                 num_train=4)
    assert counts.tolist() == [2, 0, 2, 0]
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        reproduction_counts([0, 4], [True, True], num_train=4)
    with pytest.raises(ValueError, match="2 nearest indices for 3"):
        reproduction_counts([0, 1], [True, True, False], num_train=4)


def test_danger_zone_bandwidth_is_the_zone_centre_or_the_crossing():
    assert danger_zone_bandwidth({"empty": False, "sigma": [0.25, 4.0]}) == pytest.approx(1.0)
    assert danger_zone_bandwidth({"empty": True, "sigma": None, "crossing": {"sigma": 0.7}}) == pytest.approx(0.7)
    assert danger_zone_bandwidth({"empty": True, "sigma": None, "crossing": {"sigma": None}}) is None


def test_risk_scores_gather_every_score_with_k_clipped(gen):
    train = torch.randn(5, 1, 3, 3, generator=gen(3))
    d = brute_distances(train).double()
    d.fill_diagonal_(math.inf)
    nearest = d.min(dim=1).values
    without_bandwidth = risk_scores(train, k=10)
    assert sorted(without_bandwidth) == sorted([PRIMARY_SCORE, "knn4_distance"])
    torch.testing.assert_close(without_bandwidth[PRIMARY_SCORE], nearest / nearest.median(), rtol=1e-5, atol=0)
    four = d.sort(dim=1).values[:, :4].mean(dim=1)
    torch.testing.assert_close(without_bandwidth["knn4_distance"], four / four.median(), rtol=1e-5, atol=0)
    with_bandwidth = risk_scores(train, sigma=0.8, k=2, num_noises=3, seed=5)
    assert sorted(with_bandwidth) == sorted([PRIMARY_SCORE, "knn2_distance", "kernel_self_weight",
                                             "expected_self_weight"])
    # the kernel score: 1 / sum_j exp(-||y_i - y_j||^2 / (2 sigma^2)), written out
    explicit = 1.0 / torch.exp(-brute_distances(train).double() ** 2 / (2 * 0.8**2)).sum(dim=1)
    torch.testing.assert_close(with_bandwidth["kernel_self_weight"], explicit, rtol=1e-6, atol=0)
    torch.testing.assert_close(with_bandwidth["expected_self_weight"],
                               expected_self_weight(train, 0.8, 3, generator=gen(5)), rtol=0, atol=0)
