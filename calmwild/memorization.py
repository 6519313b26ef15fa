"""Memorization metrics (paper Section 3; PAPER_NOTES 2): the ratio test, per-sigma MSE, per-sigma memorization
and trajectory memorization. Pure functions of a denoiser and tensors.

Work splitting (DDP): the per-item functions (:func:`per_sigma_errors`, :func:`per_sigma_ratio_tests`) take an
explicit ``items`` index range, so each rank computes its shard; the caller gathers the per-item values and reduces
them with :func:`mean_and_stderr` / :func:`rate_and_stderr`. Noise for item (image i, noise j) depends only on
(seed, i, j), never on batching or sharding.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from calmwild.neighbors import knn


class RatioTestResult(NamedTuple):
    """Per query: memorized (d1/d2 < threshold), the ratio, nearest training index, d1 and d2."""

    memorized: torch.Tensor
    ratio: torch.Tensor
    nearest_index: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"ratio-test threshold must lie in (0, 1), got {threshold}")
    return float(threshold)


def ratio_test(queries: torch.Tensor, train: torch.Tensor, threshold: float = 1 / 3) -> RatioTestResult:
    """Yoon et al. (2023) as used by the paper: z is memorized when d1(z) / d2(z) < threshold, with d_k the
    Euclidean distance to the k-th nearest training image. When d1 = d2 = 0 (z equals a training image that appears
    twice in the training set) the ratio is defined as 0: the sample is a copy of training data."""
    threshold = check_threshold(threshold)
    if train.shape[0] < 2:
        raise ValueError(f"the ratio test needs at least 2 training images, got {train.shape[0]}")
    dist, index = knn(queries, train, k=2)
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-30), torch.zeros_like(d1))
    return RatioTestResult(ratio < threshold, ratio, index[:, 0], d1, d2)


def rate_and_stderr(flags: torch.Tensor) -> tuple[float, float]:
    """Fraction of true flags and its binomial standard error sqrt(p (1 - p) / n)."""
    n = flags.numel()
    if n == 0:
        raise ValueError("no items to average")
    p = float(flags.float().mean())
    return p, (p * (1 - p) / n) ** 0.5


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n))."""
    n = values.numel()
    if n == 0:
        raise ValueError("no items to average")
    mean = float(values.double().mean())
    se = float(values.double().std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    return mean, se


def item_noise(image_index: torch.Tensor, noise_index: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Gaussian noise for items (image i, noise j), one generator per item seeded from (seed, i, j)."""
    rows = []
    for i in image_index.tolist():
        g = torch.Generator().manual_seed((seed * 1_000_003 + i * 1009 + noise_index) % (2**63 - 1))
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def _denoise_items(
    denoiser, images: torch.Tensor, sigma: float, noise_index: int, items: torch.Tensor, seed: int, batch_size: int,
    device: torch.device | str,
):
    """Yields (item indices, clean images, denoised images) for a batch of items at one sigma."""
    for start in range(0, items.numel(), batch_size):
        idx = items[start : start + batch_size]
        x0 = images[idx].to(device)
        noise = item_noise(idx, noise_index, images.shape[1:], seed).to(device)
        sig = torch.full((idx.numel(),), float(sigma), device=device)
        yield idx, x0, denoiser(x0 + sigma * noise, sig)


def _items(n: int, items: torch.Tensor | range | None) -> torch.Tensor:
    return torch.arange(n) if items is None else torch.as_tensor(list(items) if isinstance(items, range) else items)


def per_sigma_errors(
    denoiser, images: torch.Tensor, sigmas: Sequence[float], num_noises: int = 1, seed: int = 0,
    batch_size: int = 256, items: torch.Tensor | range | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-item squared errors ||D(x0 + sigma n; sigma) - x0||^2 / d (mean over pixels) as [len(sigmas), num_noises,
    len(items)]: the integrand of eq. 5 (per-sigma MSE), for a shard of images."""
    items_t = _items(images.shape[0], items)
    out = torch.empty(len(sigmas), num_noises, items_t.numel(), dtype=torch.float64)
    for s, sigma in enumerate(sigmas):
        for j in range(num_noises):
            pos = 0
            for idx, x0, den in _denoise_items(denoiser, images, float(sigma), j, items_t, seed, batch_size, device):
                out[s, j, pos : pos + idx.numel()] = ((den - x0) ** 2).flatten(1).mean(1).double().cpu()
                pos += idx.numel()
    return out


class PerSigmaCurve(NamedTuple):
    """A per-sigma estimate with its standard error, and how many (image, noise) items it averages."""

    sigmas: list[float]
    value: list[float]
    stderr: list[float]
    num_items: int


def per_sigma_mse(
    denoiser, images: torch.Tensor, sigmas: Sequence[float], num_noises: int = 1, seed: int = 0,
    batch_size: int = 256, device: torch.device | str = "cpu",
) -> PerSigmaCurve:
    """MSE_sigma(D, p) = E_x0 E_n ||D(x0 + sigma n; sigma) - x0||^2 (paper eq. 5), reported per pixel, with the
    standard error over (image, noise) items. The same noises are used for every denoiser given the same seed,
    so differences between denoisers are paired."""
    errors = per_sigma_errors(denoiser, images, sigmas, num_noises, seed, batch_size, device=device)
    stats = [mean_and_stderr(errors[s].flatten()) for s in range(len(sigmas))]
    return PerSigmaCurve([float(s) for s in sigmas], [m for m, _ in stats], [e for _, e in stats],
                         errors.shape[1] * errors.shape[2])


def per_sigma_ratio_tests(
    denoiser, heldout: torch.Tensor, train: torch.Tensor, sigmas: Sequence[float], num_noises: int = 1,
    seed: int = 0, batch_size: int = 256, threshold: float = 1 / 3, items: torch.Tensor | range | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """For held-out items: one-step denoise x_test + sigma n, then the ratio test against the training set.
    Returns (memorized bool, nearest training index), each [len(sigmas), num_noises, len(items)]."""
    threshold = check_threshold(threshold)
    items_t = _items(heldout.shape[0], items)
    flags = torch.zeros(len(sigmas), num_noises, items_t.numel(), dtype=torch.bool)
    nearest = torch.zeros(len(sigmas), num_noises, items_t.numel(), dtype=torch.long)
    for s, sigma in enumerate(sigmas):
        for j in range(num_noises):
            pos = 0
            for idx, _, den in _denoise_items(denoiser, heldout, float(sigma), j, items_t, seed, batch_size, device):
                result = ratio_test(den.cpu(), train, threshold)
                flags[s, j, pos : pos + idx.numel()] = result.memorized
                nearest[s, j, pos : pos + idx.numel()] = result.nearest_index
                pos += idx.numel()
    return flags, nearest


def per_sigma_memorization(
    denoiser, heldout: torch.Tensor, train: torch.Tensor, sigmas: Sequence[float], num_noises: int = 1,
    seed: int = 0, batch_size: int = 256, threshold: float = 1 / 3, device: torch.device | str = "cpu",
) -> tuple[PerSigmaCurve, torch.Tensor]:
    """Per-noise-level memorization rate (paper Section 3): the fraction of (held-out image, noise) pairs whose
    one-step denoised output is memorized, with binomial standard errors; also the nearest training indices
    [len(sigmas), num_noises, num_heldout], which show WHICH training images are reproduced."""
    flags, nearest = per_sigma_ratio_tests(denoiser, heldout, train, sigmas, num_noises, seed, batch_size,
                                           threshold, device=device)
    stats = [rate_and_stderr(flags[s]) for s in range(len(sigmas))]
    curve = PerSigmaCurve([float(s) for s in sigmas], [r for r, _ in stats], [e for _, e in stats],
                          flags.shape[1] * flags.shape[2])
    return curve, nearest


class TrajectoryMemorization(NamedTuple):
    rate: float
    stderr: float
    num_samples: int
    result: RatioTestResult


def trajectory_memorization(samples: torch.Tensor, train: torch.Tensor, threshold: float = 1 / 3
                            ) -> TrajectoryMemorization:
    """Trajectory-level memorization rate (paper Section 3): the fraction of generated samples that pass the
    ratio test against the training set, with its binomial standard error."""
    result = ratio_test(samples, train, threshold)
    rate, se = rate_and_stderr(result.memorized)
    return TrajectoryMemorization(rate, se, samples.shape[0], result)
