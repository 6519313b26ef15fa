"""Sample quality against a reference set in a feature space: the Frechet distance (FID) and the kernel distance
(KID), with cached reference statistics.

FID (Heusel et al. 2017): with feature means mu_1, mu_2 and covariances S_1, S_2 of two image sets,
    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^(1/2) ).
KID (Binkowski et al. 2018): the unbiased estimate of the squared maximum mean discrepancy between the two feature
distributions under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (d the feature dimension), on subsets
x_1..x_m and y_1..y_m of the two sets:
    MMD^2_u = [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2,
averaged over random subsets (the spread over subsets is reported beside it). FID is biased upwards at small sample
counts and comparable only at equal counts (Karras et al. 2022 report 50k-sample FID); KID is unbiased, which is why
it is the figure to report at about a thousand samples. Every result carries its sample counts.

Features come from :mod:`calmwild.features`; FID proper needs :class:`~calmwild.features.InceptionFeatures`.
Under DDP a caller can shard the samples, extract features per rank, gather them and call :func:`sample_quality`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from calmwild.checks import check_count
from calmwild.features import extract_features, extractor_identity, to_uint8
from calmwild.io import atomic_write

CACHE_FORMAT_VERSION = 2
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torch-fidelity's and torchmetrics' default
KID_REFERENCE_FEATURES = 10_000  # reference features kept for KID (a seeded subset of larger sets)
STATISTICS_FILE_PREFIX = "file:"  # the feature_extractor of statistics read from a file: not known, only F is checked


# ------------------------------------------------------------------------------------------------ Frechet distance
def _as_float64(x: object) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def frechet_distance(mu1: object, cov1: object, mu2: object, cov2: object) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64 (tensors or arrays).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2) (similar to S1 S2), with S1^(1/2) from an eigendecomposition of S1. Everything stays
    real: the tiny negative eigenvalues rounding produces for singular covariances are clipped at 0, which is the
    role the "discard tiny imaginary parts" step plays in scipy.linalg.sqrtm-based implementations.
    """
    m1, m2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    s1, s2 = _as_float64(cov1), _as_float64(cov2)
    f = m1.shape[0]
    for name, value in (("mu2", m2), ("cov1", s1), ("cov2", s2)):
        expected = (f,) if name == "mu2" else (f, f)
        if value.shape != expected:
            raise ValueError(f"{name} must have shape {expected} to match mu1 of length {f}, got {value.shape}")
    if not all(np.isfinite(v).all() for v in (m1, m2, s1, s2)):
        raise ValueError("Frechet distance of non-finite statistics (NaN or inf in a mean or covariance)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    evals, evecs = np.linalg.eigh(s1)
    root1 = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_root)


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (divisor N - 1, as numpy.cov) of features [N, F], in float64."""
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must have shape [N, F] with N >= 2, got {x.shape}")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


# ------------------------------------------------------------------------------------------------ kernel distance
def _cubic_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for all pairs: [len(x), len(y)]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_distance(features: object, reference: object, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict[str, float | int]:
    """KID between two feature sets [N, F] and [M, F] (see the module docstring): the mean of MMD^2_u over ``subsets``
    pairs of subsets of m = min(subset_size, N, M) rows each, drawn without replacement from a generator seeded with
    ``seed`` (for each subset: a permutation of the samples, then one of the reference); also their standard
    deviation (divisor ``subsets``). In float64.

    The kernel is evaluated once on every pair of rows any subset uses, and every subset's block sums come from one
    product with the subsets' 0/1 indicator vectors, so more subsets cost little (torchmetrics' KID recomputes the
    kernels of every subset: 3 m^2 F multiply-adds each)."""
    a = torch.as_tensor(_as_float64(features))
    b = torch.as_tensor(_as_float64(reference))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two feature sets [N, F] of one dimension F, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    subsets, subset_size = check_count(subsets, "subsets"), check_count(subset_size, "subset_size", 2)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {a.shape[0]} and {b.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    draws = [(torch.randperm(a.shape[0], generator=gen)[:m], torch.randperm(b.shape[0], generator=gen)[:m])
             for _ in range(subsets)]
    used_a = torch.unique(torch.cat([rows for rows, _ in draws]))
    used_b = torch.unique(torch.cat([rows for _, rows in draws]))
    k_aa = _cubic_kernel(a[used_a], a[used_a])
    k_bb = _cubic_kernel(b[used_b], b[used_b])
    k_ab = _cubic_kernel(a[used_a], b[used_b])
    # subset indicators [subsets, rows used]: the sum of a kernel block over subset rows S, T is (1_S K 1_T)
    in_a = torch.zeros(subsets, len(used_a), dtype=torch.float64)
    in_b = torch.zeros(subsets, len(used_b), dtype=torch.float64)
    for i, (rows_a, rows_b) in enumerate(draws):
        in_a[i, torch.searchsorted(used_a, rows_a)] = 1.0
        in_b[i, torch.searchsorted(used_b, rows_b)] = 1.0
    within_a = ((in_a @ k_aa) * in_a).sum(1) - in_a @ k_aa.diagonal()
    within_b = ((in_b @ k_bb) * in_b).sum(1) - in_b @ k_bb.diagonal()
    across = ((in_a @ k_ab) * in_b).sum(1)
    values = (within_a + within_b) / (m * (m - 1)) - 2.0 * across / m**2
    return {"kid": float(values.mean()), "kid_std": float(values.std(unbiased=False)), "kid_subset_size": m,
            "kid_subsets": subsets}


# ------------------------------------------------------------------------------------------------ reference statistics
class ReferenceStats(NamedTuple):
    """Feature statistics of a reference set: ``mu`` [F] and ``cov`` [F, F] (float64 numpy), the number of images
    (``num_samples``; None when a statistics file does not say), the extractor identity
    (:func:`~calmwild.features.extractor_identity`), the content key naming the set and feature space in reports and
    cache files, and up to :data:`KID_REFERENCE_FEATURES` of the features themselves (float32 [K, F], for KID;
    None for statistics read from a file)."""

    mu: np.ndarray
    cov: np.ndarray
    num_samples: int | None
    feature_extractor: str
    key: str | None = None
    features: np.ndarray | None = None

    @property
    def num(self) -> int | None:
        """The number of reference images (alias of ``num_samples``)."""
        return self.num_samples


def content_key(images: torch.Tensor, extractor: nn.Module) -> str:
    """The first 16 hex digits of the sha256 of the uint8-quantised images (see :func:`~calmwild.features.to_uint8`),
    their shape and the extractor identity (:func:`~calmwild.features.extractor_identity`)."""
    digest = hashlib.sha256()
    digest.update(f"calmwild-reference-v{CACHE_FORMAT_VERSION}|{tuple(images.shape)}|".encode())
    digest.update(extractor_identity(extractor).encode())
    for start in range(0, images.shape[0], 4096):
        digest.update(to_uint8(images[start : start + 4096]).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def kept_features(features: torch.Tensor, limit: int = KID_REFERENCE_FEATURES) -> np.ndarray:
    """The features kept for KID: all of them, or a subset of ``limit`` rows chosen with seed 0 (in index order)."""
    if features.shape[0] > limit:
        rows = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))[:limit].sort().values
        features = features[rows]
    return features.to(torch.float32).numpy()


def _load_cached(path: Path, key: str) -> ReferenceStats:
    """A cache file's statistics after checking everything; any problem raises (the caller recomputes)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format_version") != CACHE_FORMAT_VERSION or data.get("key") != key:
        raise ValueError("unexpected format or content key")
    mu, cov = np.asarray(data["mu"].numpy(), np.float64), np.asarray(data["cov"].numpy(), np.float64)
    features = data["features"].numpy()
    f = mu.shape[0]
    if mu.shape != (f,) or cov.shape != (f, f) or features.ndim != 2 or features.shape[1] != f:
        raise ValueError("malformed statistics")
    if not (np.isfinite(mu).all() and np.isfinite(cov).all() and np.isfinite(features).all()):
        raise ValueError("non-finite statistics")
    return ReferenceStats(mu, cov, int(data["num_samples"]), str(data["feature_extractor"]), key, features)


def _save(stats: ReferenceStats, path: Path) -> None:
    content = {"format_version": CACHE_FORMAT_VERSION, "key": stats.key, "mu": torch.from_numpy(stats.mu),
               "cov": torch.from_numpy(stats.cov), "features": torch.from_numpy(stats.features),
               "num_samples": stats.num_samples, "feature_extractor": stats.feature_extractor}
    atomic_write(path, lambda handle: torch.save(content, handle))


def reference_statistics(
    images: torch.Tensor,
    extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    name: str = "reference",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ReferenceStats:
    """Feature mean/covariance (and the features kept for KID) of a reference set of images [N, C, H, W] (float in
    [-1, 1] or uint8), cached on disk as ``<cache_dir>/<name>-<key>.pt``.

    The key (:func:`content_key`) hashes the uint8-quantised images, their shape and the extractor identity, so
    any change of content or of feature space gives a new file (a change below 1/255 of the range does not).
    Files are written atomically. A cache file that cannot be read or does not match its key is recomputed and
    overwritten with a warning, never trusted. ``cache_dir=None`` disables caching (the key is still computed).
    """
    if not isinstance(name, str) or not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"name must be a non-empty file-name prefix without path separators, got {name!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    key, path = content_key(images, extractor), None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{name}-{key}.pt"
        if path.exists():
            try:
                return _load_cached(path, key)
            except Exception as error:  # unreadable or inconsistent: recompute rather than trust it
                warnings.warn(f"ignoring corrupt FID reference cache {path} ({type(error).__name__}: {error}); "
                              "recomputing", RuntimeWarning, stacklevel=2)
    features = extract_features(images, extractor, batch_size, device, progress)
    mu, cov = feature_statistics(features)
    stats = ReferenceStats(mu, cov, int(images.shape[0]), extractor_identity(extractor), key, kept_features(features))
    if path is not None:
        _save(stats, path)
    return stats


# ------------------------------------------------------------------------------------------------ sample quality
def sample_quality(features: torch.Tensor | np.ndarray, reference: ReferenceStats, feature_extractor: str,
                   kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                   seed: int = 0) -> dict[str, Any]:
    """FID and KID of sample features [N, F] against ``reference`` (statistics of the same feature space, named by
    ``feature_extractor``): {"fid", "kid", "kid_std", "kid_subset_size", "kid_subsets", "num_samples",
    "num_reference", "feature_extractor"}. The KID entries are None when the reference holds no features (statistics
    read from a file)."""
    from_file = reference.feature_extractor.startswith(STATISTICS_FILE_PREFIX)  # feature space unknown: check F
    if not from_file and reference.feature_extractor != feature_extractor:
        raise ValueError(f"reference statistics were computed with {reference.feature_extractor!r}, not with the "
                         f"given extractor {feature_extractor!r}")
    mu, cov = feature_statistics(features)
    if mu.shape != reference.mu.shape:
        raise ValueError(f"sample features have dimension {mu.shape[0]}, the reference statistics "
                         f"{reference.mu.shape[0]}: they come from different feature spaces")
    result: dict[str, Any] = {"fid": frechet_distance(mu, cov, reference.mu, reference.cov)}
    if reference.features is not None:
        result.update(kernel_distance(features, reference.features, kid_subsets, kid_subset_size, seed))
    else:
        result.update({"kid": None, "kid_std": None, "kid_subset_size": None, "kid_subsets": None})
    result.update({"num_samples": int(features.shape[0]), "num_reference": reference.num_samples,
                   "feature_extractor": feature_extractor})
    return result


def compute_quality(
    samples: torch.Tensor,
    reference: torch.Tensor | ReferenceStats,
    extractor: nn.Module,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`sample_quality` of ``samples`` against ``reference`` (images [N, C, H, W] in [-1, 1], or precomputed
    :class:`ReferenceStats`) in the extractor's feature space; FID proper only with Inception features."""
    identity = extractor_identity(extractor)
    if not isinstance(reference, ReferenceStats):
        reference = reference_statistics(reference, extractor, None, batch_size=batch_size, device=device,
                                         progress=progress)
    features = extract_features(samples, extractor, batch_size, device, progress)
    return sample_quality(features, reference, identity)


def quality_report(quality: Mapping[str, Any], reference: str, reference_key: str | None
                   ) -> tuple[dict, dict[str, float]]:
    """The ``fid`` JSON section (the dict of :func:`sample_quality` plus the reference set's name and content key)
    and the logged metrics ``fid/value``, ``fid/num_samples`` and, when KID was computed, ``kid/value``, ``kid/std``,
    ``kid/num_samples``, ``kid/subset_size`` -- the counts always beside the figures."""
    section = {**quality, "reference": reference, "reference_key": reference_key}
    metrics = {"fid/value": float(quality["fid"]), "fid/num_samples": float(quality["num_samples"])}
    if quality.get("kid") is not None:
        metrics.update({"kid/value": float(quality["kid"]), "kid/std": float(quality["kid_std"]),
                        "kid/num_samples": float(quality["num_samples"]),
                        "kid/subset_size": float(quality["kid_subset_size"])})
    return section, metrics
