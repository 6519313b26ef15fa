"""The study's settings: the modes and their sizes, the command-line arguments, and the settings file that keeps one
output directory to one set of settings.

Sizes per mode (digits: scikit-learn's 8x8 digits, no download):

- ``tiny``: every stage at toy sizes, seconds per stage (the test suite);
- ``quick``: a 16-channel U-Net, 640 steps, sizes 16 .. 128, 3 seeds, 10-12 minutes on 2 idle CPU cores;
- ``standard``: a 32-channel U-Net, 2,000 steps, sizes 16 .. 512, 4 seeds, more samples, about 45 minutes on 2 cores;
- ``--dataset cifar10`` / ``celeba`` (GPU): the paper's networks and recipes (EDM's DDPM++ on CIFAR-10, the DDPM
  U-Net of Bonnaire et al. on grayscale CelebA), sizes around the paper's N = 1,000 / 1,024.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

from calmwild.geometry.zone import paper_buffer_margin
from calmwild.io import write_json

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = {"digits": ROOT / "configs/study/digits.yaml", "cifar10": ROOT / "configs/study/cifar10.yaml",
             "celeba": ROOT / "configs/study/celeba.yaml"}
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")
DATASETS = ("digits", "cifar10", "celeba")
MODES = ("tiny", "quick", "standard")
SWAP_SEEDS = (0, 100_000, 200_000)  # blocks of noise seeds: sample i of block s starts from noise seed s + i

_DIGITS_GEOMETRY = dict(num_points=32, num_noises=50, num_queries=200, num_coverage_noises=10, num_pairs=2000,
                        num_threshold_points=20)
_PAPER_GEOMETRY = dict(num_points=100, num_noises=100, num_queries=500, num_coverage_noises=20, num_pairs=10_000,
                       num_threshold_points=20)

# sizes: the regime sweep's training-set sizes (a log2 grid; bisected toward the N* band when it falls between two);
# steps / batch_size / model_channels: the one training budget of every model; eval_every: checkpoints and the
# memorization-vs-steps points; seeds: training seeds of every arm; samples: samples per model for trajectory
# memorization, quality and risk; per_sigma_images x sigma_levels: the per-sigma curves; swap_samples: samples per
# noise block in each swap cell.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dataset="digits", sizes=[8, 16, 32], steps=30, batch_size=8, model_channels=8, eval_every=15,
                 seeds=[0, 1], samples=32, trajectory_samples=16, per_sigma_images=16, sigma_levels=8,
                 swap_samples=16, swap_blocks=2, heldout=64, refine_rounds=1,
                 geometry=dict(num_points=8, num_noises=8, num_queries=16, num_coverage_noises=4, num_pairs=100,
                               num_threshold_points=4, num_levels=16)),
    "quick": dict(dataset="digits", sizes=[16, 32, 64, 128], steps=640, batch_size=32, model_channels=16,
                  eval_every=160, seeds=[0, 1, 2], samples=256, trajectory_samples=128, per_sigma_images=128,
                  sigma_levels=24, swap_samples=128, swap_blocks=3, heldout=500, refine_rounds=2,
                  geometry=dict(_DIGITS_GEOMETRY, num_levels=40)),
    "standard": dict(dataset="digits", sizes=[16, 32, 64, 128, 256, 512], steps=2000, batch_size=32,
                     model_channels=32, eval_every=500, seeds=[0, 1, 2, 3], samples=512, trajectory_samples=128,
                     per_sigma_images=256, sigma_levels=32, swap_samples=256, swap_blocks=3, heldout=500,
                     refine_rounds=2, geometry=dict(_DIGITS_GEOMETRY, num_levels=40)),
    # The paper's CIFAR-10 setup (EDM's DDPM++, 40 Mimg for EDM-1K) over a sweep around N = 1,000.
    "cifar10": dict(dataset="cifar10", sizes=[500, 1000, 2000, 5000, 50_000], steps=78_125, batch_size=512,
                    model_channels=None, eval_every=15_625, seeds=[0, 1, 2], samples=1024, trajectory_samples=1024,
                    per_sigma_images=1000, sigma_levels=40, swap_samples=1024, swap_blocks=3, heldout=10_000,
                    refine_rounds=1, geometry=dict(_PAPER_GEOMETRY, num_levels=40)),
    # Grayscale CelebA as in Bonnaire et al. / the paper's Section 5 (DDPM U-Net, T = 1000, 100k steps, batch 512).
    "celeba": dict(dataset="celeba", sizes=[128, 256, 512, 1024, 2048, 4096], steps=100_000, batch_size=512,
                   model_channels=None, eval_every=20_000, seeds=[0, 1, 2], samples=1024, trajectory_samples=1024,
                   per_sigma_images=1024, sigma_levels=40, swap_samples=1024, swap_blocks=3, heldout=10_240,
                   refine_rounds=1, geometry=dict(_PAPER_GEOMETRY, num_levels=40)),
}
SIZE_FLAGS = ("steps", "batch_size", "model_channels", "eval_every", "samples", "trajectory_samples",
              "per_sigma_images", "sigma_levels", "swap_samples", "swap_blocks", "heldout", "refine_rounds")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/study.py",
        description="The paper's claims as an experiment: regime sweep, arms at N* with seeds and placebo controls, "
                    "swaps placed by steps and by the data, risk, Remark 4.3; verdicts by pre-stated criteria.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="10-12 minutes on 2 idle CPU cores (embedded digits)")
    mode.add_argument("--tiny", action="store_true", help="every stage at toy sizes (seconds; the test suite)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="output directory (default runs/study)")
    parser.add_argument("--dataset", choices=DATASETS, default="digits",
                        help="cifar10 / celeba: the paper's setups (GPU), with --data-root")
    parser.add_argument("--data-root", default=None,
                        help="cifar10: the folder holding cifar-10-batches-py; celeba: torchvision's celeba/ parent")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="training-set sizes of the regime sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds of every arm (>= 2)")
    for name in SIZE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the mode's {name}")
    parser.add_argument("--gap-margin", type=float, default=None,
                        help=f"widen the danger zone to [a / m, b * m] for the gap (default: the paper's CelebA "
                             f"buffer, m = {paper_buffer_margin():.3f})")
    parser.add_argument("--reweight-factor", type=float, default=0.1, help="loss factor inside the band (Reweighted)")
    parser.add_argument("--fid-feature", choices=("random", "inception"), default=None,
                        help="Frechet-distance features (default: random on digits, inception on the paper data)")
    parser.add_argument("--fid-weights-path", default=None, help="InceptionV3 weights file (inception features)")
    parser.add_argument("--device", default=None, help="device of the analysis commands (default cuda if available)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="commands run side by side, each in its own process (default: one on a GPU, else one "
                             "per CPU core, at most 8)")
    parser.add_argument("--configs-only", action="store_true",
                        help="write the fit configs a stage needs and stop when one is not trained yet (train them "
                             "with `calmwild fit --config ...` on any number of GPUs, then run the study again)")
    return parser.parse_args(argv)


def cifar10_missing(root: str | Path) -> list[str]:
    """The CIFAR-10 batch files missing under ``root``/cifar-10-batches-py (empty when all are there)."""
    folder = Path(root) / "cifar-10-batches-py"
    return [name for name in CIFAR10_FILES if not (folder / name).is_file()]


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting that decides a number of the study: the mode's preset (or the dataset's, for the paper data),
    the flags on top. One line naming the value for anything out of range."""
    mode = "tiny" if args.tiny else "quick" if args.quick else "standard"
    if args.dataset != "digits":
        if mode != "standard":
            raise ValueError(f"--dataset {args.dataset} is the paper's setup (a GPU job): drop --{mode}")
        if args.data_root is None:
            raise ValueError(f"--dataset {args.dataset} needs --data-root (no download happens during the study)")
        if args.dataset == "cifar10" and cifar10_missing(args.data_root):
            raise ValueError(f"--data-root {args.data_root}: cifar-10-batches-py is missing "
                             f"{', '.join(cifar10_missing(args.data_root))}; extract CIFAR-10's python version there")
        if args.dataset == "celeba" and not (Path(args.data_root) / "celeba").is_dir():
            raise ValueError(f"--data-root {args.data_root} holds no celeba/ folder (torchvision's CelebA layout)")
    preset = copy.deepcopy(PRESETS[args.dataset if args.dataset != "digits" else mode])
    for name in SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
            preset[name] = value
    if args.sizes is not None:
        preset["sizes"] = args.sizes
    if args.seeds is not None:
        preset["seeds"] = args.seeds
    sizes, seeds = preset["sizes"], preset["seeds"]
    if len(sizes) < 2 or sorted(set(sizes)) != sizes or sizes[0] < 2:
        raise ValueError(f"--sizes must be at least two increasing sizes >= 2, got {sizes}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds must be at least two distinct non-negative seeds (intervals are over seeds), got "
                         f"{seeds}")
    if preset["steps"] % preset["eval_every"]:
        raise ValueError(f"--steps {preset['steps']} must be a multiple of --eval-every {preset['eval_every']}")
    if preset["swap_samples"] > SWAP_SEEDS[1] or preset["swap_blocks"] > len(SWAP_SEEDS):
        raise ValueError(f"--swap-blocks must be at most {len(SWAP_SEEDS)} and --swap-samples at most {SWAP_SEEDS[1]}")
    if not 0.0 <= args.reweight_factor <= 1.0:
        raise ValueError(f"--reweight-factor must lie in [0, 1], got {args.reweight_factor}")
    margin = paper_buffer_margin() if args.gap_margin is None else args.gap_margin
    if not margin >= 1.0:
        raise ValueError(f"--gap-margin must be >= 1 (a widening factor in sigma), got {margin}")
    feature = args.fid_feature or ("random" if args.dataset == "digits" else "inception")
    root = None if args.data_root is None else str(Path(args.data_root).resolve())
    return {"mode": mode, **preset, "data_root": root, "gap_margin": margin, "reweight_factor": args.reweight_factor,
            "fid_feature": feature,
            "fid_weights_path": args.fid_weights_path, "threshold": 1 / 3, "sampling_seed": 0, "risk_k": 5}


def default_jobs(device: str) -> int:
    """One command at a time on a GPU; on a CPU one per core (at most 8), each with one thread: the small networks
    of the CPU modes gain little from a second thread and nearly double with a second process."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def check_same_settings(out: Path, settings: dict[str, Any]) -> None:
    """Writes ``study.json``; refuses to continue a study in ``out`` that was started with other settings."""
    path = out / "study.json"
    if path.is_file():
        saved = json.loads(path.read_text())["settings"]
        current = json.loads(json.dumps(settings))
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise SystemExit(f"[study] {out} holds a study with other settings ({', '.join(changed)} differ): "
                             "use another --out, or delete that directory to start over")
    write_json({"settings": settings}, path)
