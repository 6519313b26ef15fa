import math

import pytest
import torch

from calmwild.schedule import (
    ddpm_alphas_cumprod,
    ddpm_sigmas,
    edm_sigma_steps,
    sigma_to_timestep,
    timestep_to_sigma,
)

# The paper's 18-step schedule, rounded to two decimals (appendix E.7).
PAPER_18 = [80.00, 57.59, 40.79, 28.37, 19.35, 12.91, 8.40, 5.32, 3.26, 1.92, 1.09, 0.59, 0.30, 0.14, 0.06, 0.02,
            0.01, 0.00]


def test_edm_schedule_matches_paper_table():
    steps = edm_sigma_steps(18)
    assert steps.dtype == torch.float64
    assert [round(float(s), 2) for s in steps] == PAPER_18
    assert float(steps[0]) == pytest.approx(80.0) and float(steps[-1]) == pytest.approx(0.002)


def test_edm_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        edm_sigma_steps(0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigma_steps(10, sigma_min=5.0, sigma_max=1.0)


def test_ddpm_alphas_cumprod_matches_explicit_product():
    abar = ddpm_alphas_cumprod(1000)
    prod, beta = 1.0, None
    for t in range(1, 1001):
        beta = 1e-4 + (0.02 - 1e-4) * (t - 1) / 999
        prod *= 1.0 - beta
        if t in (1, 100, 350, 1000):
            assert float(abar[t - 1]) == pytest.approx(prod, rel=1e-12)


def test_ddpm_sigmas_values_from_paper_notes():
    sig = ddpm_sigmas(1000)
    assert torch.all(sig[1:] > sig[:-1])
    assert float(sig[99]) == pytest.approx(0.34, abs=0.02)  # t = 100
    assert float(sig[349]) == pytest.approx(1.6, abs=0.1)  # t = 350
    assert float(sig[0]) == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-9)


def test_timestep_sigma_round_trip_and_clamping():
    t = torch.tensor([1.0, 17.0, 100.0, 250.5, 999.0, 1000.0], dtype=torch.float64)
    back = sigma_to_timestep(timestep_to_sigma(t))
    assert torch.allclose(back, t, atol=1e-9)
    assert float(timestep_to_sigma(100)) == pytest.approx(float(ddpm_sigmas()[99]))
    assert float(sigma_to_timestep(1e-9)) == 1.0 and float(sigma_to_timestep(1e9)) == 1000.0
    with pytest.raises(ValueError, match="timesteps"):
        timestep_to_sigma(0)
    with pytest.raises(ValueError, match="non-negative"):
        sigma_to_timestep(-1.0)
