"""Feature extractors for Frechet distances and KID: ``nn.Module``s mapping images [B, C, H, W] in [-1, 1] to
features [B, F].

- :class:`InceptionFeatures`: torch-fidelity's InceptionV3 (2048-d pool features), the standard FID network;
  needs the weights file (offline: it fails within seconds and names the file to provide).
- :class:`RandomConvFeatures`: a fixed random conv net, for tests and offline runs: a distance in that
  random-feature space is a consistency check, NOT comparable with FID.

An extractor may declare a ``feature_id`` string; it names the feature space in results and cache keys
(:func:`extractor_identity`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calmwild.checks import check_count

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 0..255 (clamped, rounded to nearest), on the same device; uint8 images as
    they are."""
    if images.dtype == torch.uint8:
        return images
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
        in_channels, dim = check_count(in_channels, "in_channels"), check_count(dim, "dim")
        seed = check_count(seed, "seed", 0)
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
    """Features [N, F] (float64, CPU) of images [N, C, H, W] in [-1, 1] (or uint8), batched under ``torch.no_grad``
    with the extractor in eval mode (its mode is restored afterwards). Runs on ``device``, else the extractor's
    device."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', type(images))}")
    batch_size = check_count(batch_size, "batch_size")
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
                if batch.dtype == torch.uint8:
                    batch = batch.float() / 127.5 - 1.0
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
