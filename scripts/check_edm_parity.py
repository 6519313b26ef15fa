"""Checks ``calmwild import-edm`` against NVlabs/edm's own networks, on a checkout of their code you provide.

    python scripts/check_edm_parity.py --edm-repo /path/to/edm [--full] [--out parity.json]

For each configuration, EDM's own ``EDMPrecond(SongUNet)`` is built with random weights (every layer perturbed, so
zero-initialised layers hide nothing), pickled the way EDM's training loop pickles it, imported by calmwild, and both
networks denoise the same inputs over 25 noise levels from 0.002 to 80. The script prints and writes the largest
relative error ||D_calmwild - D_edm|| / ||D_edm|| per configuration and the parameter counts. ``--full`` adds EDM's
CIFAR-10 DDPM++ configurations (55.7M parameters, unconditional and conditional; a minute or two on a CPU).

EDM's code is imported from ``--edm-repo`` at run time only; nothing of it is part of calmwild.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from calmwild.denoisers import load_denoiser
from calmwild.interop.edm import import_edm_network
from calmwild.io import write_json

SMALL = [
    dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=32, channel_mult=[1, 2], num_blocks=1,
         attn_resolutions=[8]),
    dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2, 2], num_blocks=2,
         attn_resolutions=[8, 4]),
    dict(img_resolution=16, img_channels=1, label_dim=0, model_channels=64, channel_mult=[2, 2], num_blocks=2,
         attn_resolutions=[8]),
]
CIFAR = [dict(img_resolution=32, img_channels=3, label_dim=label_dim, model_channels=128, channel_mult=[2, 2, 2],
              num_blocks=4, attn_resolutions=[16]) for label_dim in (0, 10)]
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], augment_dim=9, dropout=0.13)


def compare(edm_precond_cls, config: dict, work: Path, num_sigmas: int = 25) -> dict:
    torch.manual_seed(0)
    net = edm_precond_cls(**config, **DDPMPP)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net = net.eval().requires_grad_(False)
    pkl, ckpt = work / "network.pkl", work / "network.ckpt"
    with open(pkl, "wb") as handle:
        pickle.dump({"ema": net, "dataset_kwargs": {"path": "unused"}}, handle)
    label_dim = config["label_dim"]
    import_edm_network(pkl, ckpt, sample_class=label_dim - 1 if label_dim else None)
    ours = load_denoiser(ckpt)
    shape = (config["img_channels"], config["img_resolution"], config["img_resolution"])
    gen = torch.Generator().manual_seed(1)
    labels = torch.eye(label_dim)[[label_dim - 1] * 2] if label_dim else None
    errors = []
    for k in range(num_sigmas):
        sigma = math.exp(math.log(0.002) + k / (num_sigmas - 1) * (math.log(80.0) - math.log(0.002)))
        x = torch.randn(2, *shape, generator=gen) * (1.0 + sigma)
        s = torch.full((2,), sigma)
        reference = net(x, s, labels).double()
        errors.append(float((ours(x, s).double() - reference).norm() / reference.norm()))
    return {"config": config, "edm_parameters": sum(p.numel() for p in net.parameters()),
            "calmwild_parameters": sum(p.numel() for p in ours.net.parameters()),
            "max_relative_error": max(errors), "sigma_range": [0.002, 80.0], "num_sigmas": num_sigmas}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edm-repo", required=True, type=Path, help="a checkout of github.com/NVlabs/edm")
    parser.add_argument("--full", action="store_true", help="also EDM's CIFAR-10 DDPM++ sizes (55.7M parameters)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not (args.edm_repo / "training" / "networks.py").is_file():
        raise SystemExit(f"--edm-repo {args.edm_repo}: no training/networks.py there (a checkout of NVlabs/edm?)")
    sys.path.insert(0, str(args.edm_repo))
    from training.networks import EDMPrecond  # noqa: PLC0415 - EDM's code, from the user's checkout

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in SMALL + (CIFAR if args.full else []):
            result = compare(EDMPrecond, config, Path(tmp))
            results.append(result)
            print(f"{config['model_channels']} ch x {config['channel_mult']}, {config['num_blocks']} blocks, "
                  f"{config['label_dim']} classes: {result['edm_parameters']:,} EDM / "
                  f"{result['calmwild_parameters']:,} calmwild parameters; max relative error "
                  f"{result['max_relative_error']:.2e} over {result['num_sigmas']} sigmas in [0.002, 80]", flush=True)
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
