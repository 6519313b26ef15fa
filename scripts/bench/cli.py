"""Command line of scripts/bench.py: presets (``cifar`` for a GPU, ``quick`` for a CPU), size overrides, running
the selected benchmarks and emitting one JSON object (see the module docstring of scripts/bench.py)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from pathlib import Path

from . import budget, empirical, geometry, kid, neighbors, network, precision, reference, sampling, training
from .common import environment, precision_state, say

BENCHMARKS = ("training", "network", "sampling", "knn", "empirical", "geometry", "precision", "kid", "budget")

CIFAR_UNET = {"img_resolution": 32, "in_channels": 3, "model_channels": 128, "channel_mult": [2, 2, 2],
              "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.13}
QUICK_UNET = {"img_resolution": 16, "in_channels": 1, "model_channels": 32, "channel_mult": [1, 2],
              "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.1}


@dataclass(frozen=True)
class Sizes:
    """Workload of every benchmark. ``num_references`` is the reference / training set of knn, the empirical
    denoiser and the geometry curves; ``data_shape`` the shape of their images."""

    unet: dict
    batch_size: int
    warmup_steps: int
    timed_steps: int
    train_repeats: int
    num_samples: int
    sample_batch_size: int
    sampling_steps: int
    knn_queries: int
    num_references: int
    data_shape: tuple[int, int, int]
    num_queries: int
    empirical_sigmas: tuple[float, ...]
    num_sigmas: int
    base_points: int
    noises: int
    repeats: int
    precision_steps: int
    precision_heldout: int
    precision_noises: int
    kid_samples: int
    kid_reference: int
    kid_dim: int
    kid_subsets: int
    kid_subset_size: int
    budget_batch: int


PRESETS = {
    "cifar": Sizes(unet=CIFAR_UNET, batch_size=128, warmup_steps=10, timed_steps=30, train_repeats=2,
                   num_samples=256, sample_batch_size=256, sampling_steps=18, knn_queries=10_000,
                   num_references=50_000, data_shape=(3, 32, 32), num_queries=1000,
                   empirical_sigmas=(0.02, 0.2, 1.0, 5.0, 40.0), num_sigmas=40, base_points=100, noises=10,
                   repeats=3, precision_steps=300, precision_heldout=1000, precision_noises=4,
                   kid_samples=10_000, kid_reference=10_000, kid_dim=2048, kid_subsets=100, kid_subset_size=1000,
                   budget_batch=128),
    "quick": Sizes(unet=QUICK_UNET, batch_size=32, warmup_steps=3, timed_steps=15, train_repeats=3,
                   num_samples=32, sample_batch_size=32, sampling_steps=18, knn_queries=500,
                   num_references=5000, data_shape=(1, 16, 16), num_queries=500,
                   empirical_sigmas=(0.02, 0.2, 1.0, 5.0, 40.0), num_sigmas=40, base_points=20, noises=10,
                   repeats=3, precision_steps=300, precision_heldout=256, precision_noises=2,
                   kid_samples=1024, kid_reference=1024, kid_dim=64, kid_subsets=100, kid_subset_size=1000,
                   budget_batch=4),
}

# command-line flag -> Sizes field, for the size overrides
_OVERRIDES = {
    "batch_size": "batch_size", "warmup_steps": "warmup_steps", "timed_steps": "timed_steps",
    "train_repeats": "train_repeats", "num_samples": "num_samples", "sample_batch_size": "sample_batch_size",
    "sampling_steps": "sampling_steps", "knn_queries": "knn_queries", "num_references": "num_references",
    "num_queries": "num_queries", "num_sigmas": "num_sigmas", "base_points": "base_points", "noises": "noises",
    "repeats": "repeats", "precision_steps": "precision_steps", "precision_heldout": "precision_heldout",
    "precision_noises": "precision_noises", "kid_samples": "kid_samples", "kid_reference": "kid_reference",
    "kid_dim": "kid_dim", "kid_subsets": "kid_subsets", "kid_subset_size": "kid_subset_size",
    "budget_batch": "budget_batch",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description="calmwild performance benchmarks (one JSON object).")
    p.add_argument("--config", choices=sorted(PRESETS), default="cifar",
                   help="workload preset: cifar (DDPM++ CIFAR-10, GPU sizes) or quick (tiny, CPU)")
    p.add_argument("--quick", action="store_true", help="same as --config quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help=f"benchmarks to run, space- or comma-separated, from {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--variants", nargs="+", choices=sorted(training.VARIANTS),
                   help="training variants (default: all five on CUDA, fp32 on CPU)")
    p.add_argument("--memory-fraction", type=_fraction, default=0.5,
                   help="dense naive references run only if they need at most this share of free memory")
    p.add_argument("--edm-repo", type=Path, default=None,
                   help="a checkout of github.com/NVlabs/edm: its SongUNet is the network benchmark's peer")
    sizes = p.add_argument_group("size overrides (default: from the preset)")
    for flag in _OVERRIDES:
        sizes.add_argument(f"--{flag.replace('_', '-')}", type=_positive_int, dest=flag)
    return p


def _selected(only: list[str] | None, p: argparse.ArgumentParser) -> tuple[str, ...]:
    if not only:
        return BENCHMARKS
    names = [name for item in only for name in item.split(",") if name]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"--only: unknown benchmark(s) {unknown}; expected names from {list(BENCHMARKS)}")
    return tuple(name for name in BENCHMARKS if name in names)


def _finite(value):
    """JSON-safe copy: NaN/inf become null, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _run_one(name: str, sizes: Sizes, device: torch.device, args: argparse.Namespace) -> dict:
    if name == "training":
        variants = tuple(args.variants or (training.CUDA_VARIANTS if device.type == "cuda"
                                           else training.CPU_VARIANTS))
        return training.run(sizes.unet, device, sizes.batch_size, sizes.warmup_steps, sizes.timed_steps,
                            sizes.train_repeats, variants)
    if name == "network":
        return network.run(sizes.unet, device, sizes.batch_size, sizes.repeats, args.edm_repo)
    if name == "budget":
        return budget.run(device, sizes.budget_batch, sizes.repeats)
    if name == "sampling":
        return sampling.run(sizes.unet, device, sizes.num_samples, sizes.sample_batch_size, sizes.sampling_steps,
                            sizes.repeats)
    if name == "knn":
        return neighbors.run(sizes.knn_queries, sizes.num_references, sizes.data_shape, 2, device, sizes.repeats,
                             args.memory_fraction)
    if name == "empirical":
        return empirical.run(sizes.num_queries, sizes.num_references, sizes.data_shape,
                             list(sizes.empirical_sigmas), device, sizes.repeats, args.memory_fraction)
    if name == "kid":
        return kid.run(sizes.kid_samples, sizes.kid_reference, sizes.kid_dim, sizes.kid_subsets,
                       sizes.kid_subset_size, sizes.repeats)
    if name == "precision":
        return precision.run(sizes.unet, device, sizes.precision_steps, sizes.batch_size, sizes.precision_heldout,
                             sizes.precision_noises)
    return geometry.run(sizes.num_references, sizes.data_shape, sizes.num_sigmas, sizes.base_points, sizes.noises,
                        device, sizes.repeats, args.memory_fraction)


def main(argv: list[str] | None = None) -> dict:
    """Runs the selected benchmarks, prints one JSON object on stdout (progress goes to stderr), writes it to
    ``--out`` if given, and returns it."""
    p = parser()
    args = p.parse_args(argv)
    config = "quick" if args.quick else args.config
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r} is not a torch device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    selected = _selected(args.only, p)
    sizes = replace(PRESETS[config], **{field: getattr(args, flag) for flag, field in _OVERRIDES.items()
                                        if getattr(args, flag) is not None})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as EDM; recorded in env.precision_at_start
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

    env = environment(device)
    say(f"{config} on {env['device_name']} ({device}), torch {env['torch']}: {', '.join(selected)}")
    started = time.perf_counter()
    results = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|module\\(s\\) in eval mode).*")
        for name in selected:
            results[name] = _run_one(name, sizes, device, args)
    comparable = device.type == "cuda" and config == "cifar"
    record = {
        "benchmark": "calmwild scripts/bench.py",
        "config": config,
        "device": str(device),
        "device_name": env["device_name"],
        "torch": env["torch"],
        "precision_at_end": precision_state(),
        "env": env,
        "sizes": asdict(sizes),
        "results": results,
        "reference": reference.REFERENCE,
        "vs_reference": reference.compare(results, env["device_name"]) if comparable else
        "ratios against the EDM H100 figures are computed for a CUDA run of --config cifar only",
        "total_seconds": time.perf_counter() - started,
    }
    record = _finite(record)
    text = json.dumps(record, indent=2, allow_nan=False)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text, flush=True)
    return record
