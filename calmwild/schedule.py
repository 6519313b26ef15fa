"""Noise levels: EDM's rho schedule, the DDPM linear-beta schedule, and timestep <-> sigma.

All functions return float64 tensors; callers cast to the dtype they compute in.
"""

from __future__ import annotations

import torch


def edm_sigma_steps(
    num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM's sampling schedule (Karras et al. 2022, eq. 5; paper appendix E.1).

    sigma_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1,
    decreasing from sigma_max to sigma_min. The terminal sigma = 0 is NOT included: samplers append it.
    With the defaults the rounded values are 80.00, 57.59, 40.79, ..., 0.01, 0.00 (the paper's App. E.7 table).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i / (num_steps - 1) * (lo - hi)) ** rho


def ddpm_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 1..T with beta linear from beta_start to beta_end (Ho et al. 2020).

    Entry ``t - 1`` holds abar_t.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_sigmas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The EDM-equivalent noise level of each DDPM timestep: sigma_t = sqrt((1 - abar_t) / abar_t)
    (Ho et al. 2020's linear betas; paper Section 5).

    A DDPM state x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps rescaled by 1/sqrt(abar_t) is x0 + sigma_t eps.
    Entry ``t - 1`` holds sigma_t; strictly increasing in t.
    """
    abar = ddpm_alphas_cumprod(T, beta_start, beta_end)
    return torch.sqrt((1.0 - abar) / abar)


def timestep_to_sigma(
    t: torch.Tensor | float, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """sigma of DDPM timestep(s) t in [1, T]; a fractional t interpolates linearly in log sigma."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if torch.any(t < 1) or torch.any(t > T):
        raise ValueError(f"timesteps must lie in [1, {T}], got {t.tolist()}")
    log_sigmas = ddpm_sigmas(T, beta_start, beta_end).log()
    pos = t - 1.0
    lo = pos.floor().long().clamp(max=T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    frac = pos - lo.to(torch.float64)
    return torch.exp(log_sigmas[lo] * (1 - frac) + log_sigmas[hi] * frac)


def sigma_to_timestep(
    sigma: torch.Tensor | float, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """The (fractional) DDPM timestep whose sigma_t equals ``sigma``: the inverse of :func:`timestep_to_sigma`.

    Values below sigma_1 map to 1 and above sigma_T to T (clamped), so a sigma band can always be reported in timesteps.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if torch.any(sigma < 0):
        raise ValueError(f"sigma must be non-negative, got {sigma.tolist()}")
    log_sigmas = ddpm_sigmas(T, beta_start, beta_end).log()
    x = sigma.clamp(min=float(log_sigmas[0].exp()), max=float(log_sigmas[-1].exp())).log()
    hi = torch.searchsorted(log_sigmas, x.reshape(-1)).clamp(1, T - 1).reshape(x.shape)
    lo = hi - 1
    frac = (x - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return lo.to(torch.float64) + frac + 1.0
