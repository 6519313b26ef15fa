"""The network itself: forward + backward of calmwild's ``EDMPrecond(UNet(variant="edm"))`` against NVlabs/edm's own
``EDMPrecond(SongUNet)`` of the same DDPM++ configuration (the function calmwild's import reproduces to 3e-6,
``scripts/check_edm_parity.py``), on the same batch, timed side by side.

EDM's code is imported from ``--edm-repo`` (a checkout of github.com/NVlabs/edm) at run time only; without it the
peer is skipped with a note and only calmwild's own rate is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from calmwild.precond import EDMPrecond
from calmwild.unet import UNet

from .common import rate, ratio, say, time_side_by_side, tf32

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])


def _edm_network(edm_repo: Path | None, unet: dict):
    """EDM's ``EDMPrecond(SongUNet)`` of the configuration, or None with the reason."""
    if edm_repo is None:
        return None, "NVlabs/edm peer skipped: pass --edm-repo PATH (a checkout of github.com/NVlabs/edm)"
    if not (edm_repo / "training" / "networks.py").is_file():
        return None, f"NVlabs/edm peer skipped: {edm_repo} holds no training/networks.py"
    sys.path.insert(0, str(edm_repo))
    from training.networks import EDMPrecond as EDMNetwork  # noqa: PLC0415 - the user's checkout of EDM's code

    net = EDMNetwork(img_resolution=unet["img_resolution"], img_channels=unet["in_channels"], label_dim=0,
                     model_channels=unet["model_channels"], channel_mult=unet["channel_mult"],
                     num_blocks=unet["num_blocks"], attn_resolutions=unet["attn_resolutions"],
                     dropout=unet.get("dropout", 0.0), augment_dim=0, **DDPMPP)
    return net, f"NVlabs/edm from {edm_repo}"


def _step(net: torch.nn.Module, images: torch.Tensor, sigma: torch.Tensor):
    def call() -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        loss = (net(images + sigma.reshape(-1, 1, 1, 1) * torch.randn_like(images), sigma) - images).square().mean()
        loss.backward()
        return loss.detach()

    return call


def run(unet: dict, device: torch.device, batch_size: int, repeats: int, edm_repo: Path | None) -> dict:
    ours = EDMPrecond(UNet(**{**unet, "variant": "edm"})).to(device).train()
    edm, note = _edm_network(edm_repo, unet)
    shape = (unet["in_channels"], unet["img_resolution"], unet["img_resolution"])
    say(f"network: forward + backward, batch {batch_size} of {shape}; {note}")
    gen = torch.Generator(device=device).manual_seed(40)
    images = torch.rand(batch_size, *shape, generator=gen, device=device) * 2 - 1
    sigma = torch.exp(torch.randn(batch_size, generator=gen, device=device) * 1.2 - 1.2)
    calls = {"calmwild_unet_edm": _step(ours, images, sigma)}
    if edm is not None:
        calls["nvlabs_edm_songunet"] = _step(edm.to(device).train(), images, sigma)
    with tf32(False) as settings:
        times, _ = time_side_by_side(calls, device, repeats)
    out = {"sizes": {"batch_size": batch_size, "image_shape": list(shape), "repeats": repeats}, "unet": unet,
           "precision": settings, "peer": note,
           "parameters": {"calmwild": sum(p.numel() for p in ours.parameters())}}
    for name in calls:
        out[name] = rate(times[name], batch_size, "img_per_s")
    if edm is not None:
        out["parameters"]["nvlabs_edm"] = sum(p.numel() for p in edm.parameters())
        out["speed_ratio_calmwild_to_edm"] = ratio(out["calmwild_unet_edm"]["img_per_s"],
                                                   out["nvlabs_edm_songunet"]["img_per_s"])
    return out
