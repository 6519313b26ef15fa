"""Frechet distances between image sets in a feature space (FID with Inception features), with cached reference
statistics and a pluggable feature extractor.

FID (Heusel et al. 2017): with feature means mu_1, mu_2 and covariances S_1, S_2 of two image sets,
    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^(1/2) ).
A figure means little without its sample count (few-sample FID is biased upwards and not comparable with the
50k-sample FID of Karras et al. 2022), so :func:`compute_fid` always reports the counts beside it.

Feature extractors are ``nn.Module``s mapping images [B, C, H, W] in [-1, 1] to features [B, F]:
- :class:`InceptionFeatures`: torch-fidelity's InceptionV3 (2048-d pool features), the standard FID network;
  needs the weights file (offline: it fails within seconds and names the file to provide).
- :class:`RandomConvFeatures`: a fixed random conv net, for tests and offline runs: the Frechet distance in that
  random-feature space is a consistency check, NOT comparable with FID.
An extractor may declare a ``feature_id`` string; it names the feature space in results and cache keys.

Under DDP a caller can shard the images, run :func:`extract_features` per rank, gather the features and call
:func:`feature_statistics` / :func:`frechet_distance` on the concatenation.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
CACHE_FORMAT_VERSION = 1


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


# ------------------------------------------------------------------------------------------------ feature extractors
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 0..255 (clamped, rounded to nearest), on the same device."""
    return ((images.detach().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


class InceptionWeightsUnavailable(RuntimeError):
    """The InceptionV3 weights file is missing and could not be downloaded."""


def inception_weights_default_path() -> Path:
    """Where torch.hub (and torch-fidelity) look for the weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def _unavailable(reason: str, target: Path) -> InceptionWeightsUnavailable:
    return InceptionWeightsUnavailable(
        f"InceptionV3 weights for FID are unavailable: {reason}. Provide the file {INCEPTION_WEIGHTS_NAME} either "
        f"at {target} (that is $TORCH_HOME/hub/checkpoints/{INCEPTION_WEIGHTS_NAME}; TORCH_HOME decides the "
        f"folder) or anywhere, passing its path as the weights_path option (calmwild's fid_weights_path; the FID "
        f"callback's weights_path). It can be fetched on a machine with network access from "
        f"{INCEPTION_WEIGHTS_URL}. Offline, the 'random' feature extractor (RandomConvFeatures) gives a (non-FID) "
        "random-feature distance."
    )


def _can_connect(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the URL's host opens within ``timeout`` seconds, else the reason. The attempt
    runs in a daemon thread joined with that deadline, so a hanging name lookup cannot block the caller."""
    parsed = urlparse(url)
    outcome: dict[str, str | None] = {}

    def attempt() -> None:
        try:
            socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
            outcome["reason"] = None
        except Exception as error:  # name lookup, refused, unreachable, timed out: all mean "no download"
            outcome["reason"] = f"cannot reach {parsed.hostname} ({type(error).__name__}: {error})"

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome.get("reason", f"no connection to {parsed.hostname} within {timeout:g} s")


def _download_weights(target: Path, timeout: float) -> None:
    """Fetch the weights to ``target`` (torch.hub writes a temporary file and moves it into place). Fails within
    about ``timeout`` seconds without network; during the transfer every socket read times out after ``timeout``."""
    reason = _can_connect(INCEPTION_WEIGHTS_URL, timeout)
    if reason is not None:
        raise _unavailable(f"not found at {target} and the download is impossible: {reason}", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), progress=False)
    except Exception as error:  # any failure of the transfer is reported with the file to provide
        raise _unavailable(f"the download failed ({type(error).__name__}: {error})", target) from error
    finally:
        socket.setdefaulttimeout(previous)


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID InceptionV3 (torch-fidelity's ``FeatureExtractorInceptionV3``, a port of
    the TensorFlow graph) for images in [-1, 1]: quantised to uint8 as the network expects (grayscale repeated to
    3 channels), resized to 299x299 inside the network.

    Weights: ``weights_path`` if given (it must exist), else
    $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth if present, else a download there when
    ``download`` is true. The file is checked for BEFORE any network access; offline, construction fails within
    about ``download_timeout`` seconds with :class:`InceptionWeightsUnavailable` naming the file to provide.
    ``internal_dtype``: "float32" (default) or "float64" inside the network.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        download: bool = True,
        download_timeout: float = 5.0,
        internal_dtype: str = "float32",
    ):
        super().__init__()
        if not download_timeout > 0:
            raise ValueError(f"download_timeout must be positive seconds, got {download_timeout!r}")
        if weights_path is not None:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"weights_path {str(path)!r} is not a file; expected the "
                                        f"InceptionV3 weights {INCEPTION_WEIGHTS_NAME} (from {INCEPTION_WEIGHTS_URL})")
        else:
            path = inception_weights_default_path()
            if not path.is_file():
                if not download:
                    raise _unavailable(f"not found at {path} and download=False", path)
                _download_weights(path, download_timeout)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path),
            feature_extractor_internal_dtype=internal_dtype,
        )
        self.weights_path = str(path)
        self.feature_id = "inception-v3-2048"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures expects images [B, 1 or 3, H, W] in [-1, 1], "
                             f"got {tuple(images.shape)}")
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x.contiguous())[0]


class RandomConvFeatures(nn.Module):
    """A fixed, randomly initialised conv net (deterministic given ``seed``, never trained) for images [B,
    in_channels, H, W] of any size in [-1, 1]: conv3x3 (32) - ReLU - conv3x3 stride 2 (64) - ReLU - adaptive
    average pool 4x4 - linear to ``dim``, He-scaled Gaussian weights.

    A documented stand-in for offline runs and tests: the Frechet distance in this random-feature space is zero
    for identical statistics and grows with distribution shift, but it is NOT comparable with FID.
    """

    width = 32

    def __init__(self, in_channels: int = 3, dim: int = 64, seed: int = 0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        width = self.width

        def he(*shape: int) -> torch.Tensor:
            fan_in = int(np.prod(shape[1:]))
            return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5

        self.register_buffer("w1", he(width, in_channels, 3, 3))
        self.register_buffer("w2", he(2 * width, width, 3, 3))
        self.register_buffer("w3", he(dim, 2 * width * 16))
        self.in_channels = in_channels
        self.feature_id = f"random-conv-{dim}-seed{seed}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"RandomConvFeatures expects images [B, {self.in_channels}, H, W], "
                             f"got {tuple(images.shape)}")
        h = F.relu(F.conv2d(images.to(self.w1.dtype), self.w1, padding=1))
        h = F.relu(F.conv2d(h, self.w2, stride=2, padding=1))
        return F.adaptive_avg_pool2d(h, 4).flatten(1) @ self.w3.T


FEATURE_EXTRACTORS = ("inception", "random")


def build_feature_extractor(
    name: str = "inception",
    in_channels: int = 3,
    weights_path: str | os.PathLike | None = None,
    dim: int = 64,
    seed: int = 0,
) -> nn.Module:
    """An extractor by name: "inception" -> :class:`InceptionFeatures` (FID proper, from ``weights_path`` or
    $TORCH_HOME; any ``in_channels`` of 1 or 3 works), "random" -> :class:`RandomConvFeatures` (``in_channels``,
    ``dim``, ``seed``; not comparable with FID)."""
    if name == "inception":
        return InceptionFeatures(weights_path=weights_path)
    if name == "random":
        return RandomConvFeatures(in_channels, dim=dim, seed=seed)
    raise ValueError(f"feature extractor name must be one of {', '.join(map(repr, FEATURE_EXTRACTORS))}, "
                     f"got {name!r}")


def extractor_identity(extractor: nn.Module) -> str:
    """Class name plus the declared ``feature_id``, else plus a sha256 (16 hex digits) of the state_dict."""
    feature_id = getattr(extractor, "feature_id", None)
    if feature_id is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(extractor.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        feature_id = f"state-sha256:{digest.hexdigest()[:16]}"
    return f"{type(extractor).__name__}:{feature_id}"


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def extract_features(
    images: torch.Tensor,
    extractor: nn.Module,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Features [N, F] (float64, CPU) of images [N, C, H, W] in [-1, 1], batched under ``torch.no_grad`` with the
    extractor in eval mode (its mode is restored afterwards). Runs on ``device``, else the extractor's device."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device is None:
        device = _module_device(extractor)
    device = torch.device(device) if device is not None else images.device
    was_training = extractor.training
    extractor.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="features"):
                batch = images[start : start + batch_size].to(device)
                out = extractor(batch)
                if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                    raise ValueError(f"the feature extractor must return [B, F], got {tuple(out.shape)} for a batch "
                                     f"of {batch.shape[0]}")
                chunks.append(out.detach().to("cpu", torch.float64))
    finally:
        extractor.train(was_training)
    if not chunks:
        raise ValueError("no images to extract features from")
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------------ reference statistics
class ReferenceStats(NamedTuple):
    """Feature statistics of a reference image set: ``mu`` [F] and ``cov`` [F, F] (float64 numpy), the number of
    images (also as ``num``), the extractor identity (:func:`extractor_identity`) and the content key
    (:func:`content_key`, 16 hex digits) naming the image set and feature space in reports and cache files."""

    mu: np.ndarray
    cov: np.ndarray
    num_samples: int
    feature_extractor: str
    key: str | None = None

    @property
    def num(self) -> int:
        """The number of reference images (alias of ``num_samples``)."""
        return self.num_samples


def content_key(images: torch.Tensor, extractor: nn.Module) -> str:
    """The first 16 hex digits of the sha256 of the uint8-quantised images (see :func:`to_uint8`), their shape and
    the extractor identity (:func:`extractor_identity`, which contains its ``feature_id``)."""
    digest = hashlib.sha256()
    digest.update(f"calmwild-reference-v{CACHE_FORMAT_VERSION}|{tuple(images.shape)}|".encode())
    digest.update(extractor_identity(extractor).encode())
    for start in range(0, images.shape[0], 4096):
        digest.update(to_uint8(images[start : start + 4096]).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_cached(path: Path, key: str) -> ReferenceStats:
    """A cache file's statistics after checking everything; any problem raises (the caller recomputes)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format_version") != CACHE_FORMAT_VERSION or data.get("key") != key:
        raise ValueError("unexpected format or content key")
    mu, cov = np.asarray(data["mu"].numpy(), np.float64), np.asarray(data["cov"].numpy(), np.float64)
    f = mu.shape[0]
    if mu.shape != (f,) or cov.shape != (f, f) or not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError("malformed statistics")
    return ReferenceStats(mu, cov, int(data["num_samples"]), str(data["feature_extractor"]), key)


def _save_atomic(stats: ReferenceStats, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        torch.save({"format_version": CACHE_FORMAT_VERSION, "key": stats.key, "mu": torch.from_numpy(stats.mu),
                    "cov": torch.from_numpy(stats.cov), "num_samples": stats.num_samples,
                    "feature_extractor": stats.feature_extractor}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reference_statistics(
    images: torch.Tensor,
    extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    name: str = "reference",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> ReferenceStats:
    """Feature mean/covariance of a reference set, cached on disk as ``<cache_dir>/<name>-<key>.pt``.

    The key (:func:`content_key`) hashes the uint8-quantised images, their shape and the extractor identity, so
    any change of content or of feature space gives a new file (a change below 1/255 of the range does not).
    Files are written atomically (temporary file + os.replace). A cache file that cannot be read or does not match
    its key is recomputed and overwritten with a warning, never trusted. ``cache_dir=None`` disables caching (the
    key is still computed and returned).
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
    mu, cov = feature_statistics(extract_features(images, extractor, batch_size, device, progress))
    stats = ReferenceStats(mu, cov, int(images.shape[0]), extractor_identity(extractor), key)
    if path is not None:
        _save_atomic(stats, path)
    return stats


def compute_fid(
    samples: torch.Tensor,
    reference: torch.Tensor | ReferenceStats,
    extractor: nn.Module,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, float | int | str]:
    """Frechet distance between ``samples`` and ``reference`` (images [N, C, H, W] in [-1, 1], or precomputed
    :class:`ReferenceStats` from the same extractor) in the extractor's feature space.

    Returns {"fid": float, "num_samples": int, "num_reference": int, "feature_extractor": identity}; it is FID
    proper only with :class:`InceptionFeatures`, and comparable only between equal sample counts.
    """
    identity = extractor_identity(extractor)
    if isinstance(reference, ReferenceStats):
        if reference.feature_extractor != identity:
            raise ValueError(f"reference statistics were computed with {reference.feature_extractor!r}, "
                             f"not with the given extractor {identity!r}")
        ref = reference
    else:
        ref = reference_statistics(reference, extractor, None, batch_size=batch_size, device=device,
                                   progress=progress)
    mu, cov = feature_statistics(extract_features(samples, extractor, batch_size, device, progress))
    return {"fid": frechet_distance(mu, cov, ref.mu, ref.cov), "num_samples": int(samples.shape[0]),
            "num_reference": ref.num_samples, "feature_extractor": identity}


def fid_report(fid: Mapping[str, Any], reference: str, reference_key: str | None) -> tuple[dict, dict[str, float]]:
    """The ``fid`` JSON section (the dict of :func:`calmwild.fid.compute_fid` plus the reference set's name and
    content key) and the metrics ``fid/value`` and ``fid/num_samples`` -- the count always beside the figure,
    since few-sample FID is biased upwards and comparable only at equal counts (Karras et al. 2022 report 50k-sample
    FID)."""
    section = {**fid, "reference": reference, "reference_key": reference_key}
    return section, {"fid/value": float(fid["fid"]), "fid/num_samples": float(fid["num_samples"])}
