"""EDM preconditioning checked against its defining properties (Karras et al. 2022, appendix B.6), not against the
coefficient formulas themselves."""

import math

import pytest
import torch
from torch import nn

from calmwild.precond import EDMPrecond, edm_coefficients, edm_loss_weight
from calmwild.unet import UNet

SIGMA_DATA = 0.5
SIGMAS = [0.002, 0.05, 0.3, 0.5, 1.0, 5.0, 80.0]
N_MC = 400_000
Z = 6.0  # tolerance in standard errors: a false failure has probability ~1e-9 per check


def _data_and_noise(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 with variance sigma_data^2 but deliberately non-Gaussian (scaled Rademacher), and Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    x0 = SIGMA_DATA * (2.0 * torch.randint(0, 2, (N_MC,), generator=gen, dtype=torch.float64) - 1.0)
    noise = torch.randn(N_MC, generator=gen, dtype=torch.float64)
    return x0, noise


def _assert_unit_variance(samples: torch.Tensor) -> None:
    """Var(samples) == 1 (mean known to be 0) within Z standard errors of the variance estimator,
    se = sqrt((E s^4 - (E s^2)^2) / N), with the fourth moment estimated from the same samples."""
    m2 = samples.square().mean()
    m4 = samples.pow(4).mean()
    se = math.sqrt(float(m4 - m2**2) / samples.numel())
    assert abs(float(m2) - 1.0) < Z * se, f"variance {float(m2):.5f}, standard error {se:.2e}"


@pytest.mark.parametrize("sigma", SIGMAS)
def test_network_input_has_unit_variance(sigma):
    x0, noise = _data_and_noise(seed=1)
    c = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), SIGMA_DATA)
    _assert_unit_variance(c.c_in * (x0 + sigma * noise))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_effective_training_target_has_unit_variance(sigma):
    x0, noise = _data_and_noise(seed=2)
    c = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), SIGMA_DATA)
    target = (x0 - c.c_skip * (x0 + sigma * noise)) / c.c_out
    _assert_unit_variance(target)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_c_skip_is_the_least_squares_regression_of_clean_on_noisy(sigma):
    """c_skip minimises E[(x0 - c y)^2] over c, y = x0 + sigma n (it minimises c_out); estimate that minimiser by
    regression through the origin and compare within its standard error."""
    x0, noise = _data_and_noise(seed=3)
    y = x0 + sigma * noise
    beta = float((x0 * y).sum() / y.square().sum())
    resid = x0 - beta * y
    se = math.sqrt(float(resid.square().mean() / y.square().sum()))
    c_skip = float(edm_coefficients(torch.tensor(sigma, dtype=torch.float64), SIGMA_DATA).c_skip)
    assert abs(c_skip - beta) < Z * se + 1e-12


def test_loss_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-3, 2, 41, dtype=torch.float64)
    for sd in (0.25, 0.5, 1.0):
        c = edm_coefficients(sigma, sd)
        torch.testing.assert_close(edm_loss_weight(sigma, sd) * c.c_out**2, torch.ones_like(sigma), rtol=1e-12,
                                   atol=0)


def test_c_noise_is_quarter_log_sigma():
    values = [0.002, 0.1, 1.0, math.e, 80.0]
    c = edm_coefficients(torch.tensor(values, dtype=torch.float64), SIGMA_DATA)
    assert c.c_noise.tolist() == pytest.approx([math.log(v) / 4.0 for v in values], rel=1e-12, abs=1e-15)


def test_limits_identity_at_small_sigma_and_data_scale_at_large_sigma():
    c = edm_coefficients(torch.tensor([1e-6, 1e6], dtype=torch.float64), SIGMA_DATA)
    assert c.c_skip[0].item() == pytest.approx(1.0, abs=1e-10) and c.c_out[0].item() < 1e-5
    assert c.c_skip[1].item() < 1e-10 and c.c_out[1].item() == pytest.approx(SIGMA_DATA, rel=1e-10)


class _Zero(nn.Module):
    config: dict = {}

    def forward(self, x, noise_labels, class_labels=None):
        return torch.zeros_like(x)


class _Recorder(nn.Module):
    """Returns zeros and keeps what the wrapper fed it."""

    config: dict = {}

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.detach().clone(), noise_labels.detach().clone(), class_labels)
        return torch.zeros_like(x)


def test_zero_backbone_gives_the_linear_least_squares_denoiser():
    """With F = 0, D(y) = c_skip y must be the best linear estimate of x0 from y: its Monte Carlo residual is
    orthogonal to y, E[(x0 - D(y)) y] = 0."""
    x0, noise = _data_and_noise(seed=4)
    precond = EDMPrecond(_Zero(), SIGMA_DATA)
    for sigma in (0.05, 0.5, 5.0):
        y = (x0 + sigma * noise).reshape(-1, 1, 1, 1)
        d = precond(y, torch.tensor(sigma, dtype=torch.float64))
        prod = (x0.reshape(-1, 1, 1, 1) - d) * y
        se = float(prod.std()) / math.sqrt(prod.numel())
        assert abs(float(prod.mean())) < Z * se


def test_zero_initialised_unet_gives_c_skip_times_x():
    torch.manual_seed(0)
    net = EDMPrecond(UNet(img_resolution=8, in_channels=2, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                          attn_resolutions=(4,), dropout=0.0), SIGMA_DATA).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, generator=gen)
    sigma = torch.tensor([0.1, 0.5, 2.0])
    expected = x * (SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net(x, sigma), expected)


def test_wrapper_feeds_unit_variance_input_and_log_sigma_label():
    rec = _Recorder()
    precond = EDMPrecond(rec, SIGMA_DATA)
    x0, noise = _data_and_noise(seed=5)
    sigma = 3.0
    precond((x0 + sigma * noise).reshape(-1, 1, 1, 1), sigma)
    x_in, labels, _ = rec.seen
    _assert_unit_variance(x_in.reshape(-1))
    assert labels.shape == (N_MC,)
    assert torch.allclose(labels, torch.full_like(labels, math.log(sigma) / 4.0))


@pytest.mark.parametrize("sigma", [0.7, torch.tensor(0.7), torch.full((4,), 0.7)], ids=["float", "0d", "vector"])
def test_precond_with_unet_preserves_shape_and_accepts_scalar_sigma(sigma):
    torch.manual_seed(0)
    unet = UNet(img_resolution=8, in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                attn_resolutions=(4,), dropout=0.0, num_classes=2)
    with torch.no_grad():
        for p in unet.parameters():  # make the backbone contribute, so the check is not just c_skip * x
            p.add_(0.05 * torch.randn_like(p))
    net = EDMPrecond(unet, SIGMA_DATA).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    labels = torch.tensor([0, 1, 1, 0])
    out = net(x, sigma, labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, net(x, torch.full((4,), 0.7), labels))


def test_precond_rejects_bad_sigma_data():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(_Zero(), 0.0)
