"""Denoisers: callables ``D(x, sigma) -> x0_hat`` in data space, and how to obtain them.

- :class:`NetworkDenoiser`: a trained ``EDMPrecond`` network (inference only); :func:`load_denoiser` rebuilds one
  from a calmwild checkpoint's EMA weights.
- :class:`EmpiricalDenoiser`: the optimal denoiser of the empirical training distribution (paper eqs. 2-3).
- :class:`GaussianDenoiser`: the optimal denoiser of a Gaussian with the data's mean and covariance (paper eq. 7),
  the large-noise limit of every denoiser (Theorem 4.11).
- :class:`SwapDenoiser`: one denoiser on chosen sigma bands and another elsewhere (paper Table 1, App. E.6), with
  the paper's band presets :data:`SWAP_PRESETS` on EDM's 18-step schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from calmwild.neighbors import flatten
from calmwild.posterior import posterior_summary
from calmwild.precond import EDMPrecond
from calmwild.schedule import edm_sigma_steps



@runtime_checkable
class Denoiser(Protocol):
    """``D(x [B,C,H,W], sigma [B]) -> [B,C,H,W]``: the estimate of the clean image given x = x0 + sigma n."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def _sigma_per_row(sigma: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """``sigma`` as a [B] tensor (a scalar is broadcast to every row of ``x``)."""
    sig = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sig.ndim == 0:
        return sig.expand(x.shape[0])
    if sig.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}] (one per row), got {tuple(sig.shape)}")
    return sig


def _check_image_shape(x: torch.Tensor, image_shape: tuple[int, ...] | None, who: str) -> None:
    if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{who} expects inputs of shape [B, {', '.join(map(str, image_shape))}], got {tuple(x.shape)}")


def check_compatible(a: object, b: object) -> None:
    """Refuse to combine two denoisers whose known ``image_shape`` (C, H, W) differ (ValueError naming both).

    A denoiser that does not expose ``image_shape`` (or exposes None) is accepted: it cannot be checked.
    """
    shape_a, shape_b = getattr(a, "image_shape", None), getattr(b, "image_shape", None)
    if shape_a is not None and shape_b is not None and tuple(shape_a) != tuple(shape_b):
        raise ValueError(
            f"incompatible denoisers: {type(a).__name__} works on images of shape {tuple(shape_a)} but "
            f"{type(b).__name__} on {tuple(shape_b)}"
        )


# ---------------------------------------------------------------------------------------------- trained networks
PRECISIONS = ("fp32", "bf16")  # NetworkDenoiser's arithmetic: true float32, or bfloat16 autocast


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class NetworkDenoiser:
    """A trained :class:`~calmwild.precond.EDMPrecond` used as a denoiser (no gradients, eval mode).

    Each call runs the network in eval mode under ``torch.no_grad`` and then restores its previous train/eval mode.
    Inputs are moved to the network's device and dtype and the result is returned in the input's device and dtype.
    ``class_label`` (for class-conditional backbones, e.g. the dummy-class baseline) is given to every row.
    ``image_shape`` (C, H, W) is taken from the argument, else from the backbone's ``config`` (``in_channels``,
    ``img_resolution``) when present, else None (unknown). ``precision="bf16"`` runs the network under bfloat16
    autocast (matrix products and convolutions in bf16, the EDM skip path and the result in the input's dtype):
    faster on GPUs with bf16 units, at a per-sigma MSE cost that ``scripts/bench.py --only precision`` measures.
    """

    def __init__(self, net: EDMPrecond, class_label: int | None = None, image_shape: Sequence[int] | None = None,
                 precision: str = "fp32"):
        if not isinstance(net, EDMPrecond):
            raise TypeError(f"NetworkDenoiser wraps an EDMPrecond, got {type(net).__name__}")
        _check_precision(precision)
        config = getattr(net.backbone, "config", None) or {}
        num_classes = int(config.get("num_classes", 0))
        if class_label is not None:
            if isinstance(class_label, bool) or not isinstance(class_label, int):
                raise TypeError(f"class_label must be an int or None, got {class_label!r}")
            if "num_classes" in config and not 0 <= class_label < num_classes:
                raise ValueError(
                    f"class_label {class_label} is not a class of a backbone with num_classes={num_classes}"
                )
        if image_shape is None and "in_channels" in config and "img_resolution" in config:
            image_shape = (int(config["in_channels"]), int(config["img_resolution"]), int(config["img_resolution"]))
        self.net = net
        self.class_label = class_label
        self.precision = precision
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def to(self, device: torch.device | str) -> NetworkDenoiser:
        self.net.to(device)
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        _check_image_shape(x, self.image_shape, "NetworkDenoiser")
        param = next(self.net.parameters(), None)
        device = param.device if param is not None else x.device
        dtype = param.dtype if param is not None else x.dtype
        sig = _sigma_per_row(sigma, x, dtype, device)
        labels = None
        if self.class_label is not None:
            labels = torch.full((x.shape[0],), self.class_label, dtype=torch.long, device=device)
        was_training = self.net.training
        self.net.eval()
        try:
            bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
            with torch.no_grad(), bf16:
                out = self.net(x.to(device=device, dtype=dtype), sig, labels)
        finally:
            self.net.train(was_training)
        return out.to(device=x.device, dtype=x.dtype)


def load_denoiser(path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32") -> NetworkDenoiser:
    """The EMA network of a calmwild checkpoint (``.ckpt`` or ``.safetensors``, see :mod:`calmwild.checkpoints`) as a
    :class:`NetworkDenoiser` on ``device`` running in ``precision``; the checkpoint's ``sample_class`` becomes the
    class label of every call. The file is read without running code from it, and the weights are loaded
    strictly against the architecture its metadata describes."""
    from calmwild.checkpoints import load_network  # lazy: the format module builds backbones

    _check_precision(precision)
    net, meta = load_network(path, device=device)
    return NetworkDenoiser(net, class_label=meta.get("sample_class"), image_shape=meta["image_shape"],
                           precision=precision)


# ---------------------------------------------------------------------------------------------- closed-form denoisers
class EmpiricalDenoiser:
    """The optimal denoiser of the empirical distribution of ``train_images`` (paper eqs. 2-3):

    D_hat(x; sigma) = sum_i w_i y_i,  w_i = softmax_i(-||x - y_i||^2 / (2 sigma^2)),

    evaluated by :func:`calmwild.posterior.posterior_summary` (streaming log-sum-exp over chunks of ``chunk_size``
    training images). The training set stays on its device and dtype (choose them with :meth:`to` or before
    construction); queries are moved there and results returned in the query's device and dtype.
    """

    def __init__(self, train_images: torch.Tensor, chunk_size: int = 4096):
        if not isinstance(train_images, torch.Tensor) or not train_images.is_floating_point():
            raise TypeError(f"train_images must be a floating-point tensor [N, C, H, W], got {type(train_images)}")
        if train_images.ndim < 2 or train_images.shape[0] == 0:
            raise ValueError(f"train_images must be a non-empty batch [N, ...], got shape {tuple(train_images.shape)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.image_shape = tuple(train_images.shape[1:])
        self._set_train(train_images)

    def _set_train(self, train_images: torch.Tensor) -> None:
        self.train = train_images
        flat = flatten(train_images)
        self._train_sq_norms = (flat * flat).sum(dim=1)

    def to(self, device: torch.device | str) -> EmpiricalDenoiser:
        self._set_train(self.train.to(device))
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        _check_image_shape(x, self.image_shape, "EmpiricalDenoiser")
        sig = _sigma_per_row(sigma, x, self.train.dtype, self.train.device)
        summary = posterior_summary(
            x, self.train, sig, chunk_size=self.chunk_size, train_sq_norms=self._train_sq_norms
        )
        return summary.mean.reshape(x.shape).to(device=x.device, dtype=x.dtype)


class GaussianDenoiser:
    """The optimal denoiser of N(mu, S) (paper eq. 7, the large-noise limit of Theorem 4.11):

    D_G(x; sigma) = mu + S (S + sigma^2 I)^{-1} (x - mu) = mu + U diag(l / (l + sigma^2)) U^T (x - mu),

    with S = U diag(l) U^T decomposed once at construction (``torch.linalg.eigh`` in float64, so d up to a few
    thousand is fine) and evaluated for a per-row sigma at the cost of two [B, d] x [d, d] products.

    ``mean`` is [d] or image-shaped [C, H, W] (then ``image_shape`` is that shape); ``cov`` is [d, d], symmetric and
    positive semi-definite up to rounding: eigenvalues above -10 sqrt(d) eps(dtype) max|l| are clipped to zero, more
    negative ones are an error. Computation runs in ``compute_dtype`` (float64 by default).
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, compute_dtype: torch.dtype = torch.float64):
        if not (isinstance(mean, torch.Tensor) and isinstance(cov, torch.Tensor)):
            raise TypeError(f"mean and cov must be tensors, got {type(mean).__name__} and {type(cov).__name__}")
        if not (mean.is_floating_point() and cov.is_floating_point()):
            raise TypeError(f"mean and cov must be floating point, got {mean.dtype} and {cov.dtype}")
        d = mean.numel()
        if d == 0:
            raise ValueError("mean must have at least one entry")
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape [{d}, {d}] to match a mean with {d} entries, got {tuple(cov.shape)}")
        cov64 = cov.to(torch.float64)
        scale = float(cov64.abs().max())
        asym = float((cov64 - cov64.T).abs().max())
        if asym > 1e-5 * max(scale, 1e-30):
            raise ValueError(f"cov must be symmetric: max |S - S^T| = {asym:.3g} with max |S| = {scale:.3g}")
        evals, evecs = torch.linalg.eigh(0.5 * (cov64 + cov64.T))
        tol = 10.0 * math.sqrt(d) * torch.finfo(cov.dtype).eps * float(evals.abs().max())
        if float(evals.min()) < -tol:
            raise ValueError(
                f"cov must be positive semi-definite: smallest eigenvalue {float(evals.min()):.3g} < -{tol:.3g}"
            )
        self.image_shape = tuple(mean.shape) if mean.ndim >= 2 else None
        self.compute_dtype = compute_dtype
        self.mean = mean.reshape(-1).to(compute_dtype)
        self.eigenvalues = evals.clamp_min(0.0).to(compute_dtype)
        self.eigenvectors = evecs.to(compute_dtype)

    @classmethod
    def fit(cls, images: torch.Tensor, compute_dtype: torch.dtype = torch.float64) -> GaussianDenoiser:
        """The Gaussian with the empirical mean and the empirical covariance (1/N normalisation, i.e. the exact
        second moments of the empirical distribution, whose optimal denoiser tends to this one as sigma grows)."""
        if not isinstance(images, torch.Tensor) or images.ndim < 2 or images.shape[0] < 2:
            got = getattr(images, "shape", images)
            raise ValueError(f"fit needs a tensor of at least 2 images [N, ...], got {got}")
        flat = flatten(images).to(torch.float64)
        mean = flat.mean(dim=0)
        centred = flat - mean
        cov = centred.T @ centred / flat.shape[0]
        return cls(mean.reshape(images.shape[1:]), cov, compute_dtype=compute_dtype)

    def to(self, device: torch.device | str) -> GaussianDenoiser:
        self.mean, self.eigenvalues, self.eigenvectors = (
            t.to(device) for t in (self.mean, self.eigenvalues, self.eigenvectors)
        )
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        _check_image_shape(x, self.image_shape, "GaussianDenoiser")
        flat = flatten(x)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(
                f"GaussianDenoiser has dimension {self.mean.numel()}, got inputs of shape {tuple(x.shape)}"
            )
        device, dtype = self.mean.device, self.compute_dtype
        sig = _sigma_per_row(sigma, x, dtype, device)
        centred = flat.to(device=device, dtype=dtype) - self.mean
        coords = centred @ self.eigenvectors  # U^T (x - mu), one row per sample
        shrink = self.eigenvalues / (self.eigenvalues + sig.unsqueeze(1) ** 2)
        out = self.mean + (coords * shrink) @ self.eigenvectors.T
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------- swapping
# The paper's swap regions (Table 1, App. E.6) as 1-based, inclusive step indices into EDM's 18-step schedule
# 80.00 (step 1), 57.59, 40.79, 28.37, 19.35, 12.91, 8.40 (step 7), ..., 0.30 (step 13), 0.14 (step 14), ..., 0.002.
SWAP_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "large": ((1, 6),),  # sigma 80.00 .. 12.91
    "medium": ((7, 13),),  # sigma 8.40 .. 0.30 (the paper's "steps 7-13")
    "small": ((14, 18),),  # sigma 0.14 .. 0.002
}
SWAP_PRESET_NUM_STEPS = 18


def swap_bands_from_steps(
    step_ranges: Sequence[tuple[int, int]], schedule: torch.Tensor | None = None
) -> list[tuple[float, float]]:
    """Closed sigma bands [low, high] covering exactly the schedule entries of the given step ranges.

    ``step_ranges`` are (first, last) pairs of **1-based, inclusive** indices into ``schedule`` (a decreasing
    sigma schedule without the trailing 0; default ``edm_sigma_steps(18)``), so step 1 is sigma_max. Band edges
    are the geometric means (midpoints in log sigma) of neighbouring schedule entries, so a sigma that differs from
    a schedule entry by float rounding is routed like the entry itself; a range that includes the first (last) step
    extends to +inf (0), so e.g. churn's raised sigma_max stays in the band.
    """
    if schedule is None:
        schedule = edm_sigma_steps(SWAP_PRESET_NUM_STEPS)
    sched = torch.as_tensor(schedule, dtype=torch.float64)
    n = sched.numel()
    if sched.ndim != 1 or n == 0 or torch.any(sched <= 0) or torch.any(sched[1:] >= sched[:-1]):
        raise ValueError(f"schedule must be a positive, strictly decreasing 1-D sigma sequence, got {sched.tolist()}")
    geometric_mid = [math.sqrt(float(sched[k]) * float(sched[k + 1])) for k in range(n - 1)]
    bands = []
    for pair in step_ranges:
        if len(pair) != 2:
            raise ValueError(f"each step range must be a (first, last) pair, got {pair!r}")
        first, last = int(pair[0]), int(pair[1])
        if not 1 <= first <= last <= n:
            raise ValueError(
                f"step range ({first}, {last}) must satisfy 1 <= first <= last <= {n} (1-based, inclusive)"
            )
        high = math.inf if first == 1 else geometric_mid[first - 2]
        low = 0.0 if last == n else geometric_mid[last - 1]
        bands.append((low, high))
    return bands


class SwapDenoiser:
    """``other`` on the sigma bands, ``base`` elsewhere (the paper's denoiser swapping, Table 1 / App. E.6).

    ``bands`` is a sequence of closed intervals (low, high) in sigma, or the name of a preset in
    :data:`SWAP_PRESETS` ("large", "medium", "small"), which is converted with :func:`swap_bands_from_steps` on
    EDM's 18-step schedule. Routing is per row: each denoiser is called only on its own rows, and not at all when
    no row needs it, so the EDM sampler (one sigma per call) calls exactly one of them per evaluation.
    """

    def __init__(self, base: Denoiser, other: Denoiser, bands: str | Sequence[tuple[float, float]]):
        if not (callable(base) and callable(other)):
            raise TypeError(f"base and other must be denoisers, got {type(base).__name__}, {type(other).__name__}")
        if isinstance(bands, str):
            if bands not in SWAP_PRESETS:
                raise ValueError(f"unknown swap preset {bands!r}; expected one of {sorted(SWAP_PRESETS)}")
            bands = swap_bands_from_steps(SWAP_PRESETS[bands])
        checked = []
        for band in bands:
            if len(band) != 2:
                raise ValueError(f"each band must be a (low, high) pair, got {band!r}")
            low, high = float(band[0]), float(band[1])
            if not 0.0 <= low <= high:
                raise ValueError(f"band ({low}, {high}) must satisfy 0 <= low <= high (sigma)")
            checked.append((low, high))
        if not checked:
            raise ValueError("SwapDenoiser needs at least one band")
        check_compatible(base, other)
        self.base, self.other, self.bands = base, other, checked
        self.image_shape = getattr(base, "image_shape", None) or getattr(other, "image_shape", None)

    def to(self, device: torch.device | str) -> SwapDenoiser:
        for d in {id(self.base): self.base, id(self.other): self.other}.values():
            if hasattr(d, "to"):
                d.to(device)
        return self

    def in_bands(self, sigma: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which entries of ``sigma`` fall inside some band (routed to ``other``)."""
        mask = torch.zeros(sigma.shape, dtype=torch.bool, device=sigma.device)
        for low, high in self.bands:
            mask |= (sigma >= low) & (sigma <= high)
        return mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sig = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=torch.float64)
        sig = _sigma_per_row(sig, x, sig.dtype, x.device)
        mask = self.in_bands(sig)
        n_other = int(mask.sum())
        if n_other == 0:
            return self.base(x, sig)
        if n_other == x.shape[0]:
            return self.other(x, sig)
        out = torch.empty_like(x)
        out[mask] = self.other(x[mask], sig[mask]).to(x.dtype)
        keep = ~mask
        out[keep] = self.base(x[keep], sig[keep]).to(x.dtype)
        return out
