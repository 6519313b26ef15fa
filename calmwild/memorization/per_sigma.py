"""Per-noise-level metrics (paper Section 3): the denoising error MSE_sigma of eq. 5 on training and held-out images,
and per-noise-level memorization (the ratio test of one-step denoised held-out images, Fig. 2). Pure functions of
a denoiser ``D(x [B,C,H,W], sigma [B]) -> x0_hat`` and of tensors.

Items and work splitting (DDP). The metrics average over *items*: pairs (image i, noise j) with i < num_images and
j < num_noises, numbered ``item = i * num_noises + j``. The noise of an item depends only on (seed, i, j)
(:func:`item_noise`), never on the batch size or on which process computes it, and the same noise is used at every
sigma and for every denoiser, so curves and differences between denoisers are paired. A caller that splits the
work gives each rank a contiguous slice of item ids (:func:`calmwild.evaluation.shard_bounds`):

    items = torch.arange(*shard_bounds(num_images * num_noises, rank, world_size))
    errors = per_sigma_errors(D, images, sigmas, num_noises, items=items)    # [S, len(items)]
    # gather ``errors`` from all ranks in rank order, then on any rank:
    curve = summarize_errors(sigmas, all_errors, torch.arange(total), num_noises)

and likewise :func:`per_sigma_errors_and_ratio_tests` + :func:`summarize_ratio_tests` (one denoising pass of the
held-out items scored both ways: its errors are :func:`per_sigma_errors`' of the held-out images, bit for bit).
:func:`per_sigma_mse` and :func:`per_sigma_memorization` are exactly these two steps on one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from calmwild.checks import check_count, check_images, check_sigmas, check_threshold
from calmwild.memorization.ratio import RATIO_THRESHOLD, RatioTestResult, mean_and_stderr, ratio_test

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def item_ids(items: Sequence[int] | torch.Tensor | None, num_images: int, num_noises: int) -> torch.Tensor:
    """Item ids as a 1-D long CPU tensor, each in [0, num_images * num_noises); None means all items."""
    total = num_images * num_noises
    if items is None:
        return torch.arange(total)
    ids = torch.as_tensor(items if isinstance(items, torch.Tensor) else list(items)).detach().cpu().reshape(-1)
    if ids.numel() and (ids.is_floating_point() or int(ids.min()) < 0 or int(ids.max()) >= total):
        raise ValueError(f"items must be integer ids in [0, {total}) = [0, num_images * num_noises), got "
                         f"{ids[:10].tolist()}{' ...' if ids.numel() > 10 else ''}")
    return ids.long()


def item_noise(items: torch.Tensor, num_noises: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Standard Gaussian noise [len(items), *shape] (float32, CPU), one row per item.

    Item m = (image i = m // num_noises, noise j = m % num_noises) draws from its own generator, seeded with
    numpy's ``SeedSequence([seed, i, j])``, so a row depends only on (seed, i, j) and not on batching or sharding.
    """
    num_noises = check_count(num_noises, "num_noises")
    seed = check_count(seed, "seed", 0)
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(items), *shape))
    gen = torch.Generator()
    for row, item in enumerate(torch.as_tensor(items).reshape(-1).tolist()):
        state = np.random.SeedSequence([int(seed), item // num_noises, item % num_noises]).generate_state(2, np.uint64)
        gen.manual_seed(int(state[0]) & (2**63 - 1))
        out[row] = torch.randn(shape, generator=gen)
    return out


def _denoised(
    denoiser: DenoiserFn,
    images: torch.Tensor,
    sigmas: torch.Tensor,
    items: torch.Tensor,
    num_noises: int,
    seed: int,
    batch_size: int,
    device: torch.device | str | None,
) -> Iterator[tuple[int, slice, torch.Tensor, torch.Tensor]]:
    """Yields (sigma position, item slice, x0, D(x0 + sigma n; sigma)) over batches of items and all sigmas; the
    noise of a batch is drawn once and reused at every sigma. Runs under ``torch.no_grad`` on ``device``
    (default: the images' device)."""
    device = torch.device(device) if device is not None else images.device
    for start in range(0, items.numel(), batch_size):
        batch = items[start : start + batch_size]
        x0 = images[(batch // num_noises).to(images.device)].to(device)
        noise = item_noise(batch, num_noises, images.shape[1:], seed).to(device=device, dtype=x0.dtype)
        for s, sigma in enumerate(sigmas.tolist()):
            sig = torch.full((batch.numel(),), sigma, dtype=x0.dtype, device=device)
            with torch.no_grad():
                out = denoiser(x0 + sigma * noise, sig)
            if not isinstance(out, torch.Tensor) or out.shape != x0.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"the denoiser returned {got} for inputs of shape {tuple(x0.shape)}")
            yield s, slice(start, start + batch.numel()), x0, out


# ------------------------------------------------------------------------------------------------ per-sigma MSE
class PerSigmaMSE(NamedTuple):
    """Per-sigma denoising error (paper eq. 5) as a PER-PIXEL mean: mse = E ||D(x0 + sigma n; sigma) - x0||^2 / d,
    d = C*H*W (multiply by d for eq. 5's per-image sum). ``stderr`` over images (see :func:`mean_and_stderr`);
    float64 [S] tensors; ``num_items`` (image, noise) pairs per sigma."""

    sigmas: torch.Tensor
    mse: torch.Tensor
    stderr: torch.Tensor
    num_items: int

    def to_dict(self) -> dict[str, list[float] | int]:
        return {"sigmas": self.sigmas.tolist(), "mse_per_pixel": self.mse.tolist(),
                "mse_per_pixel_stderr": self.stderr.tolist(), "num_items": self.num_items}


def per_sigma_errors(
    denoiser: DenoiserFn,
    images: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    items: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-item squared error per pixel, ||D(x0 + sigma n; sigma) - x0||^2 / d, as a float64 CPU tensor
    [len(sigmas), len(items)] (the integrand of eq. 5). ``items`` (default: all num_images * num_noises) selects
    the (image, noise) pairs, see the module docstring."""
    images = check_images(images, "images")
    sig = check_sigmas(sigmas)
    num_noises, batch_size = check_count(num_noises, "num_noises"), check_count(batch_size, "batch_size")
    ids = item_ids(items, images.shape[0], num_noises)
    out = torch.empty(sig.numel(), ids.numel(), dtype=torch.float64)
    for s, cols, x0, den in _denoised(denoiser, images, sig, ids, num_noises, seed, batch_size, device):
        out[s, cols] = _squared_error_per_pixel(den, x0)
    return out


def _squared_error_per_pixel(denoised: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """||D - x0||^2 / d per image, in float64 on the CPU [B]."""
    return (denoised.double() - x0.double()).square().flatten(1).mean(dim=1).cpu()


def summarize_errors(
    sigmas: Sequence[float] | torch.Tensor, errors: torch.Tensor, items: torch.Tensor, num_noises: int
) -> PerSigmaMSE:
    """Reduce per-item errors [S, M] (from :func:`per_sigma_errors`, possibly gathered from several ranks) for
    item ids ``items`` [M] to the per-sigma mean and its standard error clustered by image (item // num_noises)."""
    sig = check_sigmas(sigmas)
    ids = torch.as_tensor(items).reshape(-1)
    if errors.ndim != 2 or errors.shape != (sig.numel(), ids.numel()):
        raise ValueError(f"errors must have shape [{sig.numel()}, {ids.numel()}] (sigmas, items), "
                         f"got {tuple(errors.shape)}")
    mse, stderr = mean_and_stderr(errors, ids // check_count(num_noises, "num_noises"))
    return PerSigmaMSE(sig, mse, stderr, ids.numel())


def per_sigma_mse(
    denoiser: DenoiserFn,
    images: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> PerSigmaMSE:
    """MSE_sigma(D, p) = E_x0 E_n ||D(x0 + sigma n; sigma) - x0||^2 (paper eq. 5), per pixel, over every image
    and ``num_noises`` seeded noises per image (the same noises for every denoiser given the same seed, so train/
    test or denoiser comparisons are paired). Equivalent to :func:`per_sigma_errors` + :func:`summarize_errors`."""
    images = check_images(images, "images")
    num_noises = check_count(num_noises, "num_noises")
    ids = item_ids(None, images.shape[0], num_noises)
    errors = per_sigma_errors(denoiser, images, sigmas, num_noises, seed, batch_size, ids, device)
    return summarize_errors(sigmas, errors, ids, num_noises)


class PerSigmaMemorization(NamedTuple):
    """Per-noise-level memorization: ``rate`` (fraction of items whose one-step denoised output is memorized) and
    its ``stderr`` (binomial for one noise per image, clustered by image otherwise), float64 [S]; ``items`` [M]
    and the per-item ``tests`` (a :class:`RatioTestResult` of [S, M] tensors; ``tests.nearest_index`` says WHICH
    training image each output reproduces)."""

    sigmas: torch.Tensor
    rate: torch.Tensor
    stderr: torch.Tensor
    num_items: int
    threshold: float
    items: torch.Tensor
    tests: RatioTestResult

    def to_dict(self) -> dict[str, list[float] | int | float]:
        return {"sigmas": self.sigmas.tolist(), "rate": self.rate.tolist(), "stderr": self.stderr.tolist(),
                "num_items": self.num_items, "threshold": self.threshold}


def per_sigma_errors_and_ratio_tests(
    denoiser: DenoiserFn,
    heldout: torch.Tensor,
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = RATIO_THRESHOLD,
    items: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, RatioTestResult]:
    """One denoising pass over held-out items (image i, noise j), z = D(x_i + sigma n_ij; sigma), scored twice: the
    squared error per pixel ||z - x_i||^2 / d (eq. 5's integrand, as :func:`per_sigma_errors` would return it for
    the held-out images, bit for bit) and :func:`ratio_test` of z against the training set (Section 3). Returns
    (errors float64 [S, M], a :class:`RatioTestResult` of CPU tensors [S, M]), M = len(items). Denoising runs on
    ``device`` (default: the held-out images' device), the neighbour search on ``device`` if given, else on the
    training set's device."""
    threshold = check_threshold(threshold)
    heldout, train = check_images(heldout, "heldout"), check_images(train, "train")
    if heldout.shape[1:] != train.shape[1:]:
        raise ValueError(f"heldout images {tuple(heldout.shape[1:])} and train images {tuple(train.shape[1:])} "
                         "differ in shape")
    sig = check_sigmas(sigmas)
    num_noises, batch_size = check_count(num_noises, "num_noises"), check_count(batch_size, "batch_size")
    ids = item_ids(items, heldout.shape[0], num_noises)
    shape = (sig.numel(), ids.numel())
    errors = torch.empty(shape, dtype=torch.float64)
    tests = RatioTestResult(torch.empty(shape, dtype=torch.bool), torch.empty(shape),
                            torch.empty(shape, dtype=torch.long), torch.empty(shape), torch.empty(shape))
    for s, cols, x0, den in _denoised(denoiser, heldout, sig, ids, num_noises, seed, batch_size, device):
        errors[s, cols] = _squared_error_per_pixel(den, x0)
        for field, value in zip(tests, ratio_test(den, train, threshold, device=device)):
            field[s, cols] = value.cpu()
    return errors, tests


def summarize_ratio_tests(
    sigmas: Sequence[float] | torch.Tensor,
    tests: RatioTestResult,
    items: torch.Tensor,
    num_noises: int,
    threshold: float,
) -> PerSigmaMemorization:
    """Reduce per-item ratio tests ([S, M] fields, possibly gathered from several ranks) for item ids ``items``
    [M] to per-sigma rates and standard errors (clustered by image, binomial when num_noises = 1)."""
    sig = check_sigmas(sigmas)
    ids = torch.as_tensor(items).reshape(-1)
    if tests.memorized.shape != (sig.numel(), ids.numel()):
        raise ValueError(f"tests must have shape [{sig.numel()}, {ids.numel()}] (sigmas, items), "
                         f"got {tuple(tests.memorized.shape)}")
    rate, stderr = mean_and_stderr(tests.memorized, ids // check_count(num_noises, "num_noises"))
    return PerSigmaMemorization(sig, rate, stderr, ids.numel(), check_threshold(threshold), ids, tests)


def per_sigma_memorization(
    denoiser: DenoiserFn,
    heldout: torch.Tensor,
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = RATIO_THRESHOLD,
    device: torch.device | str | None = None,
) -> PerSigmaMemorization:
    """Per-noise-level memorization rate (paper Section 3, Fig. 2): the fraction of (held-out image, noise) pairs whose
    one-step denoised output D(x_test + sigma n; sigma) is memorized (d1/d2 < threshold against ``train``),
    with its standard error and the per-item nearest training indices. Equivalent to
    :func:`per_sigma_errors_and_ratio_tests` + :func:`summarize_ratio_tests` over all items."""
    heldout = check_images(heldout, "heldout")
    num_noises = check_count(num_noises, "num_noises")
    ids = item_ids(None, heldout.shape[0], num_noises)
    _, tests = per_sigma_errors_and_ratio_tests(denoiser, heldout, train, sigmas, num_noises, seed, batch_size,
                                                threshold, ids, device)
    return summarize_ratio_tests(sigmas, tests, ids, num_noises, threshold)
