"""Reference sets for FID and KID: what :attr:`calmwild.settings.FIDSettings.reference` names, turned into feature
statistics (:class:`calmwild.fid.ReferenceStats`).

A reference is one of:

- ``train`` or ``heldout``: a set of the datamodule (the caller passes the images; a config may also point the FID
  callback at another datamodule, e.g. the paper's 5k training cars for the 2k-car runs);
- a folder of images, loaded at the samples' resolution and channel count (centre-cropped to a square);
- a ``.npz`` file of statistics with arrays ``mu`` [F] and ``sigma`` [F, F], the format of NVlabs/edm's and
  ADM's reference files (Inception-2048 features); FID only, since KID needs the features themselves. It is read
  with ``allow_pickle=False``: no code runs;
- ``torch-fidelity:<name>``: a dataset registered with torch-fidelity (``cifar10-train``, ``cifar10-val``,
  ``stl10-train``, ... or one registered with ``torch_fidelity.register_dataset``), fetched by torch-fidelity into
  ``datasets_root`` (default ``$TORCH_HOME/fidelity_datasets``, torch-fidelity's own) when absent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calmwild.features import extract_features, extractor_identity
from calmwild.fid import STATISTICS_FILE_PREFIX, ReferenceStats, reference_statistics

SPLITS = ("train", "heldout")
TORCH_FIDELITY_PREFIX = "torch-fidelity:"
EXPECTED = "train, heldout, a folder of images, a .npz of statistics (mu, sigma) or torch-fidelity:<registered name>"


def reference_kind(reference: str) -> str:
    """``split``, ``npz``, ``torch-fidelity`` or ``folder`` for a valid reference; a ValueError naming the reference
    and what is accepted otherwise (a missing file or folder is named)."""
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"FID reference {reference!r}: expected {EXPECTED}")
    if reference in SPLITS:
        return "split"
    if reference.startswith(TORCH_FIDELITY_PREFIX):
        if not reference[len(TORCH_FIDELITY_PREFIX):]:
            raise ValueError(f"FID reference {reference!r}: name the torch-fidelity dataset, e.g. "
                             f"{TORCH_FIDELITY_PREFIX}cifar10-train")
        return "torch-fidelity"
    path = Path(reference).expanduser()
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"FID reference {reference}: no such statistics file")
        return "npz"
    if path.is_dir():
        return "folder"
    raise ValueError(f"FID reference {reference!r} is neither a set name nor an existing folder; expected {EXPECTED}")


def read_statistics_file(path: str | Path) -> ReferenceStats:
    """The statistics of a ``.npz`` reference file (``mu`` [F], ``sigma`` [F, F]; NVlabs/edm's format), read
    without pickle. Its feature space is not recorded in the file: it is named ``file:<name>`` and only its
    dimension can be checked against the samples'."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key], np.float64) for key in ("mu", "sigma") if key in data}
    except (OSError, ValueError) as err:
        raise ValueError(f"FID reference {path} is not a readable .npz file ({err})") from None
    if set(arrays) != {"mu", "sigma"}:
        raise ValueError(f"FID reference {path} must hold arrays 'mu' and 'sigma' (NVlabs/edm's format), "
                         f"found {sorted(arrays)}")
    mu, cov = arrays["mu"].reshape(-1), arrays["sigma"]
    if cov.shape != (mu.shape[0], mu.shape[0]) or not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise ValueError(f"FID reference {path}: 'sigma' must be a finite [{mu.shape[0]}, {mu.shape[0]}] covariance "
                         f"matching 'mu', got {cov.shape}")
    key = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ReferenceStats(mu, cov, None, f"{STATISTICS_FILE_PREFIX}{path.name}", key, None)


def torch_fidelity_images(name: str, datasets_root: str | Path | None = None, timeout: float = 30.0) -> torch.Tensor:
    """The images of a dataset registered with torch-fidelity as uint8 [N, 3, H, W]; a download that cannot happen
    is a ConnectionError naming the dataset and where to put it."""
    import torch_fidelity.registry as registry

    from calmwild.data.download import download_or_explain

    if name not in registry.DATASETS_REGISTRY:
        raise ValueError(f"FID reference {TORCH_FIDELITY_PREFIX}{name}: torch-fidelity has no dataset {name!r}; "
                         f"registered: {sorted(registry.DATASETS_REGISTRY)}")
    root = Path(datasets_root) if datasets_root is not None else Path(torch.hub.get_dir()).parent / "fidelity_datasets"
    root.mkdir(parents=True, exist_ok=True)
    found: dict[str, object] = {}

    def fetch() -> None:
        found["dataset"] = registry.DATASETS_REGISTRY[name](str(root), True)

    download_or_explain(fetch, f"torch-fidelity's {name}", str(root), timeout,
                        f"Place the dataset's files under {root} (torch-fidelity's datasets_root) on a machine without "
                        "network access, or use another FID reference.")
    dataset = found["dataset"]
    images = [torch.as_tensor(dataset[i]) for i in range(len(dataset))]
    if not images or any(image.dtype != torch.uint8 or image.ndim != 3 for image in images[:1]):
        raise ValueError(f"torch-fidelity's {name} must yield uint8 images [3, H, W]")
    return torch.stack(images)


def folder_images(folder: str | Path, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The images of a folder at the samples' shape (C, H, W): centre-cropped, resized, grayscale when C = 1."""
    from calmwild.data.files import list_image_files, load_image_files

    channels, resolution = image_shape[0], image_shape[1]
    return load_image_files(list_image_files(folder), resolution=resolution, grayscale=channels == 1,
                            center_crop=True)


def load_reference(
    reference: str,
    extractor: nn.Module,
    splits: dict[str, torch.Tensor],
    image_shape: tuple[int, int, int],
    cache_dir: str | Path | None,
    datasets_root: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> ReferenceStats:
    """The statistics of ``reference`` (see the module docstring) in the extractor's feature space; image sets are
    cached in ``cache_dir`` under their content key (:func:`calmwild.fid.reference_statistics`). ``splits`` holds
    the images the set names refer to (``train``, ``heldout``)."""
    kind = reference_kind(reference)
    if kind == "npz":
        stats = read_statistics_file(reference)
        dim = _feature_dim(extractor, image_shape, device)
        if stats.mu.shape[0] != dim:
            raise ValueError(f"FID reference {reference} holds {stats.mu.shape[0]}-d statistics but the feature "
                             f"extractor {extractor_identity(extractor)} gives {dim}-d features")
        return stats
    if kind == "split":
        if reference not in splits:
            raise ValueError(f"FID reference {reference!r}: this evaluation has no {reference} images")
        images, name = splits[reference], reference
    elif kind == "torch-fidelity":
        name = reference[len(TORCH_FIDELITY_PREFIX):]
        images = torch_fidelity_images(name, datasets_root)
        name = f"torch-fidelity-{name}"
    else:
        images, name = folder_images(reference, image_shape), f"folder-{Path(reference).name}"
    return reference_statistics(images, extractor, cache_dir, name=name, batch_size=batch_size, device=device)


def _feature_dim(extractor: nn.Module, image_shape: tuple[int, int, int], device: torch.device | str | None) -> int:
    """The feature dimension of ``extractor`` for images of ``image_shape`` (one zero image through it)."""
    return int(extract_features(torch.zeros((1, *image_shape)), extractor, device=device).shape[1])
