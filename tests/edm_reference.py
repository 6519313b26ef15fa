"""An independent stand-in for NVlabs/edm in the tests: SongUNet's DDPM++ network written out as plain tensors in
EDM's pickle record format, and its forward pass as a plain function of those tensors.

Nothing here imports calmwild. The structure (module names, order, attributes) and the arithmetic follow
``training/networks.py`` of NVlabs/edm as described in calmwild's interop docs: [sin, cos] positional features,
label embedding ``Linear(onehot * sqrt(L))``, embedding added before GroupNorm with min(32, C // 4) groups and
eps 1e-6, resampling by the [1, 1] filter, q/k/v interleaved per channel, skip scale sqrt(1/2). During development
this reference was checked against EDM's own code (see the project notes); in the test suite it is the
independent computation the importer is compared with.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

SOURCE_PLACEHOLDER = "# the source of training/networks.py would be here\n"


class Rec:
    """A persistent EDM object to be pickled as torch_utils.persistence._reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name: str, params=None, buffers=None, modules=None, **attrs):
        self.class_name = class_name
        self.params = OrderedDict(params or {})
        self.buffers = OrderedDict(buffers or {})
        self.modules = OrderedDict(modules or {})
        self.attrs = attrs


def module_dict(modules) -> torch.nn.ModuleDict:
    """A torch.nn.ModuleDict shell holding records (pickled as that plain torch class, as EDM's enc / dec are)."""
    shell = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
    shell.__dict__.update(_state(types.SimpleNamespace(modules=OrderedDict(modules))))
    return shell


def children(shell: torch.nn.ModuleDict) -> dict:
    return shell.__dict__["_modules"]


def _state(node) -> dict:
    return {"training": False, "_parameters": {k: torch.nn.Parameter(v, requires_grad=False) if v is not None else None
                                               for k, v in getattr(node, "params", {}).items()},
            "_buffers": dict(getattr(node, "buffers", {})), "_non_persistent_buffers_set": set(),
            "_modules": dict(node.modules), **getattr(node, "attrs", {})}


def _linear(gen, fan_in, fan_out, bias=True, **attrs):
    params = {"weight": 0.3 * torch.randn(fan_out, fan_in, generator=gen)}
    params["bias"] = 0.1 * torch.randn(fan_out, generator=gen) if bias else None
    return Rec("Linear", params, in_features=fan_in, out_features=fan_out, **attrs)


def _conv(gen, cin, cout, kernel, up=False, down=False):
    params = {"weight": torch.randn(cout, cin, kernel, kernel, generator=gen) / math.sqrt(cin * kernel * kernel),
              "bias": 0.1 * torch.randn(cout, generator=gen)}
    buffers = {"resample_filter": torch.full((1, 1, 2, 2), 0.25) if up or down else None}
    return Rec("Conv2d", params, buffers, in_channels=cin, out_channels=cout, up=up, down=down, fused_resample=False)


def _norm(gen, channels):
    params = {"weight": 1 + 0.1 * torch.randn(channels, generator=gen),
              "bias": 0.1 * torch.randn(channels, generator=gen)}
    return Rec("GroupNorm", params, num_groups=min(32, channels // 4), eps=1e-6)


def _block(gen, cin, cout, emb, up=False, down=False, attention=False, dropout=0.1):
    mods = {"norm0": _norm(gen, cin), "conv0": _conv(gen, cin, cout, 3, up, down), "affine": _linear(gen, emb, cout),
            "norm1": _norm(gen, cout), "conv1": _conv(gen, cout, cout, 3)}
    if cout != cin or up or down:
        mods["skip"] = _conv(gen, cin, cout, 1, up, down)
    if attention:
        mods.update(norm2=_norm(gen, cout), qkv=_conv(gen, cout, 3 * cout, 1), proj=_conv(gen, cout, cout, 1))
    return Rec("UNetBlock", modules=mods, in_channels=cin, out_channels=cout, emb_channels=emb,
               num_heads=1 if attention else 0, dropout=dropout, skip_scale=np.float64(np.sqrt(0.5)),
               adaptive_scale=False)


def songunet(gen, img_resolution=8, in_channels=2, model_channels=16, channel_mult=(1, 2), num_blocks=1,
             attn_resolutions=(4,), label_dim=0, augment_dim=9, dropout=0.1) -> Rec:
    """A DDPM++ SongUNet record with random weights (every layer non-zero)."""
    emb = 4 * model_channels
    enc, dec = OrderedDict(), OrderedDict()
    cout = model_channels
    enc[f"{img_resolution}x{img_resolution}_conv"] = _conv(gen, in_channels, cout, 3)
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level > 0:
            enc[f"{res}x{res}_down"] = _block(gen, cout, cout, emb, down=True, dropout=dropout)
        for idx in range(num_blocks):
            enc[f"{res}x{res}_block{idx}"] = _block(gen, cout, model_channels * mult, emb,
                                                   attention=res in attn_resolutions, dropout=dropout)
            cout = model_channels * mult
    skips = [r.attrs["out_channels"] for r in enc.values()]
    for level in reversed(range(len(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = _block(gen, cout, cout, emb, attention=True, dropout=dropout)
            dec[f"{res}x{res}_in1"] = _block(gen, cout, cout, emb, dropout=dropout)
        else:
            dec[f"{res}x{res}_up"] = _block(gen, cout, cout, emb, up=True, dropout=dropout)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
            dec[f"{res}x{res}_block{idx}"] = _block(gen, cin, cout, emb, dropout=dropout,
                                                   attention=idx == num_blocks and res in attn_resolutions)
        if level == 0:
            dec[f"{res}x{res}_aux_norm"] = _norm(gen, cout)
            dec[f"{res}x{res}_aux_conv"] = _conv(gen, cout, in_channels, 3)
    mods = {"map_noise": Rec("PositionalEmbedding", num_channels=model_channels, max_positions=10000, endpoint=True),
            "map_label": _linear(gen, label_dim, model_channels) if label_dim else None,
            "map_augment": _linear(gen, augment_dim, model_channels, bias=False) if augment_dim else None,
            "map_layer0": _linear(gen, model_channels, emb), "map_layer1": _linear(gen, emb, emb),
            "enc": module_dict(enc), "dec": module_dict(dec)}
    absent = {name: None for name, mod in mods.items() if mod is None}  # torch keeps a None module as an attribute
    return Rec("SongUNet", modules={k: v for k, v in mods.items() if v is not None}, label_dropout=0, **absent,
               _init_kwargs=dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=in_channels,
                                 label_dim=label_dim, augment_dim=augment_dim, model_channels=model_channels,
                                 channel_mult=list(channel_mult), num_blocks=num_blocks,
                                 attn_resolutions=list(attn_resolutions), dropout=dropout))


def edm_precond(model: Rec, sigma_data: float = 0.5) -> Rec:
    kw = model.attrs["_init_kwargs"]
    return Rec("EDMPrecond", modules={"model": model}, img_resolution=kw["img_resolution"],
               img_channels=kw["in_channels"], label_dim=kw["label_dim"], use_fp16=False, sigma_min=0,
               sigma_max=float("inf"), sigma_data=sigma_data,
               _init_kwargs=dict(img_resolution=kw["img_resolution"], img_channels=kw["in_channels"],
                                 label_dim=kw["label_dim"], model_type="SongUNet"))


# ---------------------------------------------------------------------------------------------- writing pickles


def _fake_persistence_module():
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by calmwild
        raise AssertionError("EDM's loader would run here")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    return package, module


def write_edm_pickle(path, content: dict, module_src: str = SOURCE_PLACEHOLDER) -> None:
    """Pickles ``content`` (records anywhere inside) the way EDM's persistence does; ``module_src`` is the source each
    record carries (EDM's loader would exec it)."""
    package, module = _fake_persistence_module()
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, module

    class EDMPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, Rec):
                meta = dict(type="class", version=6, module_src=module_src, class_name=obj.class_name,
                            state=_state(obj))
                return module._reconstruct_persistent_obj, (meta,)
            return NotImplemented

    try:
        with open(path, "wb") as handle:
            EDMPickler(handle, protocol=4).dump(content)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


# ---------------------------------------------------------------------------------------------- the forward pass


def _gn(x, rec):
    return F.group_norm(x, rec.attrs["num_groups"], rec.params["weight"], rec.params["bias"], eps=rec.attrs["eps"])


def _apply_conv(x, rec):
    channels = x.shape[1]
    if rec.attrs["up"]:
        x = F.conv_transpose2d(x, torch.ones(channels, 1, 2, 2), stride=2, groups=channels)
    if rec.attrs["down"]:
        x = F.conv2d(x, torch.full((channels, 1, 2, 2), 0.25), stride=2, groups=channels)
    w = rec.params["weight"]
    return F.conv2d(x, w, rec.params["bias"], padding=w.shape[-1] // 2)


def _apply_linear(x, rec):
    out = x @ rec.params["weight"].T
    return out + rec.params["bias"] if rec.params.get("bias") is not None else out


def _apply_block(x, emb, rec):
    m = rec.modules
    h = _apply_conv(F.silu(_gn(x, m["norm0"])), m["conv0"])
    h = F.silu(_gn(h + _apply_linear(emb, m["affine"])[:, :, None, None], m["norm1"]))
    h = _apply_conv(h, m["conv1"])
    x = (h + (_apply_conv(x, m["skip"]) if "skip" in m else x)) * math.sqrt(0.5)
    if "qkv" in m:
        b, c, height, width = x.shape
        q, k, v = _apply_conv(_gn(x, m["norm2"]), m["qkv"]).reshape(b, c, 3, height * width).unbind(2)
        weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
        attended = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, height, width)
        x = (_apply_conv(attended, m["proj"]) + x) * math.sqrt(0.5)
    return x


def songunet_forward(model: Rec, x, noise_labels, class_labels=None):
    """SongUNet(x, c_noise, one-hot labels) in the DDPM++ configuration, computed from the record's tensors."""
    m = model.modules
    half = m["map_noise"].attrs["num_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = noise_labels[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # EDM swaps its [cos, sin] halves
    if m.get("map_label") is not None:
        emb = emb + _apply_linear(class_labels * math.sqrt(class_labels.shape[1]), m["map_label"])
    emb = F.silu(_apply_linear(F.silu(_apply_linear(emb, m["map_layer0"])), m["map_layer1"]))
    skips = []
    for name, rec in children(m["enc"]).items():
        x = _apply_conv(x, rec) if name.endswith("_conv") else _apply_block(x, emb, rec)
        skips.append(x)
    out = None
    for name, rec in children(m["dec"]).items():
        if name.endswith("_aux_norm"):
            out = _gn(x, rec)
        elif name.endswith("_aux_conv"):
            out = _apply_conv(F.silu(out), rec)
        else:
            if x.shape[1] != rec.attrs["in_channels"]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = _apply_block(x, emb, rec)
    return out


def edm_denoise(precond: Rec, x, sigma, class_labels=None):
    """EDMPrecond: D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4) (Karras et al. 2022, Table 1)."""
    sd = precond.attrs["sigma_data"]
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
    return c_skip * x + c_out * songunet_forward(precond.modules["model"], c_in * x, sigma.log() / 4, class_labels)
