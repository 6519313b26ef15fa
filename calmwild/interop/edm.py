"""NVlabs/edm network pickles as calmwild checkpoints, read as data: no line of the code they embed runs.

An EDM network pickle (their released ``edm-*.pkl`` files and their training snapshots ``network-snapshot-*.pkl``)
is a ``pickle`` of ``dict(ema=<network>, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``. Each network object
is stored by ``torch_utils.persistence`` as the call ``_reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version, module_src, class_name, state)``: ``module_src`` is the Python source of the
module that defined the class (EDM's own loader executes it), ``state`` the object's ``__dict__`` (its
``_parameters``, ``_buffers``, ``_modules`` and attributes such as ``num_groups``). Tensors are rebuilt by torch's
``_rebuild_tensor_v2`` / ``_rebuild_parameter`` from storages that plain pickle keeps as small torch files.

:func:`read_edm_pickle` reads such a file with :class:`~calmwild.interop.safe_pickle.RestrictedUnpickler`: the
persistence call becomes a :class:`PersistentRecord` (class name, state, and only the SHA-256 of ``module_src``),
plain torch containers (``ModuleDict``) become :class:`ModuleRecord`, tensors come from torch's rebuild functions
(storages through ``torch.load(weights_only=True)``), numpy scalars from numpy's; any other global is refused by
name.

:func:`songunet_to_unet` maps an ``EDMPrecond(SongUNet)`` record in the DDPM++ configuration (positional noise
embedding, standard encoder and decoder, resample filter [1, 1]) onto :class:`calmwild.unet.UNet` with
``variant="edm"``, which computes the same function:

- the embedding MLP's first layer takes SongUNet's [sin, cos] features; calmwild's are [cos, sin], so the layer's
  input columns are swapped half for half;
- SongUNet's class labels enter as ``map_label(onehot * sqrt(label_dim))`` with a bias; calmwild's label embedding
  row l holds ``sqrt(label_dim) W[:, l] + b`` (halves swapped likewise);
- SongUNet's ``qkv`` convolution interleaves q, k, v per channel (output 3c + j); calmwild's stacks them
  (output j C + c), so its rows are reordered;
- everything else maps one to one in the order of SongUNet's encoder and decoder dictionaries, with every
  attribute that decides the function checked (GroupNorm groups and eps, shift-only conditioning, skip scale
  sqrt(1/2), one attention head, the [1, 1] resampling filter) and every tensor's shape.

The augmentation-label layer (``map_augment``) is used by EDM only during training with augmentation (sampling
passes no augmentation labels); it is left out and named in the provenance. NCSN++ (``-ve`` files: Fourier
embedding, residual encoder, [1, 3, 3, 1] filter) and ADM (``DhariwalUNet``) are refused by name.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calmwild.interop.safe_pickle import NUMPY_GLOBALS, restricted_load, torch_storage_from_bytes

EDM_RECORD_VERSION = 6  # torch_utils.persistence._version of every released EDM file
SUPPORTED_PRECOND = "EDMPrecond"
SUPPORTED_MODEL = "SongUNet"


@dataclass
class PersistentRecord:
    """One ``torch_utils.persistence`` object, as data: the class it names, its state, and the fingerprint of the
    source code it carries (the code itself is discarded unread)."""

    class_name: str
    version: int
    source_sha256: str
    state: dict = field(repr=False)


class ModuleRecord:
    """A plain torch module class (``torch.nn.ModuleDict``) named by the pickle, as data: ``state`` is its
    ``__dict__``."""

    class_path = ""

    def __setstate__(self, state: dict) -> None:
        self.state = state


class ModuleDictRecord(ModuleRecord):
    class_path = "torch.nn.modules.container.ModuleDict"


def _persistent_record(meta: Any) -> PersistentRecord:
    """Stands in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the data, never the code."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise ValueError(f"an EDM persistence record must be dict(type='class', ..., state=dict), got {meta!r:.80}")
    source = meta.get("module_src")
    digest = hashlib.sha256(source.encode()).hexdigest() if isinstance(source, str) else ""
    return PersistentRecord(str(meta.get("class_name")), int(meta.get("version", -1)), digest, meta["state"])


EDM_PICKLE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): torch_storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("collections", "OrderedDict"): OrderedDict,
    **NUMPY_GLOBALS,
}


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of an EDM network pickle, networks as :class:`PersistentRecord`; see the module
    docstring for what is allowed and what is refused."""
    content = restricted_load(path, EDM_PICKLE_GLOBALS)
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not an EDM network pickle: it holds a {type(content).__name__}, expected the "
                         "dict that EDM's training loop writes (keys such as 'ema')")
    return content


def _modules(record: PersistentRecord | ModuleRecord) -> dict[str, Any]:
    return dict(record.state.get("_modules") or {})


def _attr(record: PersistentRecord, name: str) -> Any:
    value = record.state.get(name)
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def tensors_of(record: PersistentRecord | ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a record tree under their ``state_dict`` names."""
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in _modules(record).items():
        if child is not None:
            out.update(tensors_of(child, f"{prefix}{name}."))
    return out


# ---------------------------------------------------------------------------------------------- SongUNet -> UNet
class _Mapping:
    """Collects calmwild tensors from SongUNet tensors, checking shapes and that every source tensor is used."""

    def __init__(self, source: dict[str, torch.Tensor], where: str):
        self.source, self.where = source, where
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if name not in self.source:
            raise ValueError(f"{self.where}: SongUNet tensor {name!r} is missing")
        self.used.add(name)
        return self.source[name].to(torch.float32)

    def put(self, name: str, value: torch.Tensor) -> None:
        self.out[name] = value.contiguous()

    def copy(self, dst: str, src: str) -> None:
        self.put(dst, self.take(src))

    def layer(self, dst: str, src: str) -> None:
        self.copy(f"{dst}.weight", f"{src}.weight")
        if f"{src}.bias" in self.source:
            self.copy(f"{dst}.bias", f"{src}.bias")


def _swap_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = t.shape[dim] // 2
    return torch.cat([t.narrow(dim, half, t.shape[dim] - half), t.narrow(dim, 0, half)], dim=dim)


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {what}; calmwild reproduces SongUNet's DDPM++ configuration only")


def _check_block(block: PersistentRecord, name: str, where: str) -> None:
    from calmwild.unet import num_groups

    _check(block.class_name == "UNetBlock", where, f"{name} is a {block.class_name}, expected a UNetBlock")
    _check(not _attr(block, "adaptive_scale"), where, f"{name} uses adaptive scale (ADM-style conditioning)")
    _check(math.isclose(float(_attr(block, "skip_scale")), math.sqrt(0.5), rel_tol=1e-12), where,
           f"{name} has skip scale {_attr(block, 'skip_scale')}, expected sqrt(1/2)")
    _check(_attr(block, "num_heads") in (0, 1), where, f"{name} has {_attr(block, 'num_heads')} attention heads")
    mods = _modules(block)
    for norm_name in ("norm0", "norm1", "norm2"):
        norm = mods.get(norm_name)
        if norm is None:
            continue
        channels = int(norm.state["_parameters"]["weight"].numel())
        _check(_attr(norm, "num_groups") == num_groups(channels, "edm") and float(_attr(norm, "eps")) == 1e-6,
               where, f"{name}.{norm_name} has {_attr(norm, 'num_groups')} groups, eps {_attr(norm, 'eps')}")
    for conv_name in ("conv0", "skip"):
        conv = mods.get(conv_name)
        if conv is None or not (_attr(conv, "up") or _attr(conv, "down")):
            continue
        _check(not _attr(conv, "fused_resample"), where, f"{name}.{conv_name} uses fused resampling")
        filt = conv.state["_buffers"].get("resample_filter")
        _check(filt is not None and filt.shape[-2:] == (2, 2) and torch.allclose(filt, torch.full_like(filt, 0.25)),
               where, f"{name}.{conv_name} resamples with a filter other than [1, 1]")


def _songunet_config(model: PersistentRecord, where: str) -> dict[str, Any]:
    """calmwild UNet keyword arguments equivalent to a SongUNet record, read from its structure (not from EDM's
    defaults), with every decisive attribute checked."""
    from calmwild.unet import num_groups

    mods = _modules(model)
    noise = mods.get("map_noise")
    _check(noise is not None and noise.class_name == "PositionalEmbedding", where,
           f"the noise embedding is {getattr(noise, 'class_name', None)} (NCSN++ uses FourierEmbedding)")
    _check(bool(_attr(noise, "endpoint")) and float(_attr(noise, "max_positions")) == 10000.0, where,
           "the positional embedding is not endpoint-inclusive with max_positions 10000")
    enc, dec = _modules(mods["enc"]), _modules(mods["dec"])
    stem_name = next(iter(enc))
    _check(stem_name.endswith("_conv"), where, f"the encoder starts with {stem_name}, expected a 3x3 conv")
    resolution = int(stem_name.split("x")[0])
    model_channels = int(_attr(enc[stem_name], "out_channels"))
    _check(int(_attr(noise, "num_channels")) == model_channels, where,
           "the noise embedding width differs from model_channels (channel_mult_noise != 1)")
    for name in list(enc) + list(dec):
        _check("aux" not in name or name.endswith(("_aux_norm", "_aux_conv")), where,
               f"{name} belongs to a skip/residual encoder or decoder")
    levels: dict[int, list[PersistentRecord]] = {}  # resolution -> its residual blocks, in encoder order
    for name, block in enc.items():
        if name == stem_name:
            continue
        _check_block(block, f"enc.{name}", where)
        if "_block" in name:
            levels.setdefault(int(name.split("x")[0]), []).append(block)
    for name, block in dec.items():
        if name.endswith("_aux_norm"):
            channels = int(block.state["_parameters"]["weight"].numel())
            _check(_attr(block, "num_groups") == num_groups(channels, "edm") and float(_attr(block, "eps")) == 1e-6,
                   where, f"dec.{name} has {_attr(block, 'num_groups')} groups, eps {_attr(block, 'eps')}")
        elif not name.endswith("_aux_conv"):
            _check_block(block, f"dec.{name}", where)
    counts = {len(blocks) for blocks in levels.values()}
    _check(len(counts) == 1, where, f"levels have different block counts {sorted(counts)}")
    _check(list(levels) == [resolution >> level for level in range(len(levels))], where,
           f"the encoder visits resolutions {list(levels)}, not successive halvings of {resolution}")
    channel_mult = [int(_attr(blocks[-1], "out_channels")) // model_channels for blocks in levels.values()]
    attn = sorted((res for res, blocks in levels.items() if _attr(blocks[0], "num_heads")), reverse=True)
    label = mods.get("map_label")
    emb_channels = int(mods["map_layer0"].state["_parameters"]["weight"].shape[0])
    first_block = next(b for n, b in enc.items() if n != stem_name)
    return {
        "img_resolution": resolution,
        "in_channels": int(_attr(enc[stem_name], "in_channels")),
        "out_channels": int(
            dec[next(n for n in dec if n.endswith("_aux_conv"))].state["_parameters"]["weight"].shape[0]),
        "model_channels": model_channels,
        "channel_mult": channel_mult,
        "num_blocks": counts.pop(),
        "attn_resolutions": attn,
        "dropout": float(_attr(first_block, "dropout")),
        "num_classes": 0 if label is None else int(label.state["_parameters"]["weight"].shape[1]),
        "channel_mult_emb": emb_channels // model_channels,
        "variant": "edm",
    }


def _map_block(m: _Mapping, dst: str, src: str, channels: int) -> None:
    for ours, theirs in (("norm0", "norm0"), ("conv0", "conv0"), ("emb_proj", "affine"), ("norm1", "norm1"),
                         ("conv1", "conv1"), ("attn_norm", "norm2"), ("attn_out", "proj")):
        if f"{src}.{theirs}.weight" in m.source:
            m.layer(f"{dst}.{ours}", f"{src}.{theirs}")
    if f"{src}.skip.weight" in m.source:
        m.layer(f"{dst}.skip", f"{src}.skip")
    if f"{src}.qkv.weight" in m.source:  # SongUNet's output channel 3 c + j is calmwild's j C + c
        weight, bias = m.take(f"{src}.qkv.weight"), m.take(f"{src}.qkv.bias")
        m.put(f"{dst}.qkv.weight", weight.reshape(channels, 3, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape))
        m.put(f"{dst}.qkv.bias", bias.reshape(channels, 3).T.reshape(-1))
    for key in list(m.source):
        if key.startswith(f"{src}.") and key.endswith(".resample_filter"):
            m.used.add(key)  # checked to be the [1, 1] filter that calmwild's resampling computes


def songunet_to_unet(model: PersistentRecord, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """(UNet config, UNet state dict, dropped SongUNet tensors) for a SongUNet record in the DDPM++ configuration."""
    from calmwild.unet import UNet

    _check(model.class_name == SUPPORTED_MODEL, where,
           f"the network is {model.class_name} (ADM's DhariwalUNet and other architectures are not mapped)")
    config = _songunet_config(model, where)
    source = tensors_of(model)
    m = _Mapping(source, where)
    m.put("emb_mlp.0.weight", _swap_halves(m.take("map_layer0.weight"), dim=1))
    m.copy("emb_mlp.0.bias", "map_layer0.bias")
    m.layer("emb_mlp.2", "map_layer1")
    if config["num_classes"]:
        weight, bias = m.take("map_label.weight"), m.take("map_label.bias")
        rows = math.sqrt(config["num_classes"]) * weight.T + bias  # the label embedding of each class
        m.put("class_embed.weight", _swap_halves(rows, dim=1))
    enc, dec = _modules(_modules(model)["enc"]), _modules(_modules(model)["dec"])
    names = list(enc)
    m.layer("stem", f"enc.{names[0]}")
    for i, name in enumerate(names[1:]):
        _map_block(m, f"encoder.{i}", f"enc.{name}", int(_attr(enc[name], "out_channels")))
    blocks = [n for n in dec if not n.endswith(("_aux_norm", "_aux_conv"))]
    for i, name in enumerate(blocks):
        _map_block(m, f"decoder.{i}", f"dec.{name}", int(_attr(dec[name], "out_channels")))
    m.layer("head_norm", f"dec.{next(n for n in dec if n.endswith('_aux_norm'))}")
    m.layer("head_conv", f"dec.{next(n for n in dec if n.endswith('_aux_conv'))}")

    dropped = sorted(k for k in source if k.startswith("map_augment."))
    m.used.update(dropped)
    unused = sorted(set(source) - m.used)
    _check(not unused, where, f"SongUNet tensors {unused[:4]} have no place in the mapping")
    expected = UNet(**config).state_dict()
    missing = sorted(set(expected) - set(m.out))
    _check(not missing, where, f"UNet tensors {missing[:4]} received no SongUNet tensor")
    for key, value in m.out.items():
        _check(key in expected and tuple(value.shape) == tuple(expected[key].shape), where,
               f"{key} has shape {tuple(value.shape)}, the UNet expects "
               f"{tuple(expected.get(key, torch.empty(0)).shape)}")
    return config, m.out, dropped


# ---------------------------------------------------------------------------------------------- whole files
def _plain(value: Any) -> Any:
    """JSON-able view of recorded constructor arguments (records and tensors are summarised)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return repr(value)[:80]


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def edm_checkpoint(path: str | Path, network: str = "ema", sample_class: int | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The calmwild checkpoint content (``state_dict`` of the network, metadata with provenance) of the network
    ``network`` ('ema' by default) in the EDM pickle at ``path``. A class-conditional network needs the class to
    sample (``sample_class``), as every calmwild network denoiser serves one class."""
    from calmwild.checkpoints import DEFAULT_BACKBONE, FORMAT_VERSION, network_state
    from calmwild.precond import EDMPrecond
    from calmwild.unet import UNet

    path = Path(path)
    content = read_edm_pickle(path)
    if network not in content or not isinstance(content[network], PersistentRecord):
        found = sorted(k for k, v in content.items() if isinstance(v, PersistentRecord))
        raise ValueError(f"{path} holds no network {network!r}; its networks are {found}")
    precond = content[network]
    where = f"{path} [{network}]"
    _check(precond.version == EDM_RECORD_VERSION, where,
           f"its persistence records have version {precond.version}, expected {EDM_RECORD_VERSION}")
    _check(precond.class_name == SUPPORTED_PRECOND, where,
           f"the network is wrapped in {precond.class_name} (only EDM's own preconditioning, EDMPrecond, is mapped)")
    model = _modules(precond).get("model")
    _check(isinstance(model, PersistentRecord), where, "EDMPrecond holds no 'model' network")
    config, unet_state, dropped = songunet_to_unet(model, where)
    if config["num_classes"] and sample_class is None:
        raise ValueError(f"{where} is class-conditional ({config['num_classes']} classes): give the class to sample "
                         f"(sample_class, 0..{config['num_classes'] - 1})")
    if sample_class is not None and not 0 <= sample_class < max(config["num_classes"], 1):
        raise ValueError(f"sample_class {sample_class} is not a class of this network "
                         f"({config['num_classes']} classes)")
    net = EDMPrecond(UNet(**config), float(_attr(precond, "sigma_data")))
    net.backbone.load_state_dict(unet_state, strict=True)
    resolution, channels = int(_attr(precond, "img_resolution")), int(_attr(precond, "img_channels"))
    meta = {
        "format_version": FORMAT_VERSION,
        "backbone": DEFAULT_BACKBONE,
        "unet": config,
        "sigma_data": float(_attr(precond, "sigma_data")),
        "image_shape": [channels, resolution, resolution],
        "num_classes": config["num_classes"],
        "sample_class": sample_class if config["num_classes"] else None,
        "provenance": {
            "imported_from": "NVlabs/edm network pickle",
            "file": path.name,
            "sha256": sha256_of(path),
            "network": network,
            "precond": precond.class_name,
            "precond_kwargs": _plain(precond.state.get("_init_kwargs")),
            "model": model.class_name,
            "model_kwargs": _plain(model.state.get("_init_kwargs")),
            "sigma_min": _plain(_attr(precond, "sigma_min")),
            "sigma_max": _plain(_attr(precond, "sigma_max")),
            "use_fp16": bool(_attr(precond, "use_fp16")),
            "module_src_sha256": model.source_sha256,
            "dropped": dropped,
        },
    }
    return network_state(net), meta


def import_edm_network(path: str | Path, out: str | Path, network: str = "ema",
                       sample_class: int | None = None) -> dict[str, Any]:
    """Writes the network of an EDM pickle as a calmwild checkpoint at ``out`` (``.ckpt`` or ``.safetensors``) and
    returns its metadata."""
    from calmwild.checkpoints import write_checkpoint

    state, meta = edm_checkpoint(path, network=network, sample_class=sample_class)
    write_checkpoint(out, state, meta, extra={"global_step": 0, "epoch": 0})
    return meta
