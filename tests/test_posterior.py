"""The streaming posterior summary against a dense float64 softmax computed from explicit differences."""

import pytest
import torch

from calmwild.posterior import posterior_summary


def dense_posterior(x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [B, N] and log normalisers [B] of softmax_i(-||x - y_i||^2 / (2 sigma^2)) in float64, written out."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    d2 = ((x.unsqueeze(1) - y.unsqueeze(0)) ** 2).sum(dim=2)
    logits = -d2 / (2 * sigma.double().reshape(-1, 1) ** 2)
    return torch.softmax(logits, dim=1), torch.logsumexp(logits, dim=1)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_summary_matches_the_dense_softmax_with_one_sigma_per_query(chunk_size):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.logspace(-1, 1, 12, dtype=torch.float64)
    x = y[:12] + sigma.reshape(-1, 1, 1, 1) * torch.randn(12, 2, 3, 3, generator=g, dtype=torch.float64)
    self_index = torch.arange(12)
    out = posterior_summary(x, y, sigma, self_index=self_index, chunk_size=chunk_size)
    weights, log_norm = dense_posterior(x, y, sigma)
    torch.testing.assert_close(out.mean, (weights @ y.flatten(1)).reshape(12, -1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.max_weight, weights.max(dim=1).values, rtol=1e-10, atol=0)
    assert torch.equal(out.argmax, weights.argmax(dim=1))
    torch.testing.assert_close(out.self_weight, weights[torch.arange(12), self_index], rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(out.log_norm, log_norm, rtol=1e-12, atol=1e-12)


def test_float32_summary_agrees_with_float64_to_float32_accuracy():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(200, 1, 8, 8, generator=g) * 2 - 1
    x = y[:20] + 0.3 * torch.randn(20, 1, 8, 8, generator=g)
    out = posterior_summary(x, y, 0.3, self_index=torch.arange(20), want_mean=False, chunk_size=64)
    assert out.mean is None and out.max_weight.dtype == torch.float32
    weights, _ = dense_posterior(x, y, torch.full((20,), 0.3))
    torch.testing.assert_close(out.max_weight.double(), weights.max(dim=1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.self_weight.double(), weights[torch.arange(20), torch.arange(20)],
                               rtol=1e-4, atol=1e-6)


def test_tiny_sigma_puts_all_weight_on_the_nearest_image_without_nan():
    """At sigma = 1e-4 every logit but the nearest underflows: the weight is exactly 1 on the nearest image."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(30, 16, generator=g)
    x = y[[3, 17]] + 1e-3 * torch.randn(2, 16, generator=g)
    out = posterior_summary(x, y, 1e-4, chunk_size=8)
    assert out.argmax.tolist() == [3, 17]
    assert torch.equal(out.max_weight, torch.ones(2)) and torch.isfinite(out.log_norm).all()
    torch.testing.assert_close(out.mean, y[[3, 17]])


def test_bad_inputs_are_refused():
    y = torch.randn(4, 3)
    with pytest.raises(ValueError, match="sigma must be positive"):
        posterior_summary(torch.randn(2, 3), y, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="training set is empty"):
        posterior_summary(torch.randn(2, 3), y[:0], 1.0)
