"""calmwild.memorization.per_sigma: per-noise-level MSE and memorization against the closed-form error of a linear
denoiser on Gaussian data and an inline empirical optimal denoiser; item noise, sharding and batching invariance."""

import math

import pytest
import torch

from calmwild.evaluation import shard_bounds
from calmwild.memorization.per_sigma import (
    item_noise,
    per_sigma_errors,
    per_sigma_errors_and_ratio_tests,
    per_sigma_memorization,
    per_sigma_mse,
    summarize_errors,
    summarize_ratio_tests,
)


def brute_ratio(x: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = torch.cdist(x.flatten(1).double(), train.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist, index = torch.sort(d, dim=1, stable=True)
    return dist[:, 0], dist[:, 1], index[:, 0]


def empirical_denoiser(train: torch.Tensor):
    """Optimal denoiser of the empirical distribution (paper eqs. 2-3), written out: softmax over explicit distances."""
    flat = train.flatten(1).double()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d2 = ((x.flatten(1).double().unsqueeze(1) - flat.unsqueeze(0)) ** 2).sum(-1)
        weights = torch.softmax(-d2 / (2 * sigma.double().unsqueeze(1) ** 2), dim=1)
        return (weights @ flat).to(x.dtype).reshape(x.shape)

    return denoise


# ------------------------------------------------------------------------------------------------ ratio test


def shard_items(num_images: int, num_noises: int, rank: int, world_size: int) -> torch.Tensor:
    """The item ids a rank computes: its contiguous slice (calmwild.evaluation.shard_bounds)."""
    return torch.arange(*shard_bounds(num_images * num_noises, rank, world_size))


def test_item_noise_depends_only_on_seed_image_and_noise():
    a = item_noise(torch.tensor([7, 2, 5]), 3, (1, 2, 2), seed=11)
    b = item_noise(torch.tensor([5, 7]), 3, (1, 2, 2), seed=11)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], item_noise(torch.tensor([7]), 3, (1, 2, 2), seed=12)[0])
    assert not torch.equal(a[0], item_noise(torch.tensor([7]), 4, (1, 2, 2), seed=11)[0])  # other (i, j)
    many = item_noise(torch.arange(400), 2, (50,), seed=0)
    assert abs(float(many.mean())) < 5 / math.sqrt(many.numel()) and abs(float(many.var()) - 1) < 0.02


def test_shard_items_partition_all_items():
    shards = [shard_items(10, 3, rank, 4) for rank in range(4)]
    assert sorted(torch.cat(shards).tolist()) == list(range(30))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_items(10, 3, 4, 4)


# ------------------------------------------------------------------------------------------------ per-sigma MSE


def test_per_sigma_mse_of_linear_denoiser_matches_closed_form(gen):
    """x0 ~ N(0, s^2 I), D(x; sigma) = c(sigma) x: per pixel, D - x0 = (c - 1) x0 + c sigma n ~ N(0, v) with
    v = (c - 1)^2 s^2 + c^2 sigma^2, so E[mse] = v and each item's per-pixel mean has variance 2 v^2 / d."""
    s, m, shape = 0.5, 400, (3, 8, 8)
    d = math.prod(shape)
    images = s * torch.randn(m, *shape, generator=gen(5))
    sigmas = [0.05, 0.5, 2.0, 10.0]

    def coef(sigma):
        return 0.8 / (1.0 + sigma**2)

    curve = per_sigma_mse(lambda x, sig: coef(sig).view(-1, 1, 1, 1) * x, images, sigmas, seed=3, batch_size=64)
    for i, sigma in enumerate(sigmas):
        c = coef(sigma)
        v = (c - 1) ** 2 * s**2 + c**2 * sigma**2
        sd = math.sqrt(2 * v**2 / (d * m))
        assert abs(float(curve.mse[i]) - v) < 5 * sd, (sigma, float(curve.mse[i]), v)
        assert float(curve.stderr[i]) == pytest.approx(sd, rel=0.25)
    assert curve.num_items == m
    assert set(curve.to_dict()) == {"sigmas", "mse_per_pixel", "mse_per_pixel_stderr", "num_items"}


def test_per_sigma_mse_of_optimal_linear_denoiser_within_reported_stderr(gen):
    """The posterior mean for x0 ~ N(0, s^2 I) is D(x; sigma) = c x, c = s^2 / (s^2 + sigma^2); its error per pixel
    is E||D - x0||^2 / d = s^2 sigma^2 / (s^2 + sigma^2). The reported stderr must cover the deviation."""
    s, shape = 0.7, (1, 6, 6)
    images = s * torch.randn(150, *shape, generator=gen(11))
    sigmas = torch.tensor([0.02, 0.3, 1.0, 20.0])
    curve = per_sigma_mse(lambda x, sig: (s**2 / (s**2 + sig**2)).view(-1, 1, 1, 1) * x, images, sigmas,
                          num_noises=3, seed=4, batch_size=100)
    expected = s**2 * sigmas.double() ** 2 / (s**2 + sigmas.double() ** 2)
    assert curve.num_items == 450 and (curve.stderr > 0).all()
    assert ((curve.mse - expected).abs() < 4 * curve.stderr).all(), (curve.mse, expected, curve.stderr)


def test_per_sigma_errors_independent_of_batch_size_and_sharding(gen):
    images = torch.randn(23, 1, 4, 4, generator=gen(6))
    sigmas = [0.1, 1.0]

    def denoise(x, sig):
        return torch.tanh(x) / (1 + sig.view(-1, 1, 1, 1))

    full = per_sigma_errors(denoise, images, sigmas, num_noises=2, seed=9, batch_size=64)
    assert full.shape == (2, 46) and full.dtype == torch.float64
    assert torch.equal(full, per_sigma_errors(denoise, images, sigmas, num_noises=2, seed=9, batch_size=5))
    shards = [shard_items(23, 2, rank, 3) for rank in range(3)]
    parts = [per_sigma_errors(denoise, images, sigmas, 2, 9, 4, items=ids) for ids in shards]
    gathered, items = torch.cat(parts, dim=1), torch.cat(shards)
    assert torch.equal(gathered, full[:, items])
    joined = summarize_errors(sigmas, gathered, items, num_noises=2)
    direct = per_sigma_mse(denoise, images, sigmas, num_noises=2, seed=9)
    torch.testing.assert_close(joined.mse, direct.mse)
    torch.testing.assert_close(joined.stderr, direct.stderr)
    assert not torch.equal(full, per_sigma_errors(denoise, images, sigmas, num_noises=2, seed=10))


def test_per_sigma_errors_bad_inputs():
    images = torch.randn(4, 1, 2, 2)
    with pytest.raises(ValueError, match="sigmas"):
        per_sigma_errors(lambda x, s: x, images, [0.5, 0.0])
    with pytest.raises(ValueError, match="items"):
        per_sigma_errors(lambda x, s: x, images, [0.5], items=[0, 4])
    with pytest.raises(ValueError, match="denoiser returned"):
        per_sigma_errors(lambda x, s: x[:, :, :1], images, [0.5])
    with pytest.raises(ValueError, match="num_noises"):
        per_sigma_errors(lambda x, s: x, images, [0.5], num_noises=0)


# ---------------------------------------------------------------------------------------------- per-sigma memorization


def test_empirical_denoiser_memorizes_at_small_sigma_only(gen):
    g = gen(7)
    train = torch.randn(40, 1, 6, 6, generator=g)
    heldout = torch.randn(30, 1, 6, 6, generator=g)
    sigmas = [0.01, 50.0]
    result = per_sigma_memorization(empirical_denoiser(train), heldout, train, sigmas, num_noises=2, seed=1)
    assert float(result.rate[0]) >= 0.95 and float(result.rate[1]) <= 0.05
    assert result.num_items == 60 and result.tests.memorized.shape == (2, 60)
    # WHICH training image: at sigma = 0.01 the output is the held-out image's nearest training image
    nearest = brute_ratio(heldout, train)[2]
    assert (result.tests.nearest_index[0] == nearest[result.items // 2]).float().mean() >= 0.95
    assert set(result.to_dict()) == {"sigmas", "rate", "stderr", "num_items", "threshold"}


def test_per_sigma_memorization_independent_of_batch_size_and_sharding(gen):
    g = gen(8)
    train = torch.randn(25, 1, 4, 4, generator=g)
    heldout = torch.randn(17, 1, 4, 4, generator=g)
    denoise = empirical_denoiser(train)
    sigmas = [0.05, 0.4, 1.5]
    full = per_sigma_memorization(denoise, heldout, train, sigmas, seed=2, batch_size=50)
    small = per_sigma_memorization(denoise, heldout, train, sigmas, seed=2, batch_size=3)
    assert torch.equal(full.tests.memorized, small.tests.memorized)
    assert torch.equal(full.tests.nearest_index, small.tests.nearest_index)
    torch.testing.assert_close(full.tests.ratio, small.tests.ratio)
    shards = [shard_items(17, 1, rank, 2) for rank in range(2)]
    parts = [per_sigma_errors_and_ratio_tests(denoise, heldout, train, sigmas, seed=2, batch_size=4, items=s)[1]
             for s in shards]
    gathered = type(parts[0])(*(torch.cat(fields, dim=1) for fields in zip(*parts)))
    joined = summarize_ratio_tests(sigmas, gathered, torch.cat(shards), num_noises=1, threshold=1 / 3)
    torch.testing.assert_close(joined.rate, full.rate)
    torch.testing.assert_close(joined.stderr, full.stderr)
    rate = full.tests.memorized.double().mean(dim=1)
    torch.testing.assert_close(full.stderr, (rate * (1 - rate) / 17).sqrt())  # binomial with one noise per image


def test_one_held_out_pass_scores_both_metrics(gen, count_rows):
    g = gen(9)
    train = torch.randn(21, 1, 4, 4, generator=g)
    heldout = torch.randn(9, 1, 4, 4, generator=g)
    sigmas, items = [0.05, 0.6, 3.0], torch.tensor([1, 2, 3, 7, 10, 17])  # 2 noises per image
    denoise = count_rows(empirical_denoiser(train))
    errors, tests = per_sigma_errors_and_ratio_tests(denoise, heldout, train, sigmas, 2, 4, 4, items=items)
    assert denoise.rows == len(sigmas) * len(items)  # each (item, sigma) denoised once for both metrics
    assert torch.equal(errors, per_sigma_errors(denoise, heldout, sigmas, 2, 4, 4, items=items))
    noise = item_noise(items, 2, (1, 4, 4), seed=4)
    for s, sigma in enumerate(sigmas):  # written out: denoise, then distances to every training image in float64
        x0 = heldout[items // 2]
        z = denoise(x0 + sigma * noise, torch.full((len(items),), sigma))
        d1, d2, nearest = brute_ratio(z, train)
        assert torch.equal(tests.nearest_index[s], nearest)
        torch.testing.assert_close(tests.ratio[s].double(), d1 / d2, rtol=1e-5, atol=1e-6)
        assert torch.equal(tests.memorized[s], d1 / d2 < 1 / 3)
        torch.testing.assert_close(errors[s], (z.double() - x0.double()).square().flatten(1).mean(dim=1))


def test_per_sigma_memorization_checks_shapes_and_threshold():
    train, heldout = torch.randn(5, 1, 2, 2), torch.randn(3, 1, 2, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        per_sigma_memorization(lambda x, s: x, heldout, train, [1.0])
    with pytest.raises(ValueError, match="threshold"):
        per_sigma_memorization(lambda x, s: x, train, train, [1.0], threshold=1.0)
