"""The calmwild checkpoint format: what a trained or imported network is on disk, read without running code.

Two containers hold the same content:

- a torch file (``.ckpt``, ``.pt``, any suffix but ``.safetensors``) as ``calmwild fit`` (Lightning) writes it:
  ``state_dict`` with the live weights under ``net.`` and the EMA weights under ``net_ema.``, the metadata under
  ``calmwild`` and, from a fit, Lightning's own entries (optimizer, loops, callbacks). It is read with
  ``torch.load(weights_only=True)`` only (:func:`calmwild.interop.safe_pickle.load_torch_file`): tensors and plain
  types; calmwild's checkpoints need nothing else, so no global is allow-listed.
- a ``.safetensors`` file: the same ``state_dict`` tensors under the same names and the metadata as JSON in the
  header's metadata field ``calmwild``; no pickle at all. It holds weights only (no optimizer state), so it can be
  sampled from and evaluated, not resumed.

Metadata, format_version 1: ``backbone`` (class path of the raw network; calmwild.unet.UNet when absent; see
:func:`backbone_class` for which classes are ever built from it), ``unet``
(the backbone's ``config``: its constructor keyword arguments), ``sigma_data``, ``image_shape`` [C, H, W],
``num_classes``, ``sample_class``; optionally ``sigma_sampler`` (what the network was trained with) and
``provenance`` (where an imported network came from).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from calmwild.interop.safe_pickle import UnsafeFileError, load_torch_file
from calmwild.io import atomic_write, to_jsonable
from calmwild.precond import EDMPrecond

FORMAT_VERSION = 1
EMA_PREFIX = "net_ema."
LIVE_PREFIX = "net."
SAFETENSORS_SUFFIX = ".safetensors"
DEFAULT_BACKBONE = "calmwild.unet.UNet"
BACKBONE_MODULES_ENV = "CALMWILD_BACKBONE_MODULES"
REQUIRED_METADATA = ("unet", "sigma_data", "image_shape")
EDM_PERSISTENCE_GLOBAL = "torch_utils.persistence._reconstruct_persistent_obj"


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix == SAFETENSORS_SUFFIX


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("calmwild")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        meta = json.loads(text) if text else None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its 'calmwild' metadata is not JSON ({err})") from None
    return {"state_dict": state, "calmwild": meta}


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict (``state_dict``, ``calmwild`` and whatever else it holds), with its
    metadata checked; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if is_safetensors(path):
        checkpoint = _read_safetensors(path)
    else:
        try:
            checkpoint = load_torch_file(path, map_location=map_location)
        except UnsafeFileError as err:
            if EDM_PERSISTENCE_GLOBAL in str(err):
                raise UnsafeFileError(f"{err}. It is an NVlabs/edm network pickle: convert it with `calmwild "
                                      f"import-edm {path} --out NAME.ckpt`, which reads it as data") from None
            raise
        except ValueError as err:
            if "not a readable torch file" in str(err):
                raise ValueError(str(err).replace("not a readable torch file", "not a torch checkpoint")) from None
            raise
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a checkpoint dict: it holds a {type(checkpoint).__name__}")
    check_metadata(checkpoint.get("calmwild"), path, sorted(checkpoint))
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path} has no 'state_dict' with the network weights")
    return checkpoint


def check_metadata(meta: Any, path: str | Path, keys: list[str] | None = None) -> dict:
    """The ``calmwild`` metadata entry of a checkpoint, checked: present, of this format version, complete."""
    if not isinstance(meta, dict):
        found = f", found keys {keys}" if keys is not None else ""
        raise ValueError(f"{path} is not a calmwild checkpoint: expected a 'calmwild' metadata entry{found}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has calmwild checkpoint format_version {version!r}; this version of calmwild reads "
                         f"format_version {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ValueError(f"{path}: the 'calmwild' metadata lacks {missing}")
    return meta


def trusted_backbone_modules() -> list[str]:
    """The modules whose classes a checkpoint may name as its backbone beside calmwild's own: the comma-separated
    module names in ``$CALMWILD_BACKBONE_MODULES`` (a name also covers its submodules)."""
    return [name.strip() for name in os.environ.get(BACKBONE_MODULES_ENV, "").split(",") if name.strip()]


def backbone_class(meta: dict, path: str | Path, trusted: Sequence[str] = ()) -> type[torch.nn.Module]:
    """The backbone class a checkpoint names. A file's say-so never decides what code runs: a class is imported
    only when it is calmwild's U-Net, one of the class paths in ``trusted`` (e.g. the one the user's config names),
    or in a module the user listed in ``$CALMWILD_BACKBONE_MODULES`` (:func:`trusted_backbone_modules`)."""
    name = meta.get("backbone", DEFAULT_BACKBONE)
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"{path}: its backbone {name!r} is not a class path such as {DEFAULT_BACKBONE}")
    module_name, _, class_name = name.rpartition(".")
    allowed = name == DEFAULT_BACKBONE or name in trusted or any(
        module_name == m or module_name.startswith(f"{m}.") for m in trusted_backbone_modules())
    if not allowed:
        raise ValueError(f"{path} was trained with the backbone {name}; calmwild builds a backbone a file names only "
                         f"from {DEFAULT_BACKBONE} or a module you trust: set {BACKBONE_MODULES_ENV}="
                         f"{module_name.split('.')[0]} (or name the class in the config's model.backbone)")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{path}: cannot import its backbone {name} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{path}: its backbone {name} is not a torch.nn.Module class")
    return cls


def backbone_config(meta: dict, path: str | Path, trusted: Sequence[str] = ()) -> dict:
    """The backbone config of a checkpoint with the constructor's defaults filled in for keys it does not record
    (written before the key existed), so configs of old and new checkpoints compare equal when they mean the same."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(backbone_class(meta, path, trusted)).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    return {**to_jsonable(defaults), **meta["unet"]}


def build_network(meta: dict, path: str | Path) -> EDMPrecond:
    """An untrained ``EDMPrecond(backbone)`` with the architecture the metadata describes."""
    cls = backbone_class(meta, path)
    try:
        backbone = cls(**meta["unet"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot build {cls.__name__} from the checkpoint's config {meta['unet']}: "
                         f"{err}") from err
    return EDMPrecond(backbone, float(meta["sigma_data"]))


def ema_weights(checkpoint: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The EMA network's state dict (keys without the ``net_ema.`` prefix)."""
    state = checkpoint["state_dict"]
    ema = {key[len(EMA_PREFIX):]: value for key, value in state.items() if key.startswith(EMA_PREFIX)}
    if not ema:
        raise ValueError(f"{path} holds no EMA weights (no state_dict key starts with {EMA_PREFIX!r})")
    return ema


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[EDMPrecond, dict]:
    """The EMA network of a checkpoint (eval mode, no gradients, on ``device``) and the checkpoint's metadata.
    The weights must match the architecture exactly: names and shapes."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint["calmwild"]
    ema_state = ema_weights(checkpoint, path)
    net = build_network(meta, path)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(ema_state)), sorted(set(ema_state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: EMA weights do not match the architecture in its metadata ({meta['unet']}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        net.load_state_dict(ema_state, strict=True)
    except RuntimeError as err:  # same names, different shapes
        raise ValueError(f"{path}: EMA weights do not match the architecture in its metadata: {err}") from err
    return net.to(device).eval().requires_grad_(False), meta


def network_state(net: EDMPrecond, ema: EDMPrecond | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint ``state_dict`` for a network: live weights under ``net.``, EMA weights (``ema``, default the
    same network) under ``net_ema.``, as a fit would write them."""
    ema = net if ema is None else ema
    state = {f"{LIVE_PREFIX}{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()}
    state.update({f"{EMA_PREFIX}{k}": v.detach().cpu().clone() for k, v in ema.state_dict().items()})
    return state


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict,
                     extra: dict[str, Any] | None = None) -> Path:
    """Writes a checkpoint atomically: a torch file (``extra`` entries beside ``state_dict`` and ``calmwild``, e.g.
    Lightning's ``global_step``) or, for a ``.safetensors`` path, the tensors and the metadata only."""
    path = Path(path)
    check_metadata(meta, path)
    meta = to_jsonable(meta)
    if is_safetensors(path):
        from safetensors.torch import save as save_bytes

        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        data = save_bytes(tensors, metadata={"calmwild": json.dumps(meta)})
        return atomic_write(path, lambda handle: handle.write(data))
    content = {**(extra or {}), "state_dict": dict(state_dict), "calmwild": meta}
    return atomic_write(path, lambda handle: torch.save(content, handle))


def convert_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Copies a checkpoint's weights and metadata into another container (``.ckpt`` <-> ``.safetensors``); the
    optimizer and training-loop state of a fit checkpoint are not carried into a ``.safetensors`` file."""
    checkpoint = read_checkpoint(source)
    extra = {"global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0))}
    return write_checkpoint(destination, checkpoint["state_dict"], checkpoint["calmwild"], extra=extra)
