"""Reproduce the paper's geometry figures for one training set: Figure 3 (max posterior weight and shell coverage,
the danger zone), Figure 6 (coverage against the Theorem 4.8 bounds) and Figure 7 (max against self weight).

With CIFAR-10 on disk it uses the paper's setting, the first 1,000 training images against held-out test images:

    python scripts/geometry_figures.py --cifar-root /data/cifar10 --out runs/geometry_cifar1k

Without it (or with --dataset digits) it runs on the embedded digits. Writes geometry.json, geometry.png (Fig. 3),
coverage_bounds.png (Fig. 6) and self_weight.png (Fig. 7) into --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from calmwild.geometry.report import analyze_geometry, write_geometry_report  # noqa: E402
from calmwild.settings import GeometrySettings  # noqa: E402
from calmwild.data import CIFAR10DataModule, DigitsDataModule  # noqa: E402
from calmwild.io import prepare_output_dir  # noqa: E402


def load_data(args: argparse.Namespace):
    """CIFAR-10 1k when requested and present, else the embedded digits (with a message saying so)."""
    if args.dataset == "cifar10":
        root = Path(args.cifar_root)
        if (root / "cifar-10-batches-py").is_dir():
            dm = CIFAR10DataModule(root=str(root), num_train=args.num_train, num_heldout=args.num_heldout,
                                   batch_size=1)
            dm.setup("fit")
            return dm
        print(f"CIFAR-10 not found under {root} (expected cifar-10-batches-py/): using the embedded digits instead",
              file=sys.stderr)
    dm = DigitsDataModule(num_train=min(args.num_train, 1000), num_heldout=min(args.num_heldout, 797),
                          resolution=16, batch_size=1)
    dm.setup("fit")
    return dm


def _curve(ax, sigmas, block, label, style="-"):
    mean, se = block["mean"], block["se"]
    ax.plot(sigmas, mean, style, label=label)
    if se is not None and all(s is not None for s in se):
        ax.fill_between(sigmas, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)], alpha=0.2)


def _finish(fig, ax, ylabel: str, path: Path) -> None:
    """Log-sigma x axis, labels and legend, then the PNG at ``path``."""
    ax.set_xscale("log")
    ax.set_xlabel("sigma")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_bounds(report: dict, path: Path) -> None:
    """Figure 6: Monte Carlo coverage between the Theorem 4.8 lower and upper bounds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sig = report["sigmas"]
    _curve(ax, sig, report["coverage"], "coverage C(sigma) (Monte Carlo)")
    _curve(ax, sig, report["coverage_bounds"]["lower"], "Thm 4.8 lower bound E f(d_NN)", "--")
    _curve(ax, sig, report["coverage_bounds"]["upper"], "Thm 4.8 upper bound min(1, N E f(|x - x'|))", ":")
    _finish(fig, ax, "probability", path)


def plot_self_weight(report: dict, path: Path) -> None:
    """Figure 7: expected max posterior weight against the weight of the noised point itself."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sig = report["sigmas"]
    _curve(ax, sig, report["max_weight"], "max weight E max_i w_i")
    _curve(ax, sig, report["self_weight"], "self weight E w_i0", "--")
    _finish(fig, ax, "posterior weight", path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10", "digits"], default="cifar10")
    parser.add_argument("--cifar-root", default="data/cifar10")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-heldout", type=int, default=1000)
    parser.add_argument("--num-points", type=int, default=100, help="base points of the weight curves (App. E.3)")
    parser.add_argument("--num-noises", type=int, default=100)
    parser.add_argument("--num-queries", type=int, default=500)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/geometry_figures")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    out = prepare_output_dir(args.out, args.overwrite)
    data = load_data(args)
    start = time.perf_counter()
    settings = GeometrySettings(num_points=args.num_points, num_noises=args.num_noises, num_queries=args.num_queries)
    report = analyze_geometry(data.train_images, data.heldout_images, settings, device=args.device)
    report["data"] = data.describe()
    report["seconds"] = time.perf_counter() - start
    write_geometry_report(report, out, overwrite=True)
    plot_bounds(report, out / "coverage_bounds.png")
    plot_self_weight(report, out / "self_weight.png")
    zone = report["danger_zone"]
    print(f"{report['data']['name']}: N={report['dataset']['num_train']}, d={report['dataset']['dim']}; danger zone "
          f"{'empty' if zone['empty'] else zone['sigma']} (timesteps {zone['timesteps']}); "
          f"{report['seconds']:.1f} s; figures in {out}")
    return report


if __name__ == "__main__":
    main()
