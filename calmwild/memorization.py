"""Memorization metrics (PAPER_NOTES 2): the ratio test, per-sigma MSE (eq. 5), per-sigma and trajectory
memorization rates. Pure functions of a denoiser ``D(x [B,C,H,W], sigma [B]) -> x0_hat`` and of tensors.

Items and work splitting (DDP). The per-sigma metrics average over *items*: pairs (image i, noise j) with
i < num_images and j < num_noises, numbered ``item = i * num_noises + j``. The noise of an item depends only on
(seed, i, j) (:func:`item_noise`), never on the batch size or on which process computes it, and the same noise is
used at every sigma and for every denoiser, so curves and differences between denoisers are paired. A caller that
splits the work:

    items = shard_items(num_images, num_noises, rank, world_size)        # this rank's items
    errors = per_sigma_errors(D, images, sigmas, num_noises, items=items)    # [S, len(items)]
    # gather ``errors`` and ``items`` from all ranks (shards differ in length by at most one: pad before an
    # all_gather and drop the padding), concatenate along the item axis, then on any rank:
    curve = summarize_errors(sigmas, all_errors, all_items, num_noises)

and likewise :func:`per_sigma_ratio_tests` + :func:`summarize_ratio_tests`. :func:`per_sigma_mse` and
:func:`per_sigma_memorization` are exactly these two steps on one process. Trajectory memorization needs no noise:
shard the samples, run :func:`ratio_test` per shard, gather ``memorized`` and reduce with :func:`mean_and_stderr`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from calmwild.neighbors import knn

DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ checks
def check_threshold(threshold: float) -> float:
    """The ratio-test threshold as a float in (0, 1) (ValueError otherwise)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise ValueError(f"ratio-test threshold must lie in (0, 1), got {threshold!r}")
    return float(threshold)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _images(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, ...], got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Noise levels as a 1-D float64 CPU tensor of finite positive values (order kept)."""
    sig = torch.as_tensor(sigmas if isinstance(sigmas, torch.Tensor) else list(sigmas), dtype=torch.float64)
    sig = sig.detach().cpu().reshape(-1)
    if sig.numel() == 0 or not torch.all(torch.isfinite(sig) & (sig > 0)):
        raise ValueError(f"sigmas must be a non-empty list of finite positive noise levels, got {sig.tolist()}")
    return sig


def _items(items: Sequence[int] | torch.Tensor | None, num_images: int, num_noises: int) -> torch.Tensor:
    """Item ids as a 1-D long CPU tensor, each in [0, num_images * num_noises); None means all items."""
    total = num_images * num_noises
    if items is None:
        return torch.arange(total)
    ids = torch.as_tensor(items if isinstance(items, torch.Tensor) else list(items)).detach().cpu().reshape(-1)
    if ids.numel() and (ids.is_floating_point() or int(ids.min()) < 0 or int(ids.max()) >= total):
        raise ValueError(f"items must be integer ids in [0, {total}) = [0, num_images * num_noises), got "
                         f"{ids[:10].tolist()}{' ...' if ids.numel() > 10 else ''}")
    return ids.long()


# ------------------------------------------------------------------------------------------------ ratio test
class RatioTestResult(NamedTuple):
    """Ratio test per query (shape [Q], or [S, M] from :func:`per_sigma_ratio_tests`).

    memorized: bool, ratio < threshold;  ratio: d1 / d2 (float32, 0/0 := 0);  nearest_index: long, the training
    image at distance d1;  d1, d2: float32 Euclidean distances to the nearest and second-nearest training image.
    """

    memorized: torch.Tensor
    ratio: torch.Tensor
    nearest_index: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor


def ratio_test(
    queries: torch.Tensor,
    train: torch.Tensor,
    threshold: float = 1 / 3,
    device: torch.device | str | None = None,
    query_chunk: int = 1024,
    ref_chunk: int = 8192,
) -> RatioTestResult:
    """Yoon et al. (2023), as used by the paper (PAPER_NOTES 2): z is memorized when d1(z) / d2(z) < threshold,
    d_k the Euclidean distance (pixel space) to the k-th nearest training image, from :func:`calmwild.neighbors.knn`
    (exact; ``device`` and the chunk sizes are passed on). Results lie on the computation device.

    Exact copies of a duplicated training image: then d1 = d2 = 0 and the ratio 0/0 is defined as 0, so such a
    sample counts as memorized (it IS a training image). d2 = 0 forces d1 = 0, so no other 0/0 case exists.
    """
    threshold = check_threshold(threshold)
    queries, train = _images(queries, "queries"), _images(train, "train")
    if train.shape[0] < 2:
        raise ValueError(f"the ratio test needs at least 2 training images, got {train.shape[0]}")
    dist, index = knn(queries, train, k=2, query_chunk=query_chunk, ref_chunk=ref_chunk, device=device)
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))
    return RatioTestResult(ratio < threshold, ratio, index[:, 0], d1, d2)


# ------------------------------------------------------------------------------------------------ reductions
def mean_and_stderr(
    values: torch.Tensor, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last axis and its standard error, float64, shapes ``values.shape[:-1]``.

    Items sharing a group (the noises of one image) are correlated, so groups are the independent units
    (cluster-robust plug-in estimate): with M items, group sums S_g of the centred values v_m - mean,
        mean = (1/M) sum_m v_m,      stderr^2 = (1/M^2) sum_g S_g^2.
    Without ``groups`` (or one item per group) this is sqrt(var / M) with the plug-in variance; for 0/1 values
    (memorization flags) it is the binomial standard error sqrt(p (1 - p) / M).
    """
    v = values.detach().to("cpu", torch.float64)
    m = v.shape[-1] if v.ndim else 0
    if m == 0:
        raise ValueError(f"no items to average: values has shape {tuple(values.shape)}")
    flat = v.reshape(-1, m)
    mean = flat.mean(dim=1)
    centred = flat - mean.unsqueeze(1)
    if groups is None:
        sums = centred
    else:
        groups = torch.as_tensor(groups).detach().cpu().reshape(-1)
        if groups.numel() != m:
            raise ValueError(f"groups has {groups.numel()} entries for {m} items")
        inverse = torch.unique(groups, return_inverse=True)[1]
        sums = torch.zeros(flat.shape[0], int(inverse.max()) + 1, dtype=torch.float64).index_add_(1, inverse, centred)
    stderr = sums.square().sum(dim=1).sqrt() / m
    return mean.reshape(v.shape[:-1]), stderr.reshape(v.shape[:-1])


# ------------------------------------------------------------------------------------------------ items and noise
def shard_items(num_images: int, num_noises: int, rank: int, world_size: int) -> torch.Tensor:
    """The item ids process ``rank`` of ``world_size`` computes: every world_size-th item starting at ``rank``
    (shards differ in length by at most one)."""
    num_images, num_noises = _positive_int(num_images, "num_images"), _positive_int(num_noises, "num_noises")
    world_size = _positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    return torch.arange(rank, num_images * num_noises, world_size)


def item_noise(items: torch.Tensor, num_noises: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Standard Gaussian noise [len(items), *shape] (float32, CPU), one row per item.

    Item m = (image i = m // num_noises, noise j = m % num_noises) draws from its own generator, seeded with
    numpy's ``SeedSequence([seed, i, j])``, so a row depends only on (seed, i, j) and not on batching or sharding.
    """
    num_noises = _positive_int(num_noises, "num_noises")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
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
    images = _images(images, "images")
    sig = _sigmas(sigmas)
    num_noises, batch_size = _positive_int(num_noises, "num_noises"), _positive_int(batch_size, "batch_size")
    ids = _items(items, images.shape[0], num_noises)
    out = torch.empty(sig.numel(), ids.numel(), dtype=torch.float64)
    for s, cols, x0, den in _denoised(denoiser, images, sig, ids, num_noises, seed, batch_size, device):
        out[s, cols] = (den.double() - x0.double()).square().flatten(1).mean(dim=1).cpu()
    return out


def summarize_errors(
    sigmas: Sequence[float] | torch.Tensor, errors: torch.Tensor, items: torch.Tensor, num_noises: int
) -> PerSigmaMSE:
    """Reduce per-item errors [S, M] (from :func:`per_sigma_errors`, possibly gathered from several ranks) for
    item ids ``items`` [M] to the per-sigma mean and its standard error clustered by image (item // num_noises)."""
    sig = _sigmas(sigmas)
    ids = torch.as_tensor(items).reshape(-1)
    if errors.ndim != 2 or errors.shape != (sig.numel(), ids.numel()):
        raise ValueError(f"errors must have shape [{sig.numel()}, {ids.numel()}] (sigmas, items), "
                         f"got {tuple(errors.shape)}")
    mse, stderr = mean_and_stderr(errors, ids // _positive_int(num_noises, "num_noises"))
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
    images = _images(images, "images")
    num_noises = _positive_int(num_noises, "num_noises")
    ids = _items(None, images.shape[0], num_noises)
    errors = per_sigma_errors(denoiser, images, sigmas, num_noises, seed, batch_size, ids, device)
    return summarize_errors(sigmas, errors, ids, num_noises)


# ---------------------------------------------------------------------------------------------- per-sigma memorization
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


def per_sigma_ratio_tests(
    denoiser: DenoiserFn,
    heldout: torch.Tensor,
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = 1 / 3,
    items: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> RatioTestResult:
    """For held-out items (image i, noise j): z = D(x_i + sigma n_ij; sigma), then :func:`ratio_test` of z
    against the training set. Returns a :class:`RatioTestResult` whose fields are CPU tensors [len(sigmas),
    len(items)]. Denoising runs on ``device`` (default: the held-out images' device), the neighbour search on
    ``device`` if given, else on the training set's device."""
    threshold = check_threshold(threshold)
    heldout, train = _images(heldout, "heldout"), _images(train, "train")
    if heldout.shape[1:] != train.shape[1:]:
        raise ValueError(f"heldout images {tuple(heldout.shape[1:])} and train images {tuple(train.shape[1:])} "
                         "differ in shape")
    sig = _sigmas(sigmas)
    num_noises, batch_size = _positive_int(num_noises, "num_noises"), _positive_int(batch_size, "batch_size")
    ids = _items(items, heldout.shape[0], num_noises)
    shape = (sig.numel(), ids.numel())
    out = RatioTestResult(torch.empty(shape, dtype=torch.bool), torch.empty(shape),
                          torch.empty(shape, dtype=torch.long), torch.empty(shape), torch.empty(shape))
    for s, cols, _, den in _denoised(denoiser, heldout, sig, ids, num_noises, seed, batch_size, device):
        result = ratio_test(den, train, threshold, device=device)
        for field, value in zip(out, result):
            field[s, cols] = value.cpu()
    return out


def summarize_ratio_tests(
    sigmas: Sequence[float] | torch.Tensor,
    tests: RatioTestResult,
    items: torch.Tensor,
    num_noises: int,
    threshold: float,
) -> PerSigmaMemorization:
    """Reduce per-item ratio tests ([S, M] fields, possibly gathered from several ranks) for item ids ``items``
    [M] to per-sigma rates and standard errors (clustered by image, binomial when num_noises = 1)."""
    sig = _sigmas(sigmas)
    ids = torch.as_tensor(items).reshape(-1)
    if tests.memorized.shape != (sig.numel(), ids.numel()):
        raise ValueError(f"tests must have shape [{sig.numel()}, {ids.numel()}] (sigmas, items), "
                         f"got {tuple(tests.memorized.shape)}")
    rate, stderr = mean_and_stderr(tests.memorized, ids // _positive_int(num_noises, "num_noises"))
    return PerSigmaMemorization(sig, rate, stderr, ids.numel(), check_threshold(threshold), ids, tests)


def per_sigma_memorization(
    denoiser: DenoiserFn,
    heldout: torch.Tensor,
    train: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    num_noises: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    threshold: float = 1 / 3,
    device: torch.device | str | None = None,
) -> PerSigmaMemorization:
    """Per-noise-level memorization rate (PAPER_NOTES 2): the fraction of (held-out image, noise) pairs whose
    one-step denoised output D(x_test + sigma n; sigma) is memorized (d1/d2 < threshold against ``train``),
    with its standard error and the per-item nearest training indices. Equivalent to
    :func:`per_sigma_ratio_tests` + :func:`summarize_ratio_tests` over all items."""
    heldout = _images(heldout, "heldout")
    num_noises = _positive_int(num_noises, "num_noises")
    ids = _items(None, heldout.shape[0], num_noises)
    tests = per_sigma_ratio_tests(denoiser, heldout, train, sigmas, num_noises, seed, batch_size, threshold, ids,
                                  device)
    return summarize_ratio_tests(sigmas, tests, ids, num_noises, threshold)


# ------------------------------------------------------------------------------------------------ trajectories
class TrajectoryMemorization(NamedTuple):
    """Fraction of generated samples that are memorized, its binomial standard error sqrt(p (1 - p) / n), the
    number of samples and the per-sample :class:`RatioTestResult`."""

    rate: float
    stderr: float
    num_samples: int
    result: RatioTestResult

    def to_dict(self) -> dict[str, float | int]:
        return {"rate": self.rate, "stderr": self.stderr, "num_samples": self.num_samples}


def trajectory_memorization(
    samples: torch.Tensor,
    train: torch.Tensor,
    threshold: float = 1 / 3,
    device: torch.device | str | None = None,
) -> TrajectoryMemorization:
    """Trajectory-level memorization rate (PAPER_NOTES 2): the fraction of generated samples (ODE from pure
    noise) that pass the ratio test against the training set (paper, CIFAR-10: EDM-1K 92.2%, EDM-50K 0.0%)."""
    result = ratio_test(samples, train, threshold, device=device)
    rate, stderr = mean_and_stderr(result.memorized)
    return TrajectoryMemorization(float(rate), float(stderr), int(samples.shape[0]), result)
