"""calmwild.stats: rank statistics against brute-force pair counts and scipy; intervals against closed forms and
simulation."""


import numpy as np
import pytest
import torch
from scipy import stats

from calmwild.stats import auroc, auroc_interval, auroc_null_std, midranks, spearman, spearman_null_std


def brute_auroc(scores, positives) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, ties counting one half: every pair enumerated."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def test_midranks_match_scipy_with_ties():
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], dtype=float)
    np.testing.assert_array_equal(midranks(x), stats.rankdata(x, method="average"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=57).astype(float)  # many ties
    positives = rng.random(57) < 0.35
    assert auroc(scores, positives) == pytest.approx(brute_auroc(scores, positives), abs=1e-12)


def test_auroc_extremes_and_torch_inputs():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8])
    mask = torch.tensor([False, False, False, True, True])
    assert auroc(scores, mask) == 1.0
    assert auroc(-scores, mask) == 0.0
    assert auroc(torch.ones(5), mask) == 0.5


def test_auroc_refuses_one_class_and_bad_input():
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="3 scores for 2"):
        auroc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="boolean"):
        auroc([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="non-finite"):
        auroc([0.1, float("nan")], [True, False])


@pytest.mark.parametrize("seed", [0, 1])
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 8, size=40).astype(float)
    b = a + rng.integers(0, 5, size=40)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_refuses_constant_and_mismatched_input():
    with pytest.raises(ValueError, match="constant"):
        spearman([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="3 values but b has 2"):
        spearman([1, 2, 3], [1, 2])


def test_null_stds_validate():
    assert spearman_null_std(5) == 0.5
    with pytest.raises(ValueError, match="at least 2"):
        spearman_null_std(1)
    with pytest.raises(ValueError, match="n_neg"):
        auroc_null_std(3, 0)


# ------------------------------------------------------------------------------------------------ neighbours


# ------------------------------------------------------------------------------------------------ intervals
def test_wilson_interval_closed_form_and_exact_coverage():
    from calmwild.stats import wilson_interval

    z = stats.norm.ppf(0.975)
    empty = wilson_interval(0, 20)
    assert empty.estimate == 0.0 and empty.low == 0.0 and empty.high == pytest.approx(z * z / (20 + z * z))
    full = wilson_interval(20, 20)
    assert full.high == 1.0 and full.low == pytest.approx(20 / (20 + z * z))
    # exact coverage over the binomial distribution (no simulation): Wilson's stays near the nominal 95%
    for p, n in ((0.3, 50), (0.05, 200), (0.9, 30)):
        covered = sum(stats.binom.pmf(k, n, p) for k in range(n + 1)
                      if wilson_interval(k, n).low <= p <= wilson_interval(k, n).high)
        assert 0.92 <= covered <= 0.985, (p, n, covered)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(5, 4)


def test_mean_and_difference_intervals_match_scipy():
    from calmwild.stats import difference_interval, mean_interval

    a, b = [0.91, 0.85, 0.97, 0.88], [0.42, 0.55, 0.39]
    mine = mean_interval(a)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    assert (mine.low, mine.high) == pytest.approx((low, high)) and mine.count == 4
    diff = difference_interval(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (diff.low, diff.high) == pytest.approx((reference.low, reference.high))
    assert diff.excludes(0.0) and not mean_interval([0.1, 0.9]).excludes(0.5)
    assert difference_interval([0.5, 0.5], [0.2, 0.2]).low == pytest.approx(0.3)  # no spread: the point difference
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])


def test_a_mean_of_rates_keeps_its_interval_inside_zero_and_one():
    from calmwild.stats import rate_mean_interval

    for rates in ([0.113, 0.062, 0.047], [0.97, 0.99, 0.91], [0.4, 0.6, 0.5]):
        low, high = stats.t.interval(0.95, len(rates) - 1, loc=np.mean(rates), scale=stats.sem(rates))
        mine = rate_mean_interval(rates)
        assert (mine.low, mine.high) == pytest.approx((max(0.0, low), min(1.0, high)))
        assert mine.estimate == pytest.approx(np.mean(rates)) and mine.count == 3
    assert rate_mean_interval([0.113, 0.062, 0.047]).low == 0.0  # the quick study's dummy arm: t reaches -1.2%


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_interval_is_delong_from_brute_force_placements(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, size=61).astype(float)  # ties
    positives = rng.random(61) < 0.4
    x, y = scores[positives], scores[~positives]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])  # every pair
    v, w = psi.mean(axis=1), psi.mean(axis=0)
    se = np.sqrt(v.var(ddof=1) / x.size + w.var(ddof=1) / y.size)
    area = psi.mean()
    got = auroc_interval(scores, positives)
    assert got.estimate == pytest.approx(area, abs=1e-12)
    assert got.low == pytest.approx(max(0.0, area - 1.959963984540054 * se), abs=1e-12)
    assert got.high == pytest.approx(min(1.0, area + 1.959963984540054 * se), abs=1e-12)
    assert got.count == 61


def test_auroc_interval_covers_the_true_area_at_its_level():
    """Binormal scores with shift 1: true AUROC = Phi(1 / sqrt 2). Over R replications the 95% interval's coverage
    lies within 4 binomial standard deviations of 0.95 (sqrt(0.95 * 0.05 / R))."""
    rng = np.random.default_rng(7)
    true_area, reps, covered = stats.norm.cdf(1 / np.sqrt(2)), 600, 0
    for _ in range(reps):
        scores = np.r_[rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 60)]
        positives = np.r_[np.ones(40, bool), np.zeros(60, bool)]
        covered += not auroc_interval(scores, positives).excludes(true_area)
    assert abs(covered / reps - 0.95) < 4 * np.sqrt(0.95 * 0.05 / reps)
