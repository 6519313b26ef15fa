"""Sampling throughput (samples/s): ``calmwild.sampling.generate`` (EDM Heun, 2N - 1 network evaluations per
sample) with a U-Net behind ``NetworkDenoiser(EDMPrecond)``, the float64-state default against faster settings.

The reference is the library default: ODE state in float64, network in true float32 (TF32 off). The fast paths keep
the state in float32 and, on CUDA, run the network with TF32 or under bf16 autocast. Every path starts from the same
per-image seeded noise, so the max |x_fast - x_reference| over all samples is the tolerance the fast path costs.

Peer: k-diffusion's ``sample_heun`` (Crowson's implementation of EDM's Algorithm 2, on ``get_sigmas_karras``, the
same schedule) with the same denoiser and the same per-image noise, state in float32, when ``k_diffusion`` is
installed (``pip install k-diffusion``; never a calmwild dependency). Its samples and speed are compared with the
reference path's.

The network has random weights: every Conv2d/Linear is re-initialised with PyTorch's default (``reset_parameters``),
because calmwild's zero-initialised output layers would make D(x) = c_skip x, an affine map that no precision
setting could perturb.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from calmwild.denoisers import NetworkDenoiser
from calmwild.precond import EDMPrecond
from calmwild.sampling import generate, noise_for_indices
from calmwild.unet import UNet

from .common import rate, ratio, say, time_side_by_side, tf32


@dataclass(frozen=True)
class SamplerVariant:
    name: str
    state_dtype: str = "float64"
    tf32: bool = False
    bf16_autocast: bool = False


REFERENCE = SamplerVariant("float64-state fp32-network (default)")
CUDA_FAST = (
    SamplerVariant("float32-state tf32-network", state_dtype="float32", tf32=True),
    SamplerVariant("float32-state bf16-autocast", state_dtype="float32", tf32=True, bf16_autocast=True),
)
CPU_FAST = (SamplerVariant("float32-state fp32-network", state_dtype="float32"),)


def random_denoiser(unet_config: dict, device: torch.device, seed: int = 0) -> NetworkDenoiser:
    torch.manual_seed(seed)
    net = EDMPrecond(UNet(**unet_config))
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return NetworkDenoiser(net.eval().requires_grad_(False).to(device))


def _sampler(denoiser: NetworkDenoiser, variant: SamplerVariant, device: torch.device, num: int, batch_size: int,
             steps: int, shape: tuple[int, int, int]):
    state_dtype = getattr(torch, variant.state_dtype)

    def call() -> torch.Tensor:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant.bf16_autocast
                    else contextlib.nullcontext())
        with tf32(variant.tf32), autocast:
            return generate(denoiser, num, shape, seed=0, batch_size=batch_size, device=device, progress=False,
                            num_steps=steps, solver="heun", state_dtype=state_dtype)

    return call


def k_diffusion_heun(denoiser: NetworkDenoiser, device: torch.device, num: int, batch_size: int, steps: int,
                     shape: tuple[int, int, int]):
    """k-diffusion's Heun sampler over the same per-image noise as :func:`calmwild.sampling.generate` (seed 0), or
    None with the reason when k-diffusion is not installed."""
    try:
        from k_diffusion import sampling as kd
    except ImportError:
        return None, "k-diffusion not installed (pip install k-diffusion): peer skipped"
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0, device=device)

    def call() -> torch.Tensor:
        with tf32(False):
            return torch.cat([
                kd.sample_heun(denoiser, noise_for_indices(range(start, min(start + batch_size, num)), shape, 0)
                               .to(device) * sigmas[0], sigmas, disable=True).cpu()
                for start in range(0, num, batch_size)])

    from importlib.metadata import version

    return call, f"k-diffusion {version('k-diffusion')}"


def run(unet_config: dict, device: torch.device, num: int, batch_size: int, steps: int, repeats: int) -> dict:
    shape = (unet_config["in_channels"], unet_config["img_resolution"], unet_config["img_resolution"])
    denoiser = random_denoiser(unet_config, device)
    variants = (REFERENCE, *(CUDA_FAST if device.type == "cuda" else CPU_FAST))
    say(f"sampling: {len(variants)} paths, {num} samples of {shape}, Heun {steps} steps, batch {batch_size}")
    # Warm-up at the timed batch size (cuDNN autotuning, allocator) with a 2-step schedule, outside the timing.
    for variant in variants:
        _sampler(denoiser, variant, device, min(num, batch_size), batch_size, 2, shape)()
    calls = {v.name: _sampler(denoiser, v, device, num, batch_size, steps, shape) for v in variants}
    peer, peer_note = k_diffusion_heun(denoiser, device, num, batch_size, steps, shape)
    if peer is not None:
        calls["k_diffusion_sample_heun"] = peer
    times, samples = time_side_by_side(calls, device, repeats, warmup=0)
    reference = samples[REFERENCE.name]
    out = {
        "sizes": {"num_samples": num, "batch_size": batch_size, "num_steps": steps, "solver": "heun",
                  "network_evaluations_per_sample": 2 * steps - 1, "image_shape": list(shape), "repeats": repeats},
        "network": {"unet": unet_config, "weights": "random (reset_parameters of every Conv2d/Linear)"},
        "paths": {},
        "k_diffusion": peer_note,
    }
    ref_rate = rate(times[REFERENCE.name], num, "samples_per_s")
    for variant in variants:
        result = rate(times[variant.name], num, "samples_per_s")
        diff = (samples[variant.name] - reference).abs()
        out["paths"][variant.name] = {
            "settings": asdict(variant),
            **result,
            "ratio_to_reference": ratio(result["samples_per_s"], ref_rate["samples_per_s"]),
            "max_abs_diff_to_reference": float(diff.max()),
            "mean_abs_diff_to_reference": float(diff.mean()),
        }
    if peer is not None:
        result = rate(times["k_diffusion_sample_heun"], num, "samples_per_s")
        diff = (samples["k_diffusion_sample_heun"] - reference).abs()
        out["k_diffusion_sample_heun"] = {
            **result, "max_abs_diff_to_reference": float(diff.max()),
            "speed_ratio_calmwild_reference_to_k_diffusion": ratio(ref_rate["samples_per_s"],
                                                                   result["samples_per_s"]),
        }
    return out
