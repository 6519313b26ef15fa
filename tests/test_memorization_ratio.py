"""calmwild.memorization.ratio: the ratio test against brute-force distances, trajectory memorization, clustered
standard errors."""

import math

import pytest
import torch

from calmwild.memorization.ratio import mean_and_stderr, ratio_test, trajectory_memorization


def brute_ratio(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = torch.cdist(x.flatten(1).double(), train.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist, index = torch.sort(d, dim=1, stable=True)
    return dist[:, 0], dist[:, 1], index[:, 0]


def test_ratio_test_matches_brute_force(gen):
    g = gen(0)
    train = torch.randn(60, 2, 4, 4, generator=g)
    queries = torch.cat([
        torch.randn(15, 2, 4, 4, generator=g),                       # novel
        train[:10] + 0.05 * torch.randn(10, 2, 4, 4, generator=g),    # near copies
        train[10:15],                                                # exact copies
    ])
    result = ratio_test(queries, train)
    d1, d2, nearest = brute_ratio(queries, train)
    torch.testing.assert_close(result.d1.double(), d1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.d2.double(), d2, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.nearest_index, nearest)
    assert torch.equal(result.memorized, d1 / d2 < 1 / 3)
    assert result.memorized[15:].all() and not result.memorized[:15].any()
    loose = ratio_test(queries, train, threshold=0.99)
    assert torch.equal(loose.memorized, d1 / d2 < 0.99)


def test_duplicated_training_image_counts_as_memorized(gen):
    train = torch.randn(20, 1, 3, 3, generator=gen(1))
    train[13] = train[4]
    result = ratio_test(train[[4, 13, 5]], train)
    assert result.d1[:2].tolist() == [0.0, 0.0] and result.d2[:2].tolist() == [0.0, 0.0]
    assert result.ratio[:2].tolist() == [0.0, 0.0]  # 0/0 := 0: the sample IS a training image
    assert result.memorized.tolist() == [True, True, True]
    assert result.nearest_index.tolist() == [4, 4, 5]


@pytest.mark.parametrize("threshold", [0, 1, -0.2, 1.5, True, float("nan"), "0.3"])
def test_threshold_outside_unit_interval_is_refused(threshold, gen):
    train = torch.randn(5, 4, generator=gen(2))
    with pytest.raises(ValueError, match="threshold"):
        ratio_test(train, train, threshold=threshold)


def test_ratio_test_needs_two_training_images():
    with pytest.raises(ValueError, match="at least 2 training images"):
        ratio_test(torch.zeros(1, 4), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------------ trajectories


def test_trajectory_memorization_copies_and_fresh_samples(gen):
    g = gen(3)
    train = torch.randn(100, 3, 4, 4, generator=g)
    copies = trajectory_memorization(train[torch.randperm(100, generator=g)[:40]], train)
    assert copies.rate == 1.0 and copies.stderr == 0.0 and copies.num_samples == 40
    fresh = trajectory_memorization(torch.randn(80, 3, 4, 4, generator=g), train)
    assert fresh.rate == 0.0 and not fresh.result.memorized.any()
    mixed = trajectory_memorization(torch.cat([train[:30], torch.randn(50, 3, 4, 4, generator=g)]), train)
    assert mixed.rate == pytest.approx(30 / 80)
    assert mixed.stderr == pytest.approx(math.sqrt(30 / 80 * 50 / 80 / 80))  # binomial
    assert mixed.to_dict() == {"rate": mixed.rate, "stderr": mixed.stderr, "num_samples": 80}


# ------------------------------------------------------------------------------------------------ reductions


def test_mean_and_stderr_clusters_by_group(gen):
    g = gen(4)
    values = torch.rand(2, 30, generator=g, dtype=torch.float64)
    groups = torch.arange(30) // 3  # 10 images with 3 noises each
    mean, se = mean_and_stderr(values, groups)
    per_group = values.reshape(2, 10, 3).mean(dim=2)
    torch.testing.assert_close(mean, values.mean(dim=1))
    torch.testing.assert_close(se, per_group.std(dim=1, correction=0) / math.sqrt(10))
    flags = torch.tensor([True] * 7 + [False] * 13)
    rate, se = mean_and_stderr(flags)
    assert float(rate) == pytest.approx(0.35) and float(se) == pytest.approx(math.sqrt(0.35 * 0.65 / 20))
    with pytest.raises(ValueError, match="no items"):
        mean_and_stderr(torch.empty(3, 0))


# ------------------------------------------------------------------------------------------------ noise and items
