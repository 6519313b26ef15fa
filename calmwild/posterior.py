"""Streaming posterior of the empirical data distribution under Gaussian noise (paper eqs. 2-3).

For a noisy query x at level sigma and training points y_1..y_N,
    w_i(x, sigma) = softmax_i( -||x - y_i||^2 / (2 sigma^2) ),    D_hat(x; sigma) = sum_i w_i y_i.
The softmax is taken as a streaming log-sum-exp over chunks of the training set, so memory is
O(batch * chunk) whatever N is, and each chunk costs one matrix product on the training set's device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from calmwild.neighbors import flatten, squared_distances


def log_probability_floor(dtype: torch.dtype, count: int) -> float:
    """The log-weight, relative to the largest, at which the terms of a softmax over ``count`` items are floored:
    log(eps / count) - 10, eps the dtype's machine epsilon. All floored terms together then weigh at most e^-10 eps
    (far below the dtype's resolution), while no probability comes near the float32 denormals: an exp near underflow
    is ~10x slower on CPUs, and so is every product a denormal enters (the posterior mean's matrix product)."""
    return math.log(torch.finfo(dtype).eps / max(int(count), 1)) - 10.0


class PosteriorSummary(NamedTuple):
    """Per-query results of :func:`posterior_summary` (float32 unless the inputs were float64).

    mean:        D_hat(x; sigma), shape [B, d] (None unless requested)
    max_weight:  max_i w_i, shape [B]
    argmax:      index of the largest weight, shape [B]
    self_weight: w_{self_index}, shape [B] (None unless ``self_index`` was given)
    log_norm:    log sum_i exp(-||x - y_i||^2 / (2 sigma^2)), shape [B]
    """

    mean: torch.Tensor | None
    max_weight: torch.Tensor
    argmax: torch.Tensor
    self_weight: torch.Tensor | None
    log_norm: torch.Tensor


def posterior_summary(
    x: torch.Tensor,
    train: torch.Tensor,
    sigma: torch.Tensor | float,
    self_index: torch.Tensor | None = None,
    want_mean: bool = True,
    chunk_size: int = 4096,
    train_sq_norms: torch.Tensor | None = None,
) -> PosteriorSummary:
    """Posterior weights' summary and (optionally) the posterior mean for queries ``x`` [B, ...].

    ``train`` is [N, ...] with the same per-item shape; ``sigma`` is a scalar or a [B] tensor (one level per query).
    ``self_index`` [B] asks for the weight of a given training point per query (the point that was noised).
    The computation runs on ``train``'s device in ``train``'s dtype; ``x`` is moved there.
    """
    ytr = flatten(train)
    xq = flatten(x).to(device=ytr.device, dtype=ytr.dtype)
    b, n = xq.shape[0], ytr.shape[0]
    if n == 0:
        raise ValueError("the training set is empty")
    sig = torch.as_tensor(sigma, device=ytr.device, dtype=ytr.dtype)
    sig = sig.expand(b) if sig.ndim == 0 else sig.reshape(b)
    if torch.any(sig <= 0):
        raise ValueError(f"sigma must be positive, got min {float(sig.min())}")
    neg_inv_two_var = (-0.5 / sig**2).unsqueeze(1)
    floor = log_probability_floor(ytr.dtype, n)
    if train_sq_norms is None:
        train_sq_norms = (ytr * ytr).sum(dim=1)

    running_max = torch.full((b,), -torch.inf, device=ytr.device, dtype=ytr.dtype)
    running_sum = torch.zeros(b, device=ytr.device, dtype=ytr.dtype)
    argmax = torch.zeros(b, device=ytr.device, dtype=torch.long)
    acc = torch.zeros_like(xq) if want_mean else None
    self_logit = None
    if self_index is not None:
        self_index = self_index.to(ytr.device).reshape(b)
        self_logit = torch.empty(b, device=ytr.device, dtype=ytr.dtype)

    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = squared_distances(xq, ytr[start:stop], train_sq_norms[start:stop]).mul_(neg_inv_two_var)
        chunk_max, chunk_arg = logits.max(dim=1)
        new_max = torch.maximum(running_max, chunk_max)
        scale = torch.exp(running_max - new_max)
        if self_logit is not None:
            inside = (self_index >= start) & (self_index < stop)
            if inside.any():
                rows = inside.nonzero(as_tuple=True)[0]
                self_logit[rows] = logits[rows, self_index[rows] - start]
        # in place from here (logits become probabilities), negligible terms floored (log_probability_floor)
        probs = logits.sub_(new_max.unsqueeze(1)).clamp_min_(floor).exp_()
        running_sum = running_sum * scale + probs.sum(dim=1)
        if acc is not None:
            acc = acc * scale.unsqueeze(1) + probs @ ytr[start:stop]
        argmax = torch.where(chunk_max > running_max, chunk_arg + start, argmax)
        running_max = new_max

    log_norm = running_max + running_sum.log()
    return PosteriorSummary(
        mean=None if acc is None else acc / running_sum.unsqueeze(1),
        max_weight=1.0 / running_sum,
        argmax=argmax,
        self_weight=None if self_logit is None else torch.exp(self_logit - log_norm),
        log_norm=log_norm,
    )
