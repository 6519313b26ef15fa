"""DDPM++-style U-Net backbone F(x_in, c_noise, class_labels) for EDM preconditioning.

Architecture (Song et al. 2021 "DDPM++", as configured in Karras et al. 2022 "EDM", config F for CIFAR-10).
With L = len(channel_mult) resolution levels r_l = img_resolution / 2^l:

* noise embedding: e = SiLU(W2 SiLU(W1 [cos(c f_k), sin(c f_k)]_k + b1) + b2) with frequencies
  f_k = (1/10000)^(k/(K-1)), k = 0..K-1, K = model_channels/2; a learned class vector is added to the sinusoidal
  features before the MLP when ``num_classes > 0``. Width of e: model_channels * channel_mult_emb.
* residual block: h = Conv3x3(SiLU(GN(x))) (resampled first in up/down blocks);
  h = Conv3x3(Dropout(SiLU(GN(h) + A e))); y = (h + skip(x)) / sqrt(2), skip = identity or a 1x1 conv
  (with the same resampling). "A e" is a per-channel additive shift (DDPM++ conditions by a shift only, no
  scale). The default ``variant="calmwild"`` adds it after the GroupNorm, GN(h) + A e, as ADM's adaptive GroupNorm
  does, so that it survives the normalisation when groups hold few channels (one channel per group in narrow
  nets); ``variant="edm"`` adds it before, GN(h + A e), as NVlabs/edm's SongUNet does.
  Optional self-attention afterwards: y = (y + P softmax(Q^T K / sqrt(C)) V) / sqrt(2) over the H*W positions.
* encoder: 3x3 stem conv, then per level (down block on levels > 0) ``num_blocks`` residual blocks;
  every encoder output is kept as a skip.
* decoder: at the lowest level a bottleneck pair (block with attention, block without); at other levels an
  up block; then ``num_blocks + 1`` residual blocks, each consuming one encoder skip by channel concatenation
  (attention on the last of them at attention resolutions).
* head: GN, SiLU, 3x3 conv to ``out_channels``; this conv starts at zero, so EDMPrecond(UNet) starts as
  D(x) = c_skip x.

Down/up-sampling is 2x2 average pooling / nearest-neighbour doubling (EDM's resample filter [1, 1]).
The CIFAR-10 configuration (the defaults) has 55.7M parameters like EDM's DDPM++.

GroupNorm (eps 1e-6) has, for C channels, the largest divisor of C that is at most 32 groups (``variant="calmwild"``)
or min(32, C // 4) groups (``variant="edm"``, SongUNet's rule). With ``variant="edm"`` the network computes exactly
the function of SongUNet's DDPM++ configuration once its weights are mapped (:mod:`calmwild.interop.edm`: the
mapping also reorders SongUNet's [sin, cos] embedding features and its interleaved q/k/v channels, and folds its
class-label bias into the label embedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from calmwild.checks import check_choice, check_count

_SKIP_SCALE = 1.0 / math.sqrt(2.0)


def count_parameters(module: nn.Module) -> int:
    """Total number of scalar parameters of ``module`` (trainable or not)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_parameters expects a torch.nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters())


VARIANTS = ("calmwild", "edm")
_EDM_MIN_CHANNELS_PER_GROUP = 4


def num_groups(channels: int, variant: str = "calmwild", max_groups: int = 32) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that is at most ``max_groups``
    (calmwild: 32 groups for every width that is a multiple of 32, fewer for small widths), or SongUNet's
    min(max_groups, channels // 4) (edm), which must divide ``channels``."""
    if variant == "edm":
        groups = min(max_groups, channels // _EDM_MIN_CHANNELS_PER_GROUP)
        if groups < 1 or channels % groups:
            raise ValueError(
                f"variant 'edm' needs GroupNorm widths divisible by min(32, C // 4); C = {channels} is not")
        return groups
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _group_norm(channels: int, variant: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels, variant), channels, eps=1e-6)


def _xavier(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    """Xavier-uniform weights times ``scale`` and zero bias (DDPM++ initialisation)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    if mode == "down":
        return F.avg_pool2d(x, kernel_size=2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal features [cos(c f_k), sin(c f_k)] of a scalar per sample, f_k = (1/max_positions)^(k/(K-1))
    (Vaswani et al. 2017, with EDM's endpoint-inclusive frequency grid). Output width ``num_channels`` (even)."""

    def __init__(self, num_channels: int, max_positions: float = 10_000.0):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels of the positional embedding must be even and >= 2, got {num_channels}")
        half = num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("freqs", (1.0 / max_positions) ** exponents, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = c.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """Residual block with an additive embedding shift, optional resampling and optional self-attention
    (see the module docstring for the formula)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        resample: str | None = None,
        attention: bool = False,
        variant: str = "calmwild",
    ):
        super().__init__()
        self.resample = resample
        self.emb_before_norm = variant == "edm"
        self.norm0 = _group_norm(in_channels, variant)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm1 = _group_norm(out_channels, variant)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        needs_proj = in_channels != out_channels or resample is not None
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if needs_proj else None
        _xavier(self.conv0)
        _xavier(self.emb_proj)
        _xavier(self.conv1, scale=1e-5)  # near-identity residual branch at initialisation (EDM's init_zero)
        if self.skip is not None:
            _xavier(self.skip)
        self.attn_norm = self.qkv = self.attn_out = None
        if attention:
            self.attn_norm = _group_norm(out_channels, variant)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.attn_out = nn.Conv2d(out_channels, out_channels, 1)
            _xavier(self.qkv, scale=math.sqrt(0.2))
            _xavier(self.attn_out, scale=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        shift = self.emb_proj(emb)[:, :, None, None]
        # calmwild shifts after the normalisation: with few channels per group (one, for narrow nets) a shift before
        # it would be largely or entirely normalised away; SongUNet (variant "edm") shifts before it
        h = self.norm1(h + shift) if self.emb_before_norm else self.norm1(h) + shift
        h = self.conv1(self.dropout(F.silu(h)))
        shortcut = _resample(x, self.resample)
        if self.skip is not None:
            shortcut = self.skip(shortcut)
        y = (h + shortcut) * _SKIP_SCALE
        if self.qkv is not None:
            y = (y + self._attend(y)) * _SKIP_SCALE
        return y

    def _attend(self, y: torch.Tensor) -> torch.Tensor:
        """Single-head self-attention over the H*W positions via scaled_dot_product_attention."""
        b, c, height, width = y.shape
        q, k, v = self.qkv(self.attn_norm(y)).reshape(b, 3, c, height * width).unbind(1)
        # [B, C, N] -> [B, 1, N, C]: one head, N = H*W tokens of width C
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return self.attn_out(out)


def _check_int_sequence(name: str, value: object, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    items = tuple(value)
    if not items and not allow_empty:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    for item in items:
        check_count(item, f"every entry of {name}")
    return items


class UNet(nn.Module):
    """DDPM++ U-Net F(x_in, c_noise, class_labels) -> [B, out_channels, H, W] (see the module docstring).

    Args:
        img_resolution: input height = width; divisible by 2^(len(channel_mult) - 1).
        in_channels, out_channels: image channels in and out (out defaults to in).
        model_channels: base width; level l has model_channels * channel_mult[l] channels.
        channel_mult: per-level width multipliers; one level per entry, halving the resolution between levels.
        num_blocks: residual blocks per level in the encoder (the decoder has num_blocks + 1).
        attn_resolutions: resolutions (among img_resolution / 2^l) whose blocks carry self-attention.
        dropout: dropout probability inside residual blocks, in [0, 1).
        num_classes: 0 for an unconditional net; otherwise integer labels in [0, num_classes) are required.
        channel_mult_emb: noise-embedding width = model_channels * channel_mult_emb.
        variant: ``calmwild`` (embedding shift after GroupNorm, groups = largest divisor <= 32) or ``edm``
            (NVlabs/edm's SongUNet DDPM++: shift before GroupNorm, groups = min(32, C // 4)); see the module docstring.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.13,
        num_classes: int = 0,
        channel_mult_emb: int = 4,
        variant: Literal["calmwild", "edm"] = "calmwild",
    ):
        super().__init__()
        check_choice(variant, "variant", VARIANTS)
        check_count(img_resolution, "img_resolution")
        check_count(in_channels, "in_channels")
        if out_channels is None:
            out_channels = in_channels
        check_count(out_channels, "out_channels")
        check_count(model_channels, "model_channels")
        if model_channels % 2:
            raise ValueError(f"model_channels must be even (sinusoidal embedding of width model_channels), "
                             f"got {model_channels}")
        channel_mult = _check_int_sequence("channel_mult", channel_mult, allow_empty=False)
        check_count(num_blocks, "num_blocks")
        attn_resolutions = _check_int_sequence("attn_resolutions", attn_resolutions, allow_empty=True)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
        check_count(channel_mult_emb, "channel_mult_emb")
        num_down = len(channel_mult) - 1
        if img_resolution % (2**num_down):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**{num_down}={2**num_down} "
                f"(the number of downsamplings for channel_mult={list(channel_mult)})"
            )
        resolutions = [img_resolution >> level for level in range(len(channel_mult))]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} are not among the resolutions the net visits {resolutions}")

        self.config = {
            "img_resolution": img_resolution,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": model_channels,
            "channel_mult": list(channel_mult),
            "num_blocks": num_blocks,
            "attn_resolutions": list(attn_resolutions),
            "dropout": float(dropout),
            "num_classes": num_classes,
            "channel_mult_emb": channel_mult_emb,
            "variant": variant,
        }
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.num_classes = num_classes

        emb_channels = model_channels * channel_mult_emb
        self.noise_features = PositionalEmbedding(model_channels)
        self.class_embed = nn.Embedding(num_classes, model_channels) if num_classes > 0 else None
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=math.sqrt(0.5))  # same RMS as the cos/sin features
        self.emb_mlp = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels), nn.SiLU()
        )
        _xavier(self.emb_mlp[0])
        _xavier(self.emb_mlp[2])

        def block(cin: int, cout: int, resample: str | None = None, attention: bool = False) -> ResBlock:
            return ResBlock(cin, cout, emb_channels, dropout, resample=resample, attention=attention, variant=variant)

        # encoder: every module's output is a skip for the decoder
        self.stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        _xavier(self.stem)
        self.encoder = nn.ModuleList()
        skip_channels = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.encoder.append(block(cout, cout, resample="down"))
                skip_channels.append(cout)
            for _ in range(num_blocks):
                self.encoder.append(block(cout, model_channels * mult,
                                          attention=resolutions[level] in attn_resolutions))
                cout = model_channels * mult
                skip_channels.append(cout)

        # decoder: blocks flagged True concatenate the most recent unused skip to their input
        self.decoder = nn.ModuleList()
        self._decoder_takes_skip: list[bool] = []
        for level in reversed(range(len(channel_mult))):
            if level == len(channel_mult) - 1:
                self.decoder.extend([block(cout, cout, attention=True), block(cout, cout)])
                self._decoder_takes_skip.extend([False, False])
            else:
                self.decoder.append(block(cout, cout, resample="up"))
                self._decoder_takes_skip.append(False)
            for idx in range(num_blocks + 1):
                attention = idx == num_blocks and resolutions[level] in attn_resolutions
                cin = cout + skip_channels.pop()
                cout = model_channels * channel_mult[level]
                self.decoder.append(block(cin, cout, attention=attention))
                self._decoder_takes_skip.append(True)

        self.head_norm = _group_norm(cout, variant)
        self.head_conv = nn.Conv2d(cout, out_channels, 3, padding=1)
        nn.init.zeros_(self.head_conv.weight)
        nn.init.zeros_(self.head_conv.bias)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, in_channels, R, R]; noise_labels: [B] (or a scalar, shared by the batch), EDM's c_noise;
        class_labels: LongTensor [B] in [0, num_classes) iff the net is class-conditional."""
        self._check_inputs(x, noise_labels, class_labels)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(x.shape[0])
        feats = self.noise_features(noise_labels)
        if self.class_embed is not None:
            feats = feats + self.class_embed(class_labels)
        emb = self.emb_mlp(feats)

        h = self.stem(x)
        skips = [h]
        for blk in self.encoder:
            h = blk(h, emb)
            skips.append(h)
        for blk, takes_skip in zip(self.decoder, self._decoder_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.head_conv(F.silu(self.head_norm(h)))

    def _check_inputs(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None
    ) -> None:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if not torch.is_tensor(noise_labels) or noise_labels.ndim > 1 or (
            noise_labels.ndim == 1 and noise_labels.shape[0] != x.shape[0]
        ):
            shape = list(noise_labels.shape) if torch.is_tensor(noise_labels) else type(noise_labels).__name__
            raise ValueError(f"noise_labels must be a tensor of shape [{x.shape[0]}] (or a scalar), got {shape}")
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this UNet is unconditional (num_classes=0) but class_labels were given")
            return
        if class_labels is None:
            raise ValueError(f"this UNet is class-conditional (num_classes={self.num_classes}); class_labels "
                             f"(LongTensor [B]) are required")
        if class_labels.dtype not in (torch.int64, torch.int32) or tuple(class_labels.shape) != (x.shape[0],):
            raise ValueError(f"class_labels must be an integer tensor of shape [{x.shape[0]}], got "
                             f"{class_labels.dtype} {list(class_labels.shape)}")
        if class_labels.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(class_labels.min()), int(class_labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got values in [{low}, {high}]")
