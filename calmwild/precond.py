"""EDM preconditioning (Karras et al. 2022, Table 1) around any backbone, and EDM's loss weight.

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)) with
c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
c_noise = ln(sigma) / 4, where sd = sigma_data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class EDMCoefficients(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_coefficients(sigma: torch.Tensor | float, sigma_data: float = 0.5) -> EDMCoefficients:
    """The four EDM preconditioning coefficients for each sigma (same shape as ``sigma``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype()) if not torch.is_tensor(sigma) else sigma
    var = sigma**2 + sigma_data**2
    return EDMCoefficients(
        c_skip=sigma_data**2 / var,
        c_out=sigma * sigma_data / var.sqrt(),
        c_in=1.0 / var.sqrt(),
        c_noise=sigma.log() / 4.0,
    )


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, eq. 8), which makes the effective
    training target of F unit-variance at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """A denoiser D(x, sigma) in data space built from a raw backbone F(x_in, c_noise, class_labels).

    The backbone must expose ``config`` (its constructor keyword arguments) so that a checkpoint can rebuild it.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Coefficients in float32 at least, whatever the input dtype (bf16 inputs would round c_noise badly).
        coef_dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, dtype=coef_dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and bool((sigma <= 0).any()):
            raise ValueError(f"sigma must be positive, got min {float(sigma.min())}")
        c = edm_coefficients(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        f = self.backbone((c.c_in * x).to(x.dtype), c.c_noise.reshape(-1), class_labels)
        return (c.c_skip * x + c.c_out * f).to(x.dtype)
