"""The paper's main findings end to end, with calmwild's own commands and callbacks only.

    python scripts/study.py --quick              # ~5 min on 2 idle CPU cores (embedded digits, 8x8)
    python scripts/study.py --tiny --out DIR     # every stage at toy sizes (under a minute; tests/test_study.py)
    python scripts/study.py                      # full: digits at 16x16, longer training, more samples
    python scripts/study.py --dataset cifar10 --data-root PATH   # the paper's EDM-1K / EDM-50K setup (GPU job)

Stages (each writes ``<out>/stages/<stage>.json`` when done and is skipped when that marker exists, unless a stage
it depends on ran again in this invocation; an interrupted training resumes from its ``last.ckpt``):

1. ``geometry``   ``calmwild analyze`` on the small training set: the danger zone before any training (Section 4).
2. ``train_small`` / ``train_large`` / ``train_gap`` / ``train_reweighted``: ``calmwild fit`` with the same step
   budget: small N (memorizes), large N, small N with the danger band removed (``calmwild.sigma.Gap``) and small N
   with the loss in the band scaled by ``--reweight-factor`` (``calmwild.sigma.Reweighted``). Trajectory
   memorization is logged against iterations by ``callbacks.TrajectoryMemorization``; ``callbacks.SampleGrid``
   (same samples) records each sample's nearest training image.
3. ``per_sigma``  ``calmwild evaluate`` of the small model, the large model and the empirical optimal denoiser of the
   small set: per-sigma MSE on training / held-out images (eq. 5) and per-sigma memorization (paper Fig. 1-2).
4. ``swap``       ``calmwild sample`` / ``calmwild swap``: small <-> large on the large / medium / small bands
   (Table 1).
5. ``mitigation`` ``calmwild evaluate`` of the gap and reweighted models: memorization rate and a Frechet distance
   beside the baseline (Section 5; the feature extractor and the sample counts are named beside every figure).
6. ``risk``       which training images get memorized (seed 002): :mod:`calmwild.risk` scores from the data alone
   against the images the small model reproduces (AUROC, Spearman, a seeded random-score baseline).
7. ``report``     ``report.md`` + ``report.json`` with figures, image grids and the claims table.

Claims are judged by criteria fixed in :data:`CRITERIA` before any number is seen, and reported with the numbers
whatever they say (one extra, exploratory number is labelled post hoc in the report).

Multi-GPU training: ``--configs-only`` runs the geometry stage and writes the four fit configs, then stops; train
each with ``calmwild fit --config <out>/configs/<model>.yaml --trainer.devices N`` (keep its default_root_dir); the
next study invocation finds every finished run under ``<out>/train/<model>/`` and resumes it at its last step, i.e.
uses it as is.

Output layout: ``configs/`` (the generated fit configs), ``train/<model>/run-*``, ``geometry/``, ``evaluate/<model>/``,
``swap/``, ``risk/``, ``figures/``, ``report.md``, ``report.json``, ``study.json`` (the settings; another invocation
with other settings into the same directory is refused).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from calmwild import stats
from calmwild.geometry import risk
from calmwild.runs import find_latest_run
from calmwild.cli import run as calmwild
from calmwild.commands import load_datamodule
from calmwild.denoisers import SWAP_PRESETS, swap_bands_from_steps
from calmwild.checks import check_sigmas
from calmwild.io import save_figure
from calmwild.memorization.report import plot_sigma_curves
from calmwild.io import enlarge, pair_grid, save_png
from calmwild.io import to_jsonable, write_json
from calmwild.schedule import edm_sigma_steps
from calmwild.geometry.zone import CROSSING_MIN_MARGIN, gap_band

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"digits": ROOT / "configs/study/digits.yaml", "digits_quick": ROOT / "configs/study/digits_quick.yaml",
             "cifar10": ROOT / "configs/study/cifar10.yaml"}
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")

# Sizes per mode. quick: N=32 digits at 8x8 reach ~90% trajectory memorization in 1,500 steps of batch 32.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(template="digits_quick", small_n=8, large_n=64, heldout_n=64, steps=300, batch_size=8,
                 eval_every=100, model_channels=16, traj_samples=32, eval_images=32, eval_samples=32, sigma_levels=10,
                 swap_samples=32, risk_samples=64, risk_noises=8,
                 geometry=dict(num_points=16, num_noises=8, num_queries=32, num_coverage_noises=4, num_pairs=200,
                               num_threshold_points=4)),
    "quick": dict(template="digits_quick", small_n=32, large_n=1000, heldout_n=500, steps=1500, batch_size=32,
                  eval_every=250, model_channels=None, traj_samples=128, eval_images=128, eval_samples=256,
                  sigma_levels=24, swap_samples=256, risk_samples=512, risk_noises=64,
                  geometry=dict(num_points=32, num_noises=50, num_queries=200, num_coverage_noises=10,
                                num_pairs=2000, num_threshold_points=20)),
    "full": dict(template="digits", small_n=64, large_n=1200, heldout_n=500, steps=6000, batch_size=64,
                 eval_every=500, model_channels=None, traj_samples=256, eval_images=256, eval_samples=1024,
                 sigma_levels=40, swap_samples=1024, risk_samples=2048, risk_noises=100,
                 geometry=dict(num_points=64, num_noises=100, num_queries=500, num_coverage_noises=20,
                               num_pairs=10_000, num_threshold_points=20)),
    # The paper's setup: EDM-1K (first 1,000 CIFAR-10 images, ~40 Mimg) against EDM-50K, held-out = test split.
    "cifar10": dict(template="cifar10", small_n=1000, large_n=50_000, heldout_n=10_000, steps=78_125, batch_size=512,
                    eval_every=15_625, model_channels=None, traj_samples=1024, eval_images=1000, eval_samples=10_000,
                    sigma_levels=40, swap_samples=1024, risk_samples=10_000, risk_noises=100,
                    geometry=dict(num_points=100, num_noises=100, num_queries=500, num_coverage_noises=20,
                                  num_pairs=10_000, num_threshold_points=20)),
}
SIZE_FLAGS = ("small_n", "large_n", "heldout_n", "steps", "batch_size", "eval_every", "model_channels", "traj_samples",
              "eval_images", "eval_samples", "sigma_levels", "swap_samples", "risk_samples", "risk_noises")
MODELS = ("small", "large", "gap", "reweighted")
MSE_FLOOR = 1e-7  # lower edge of the MSE plot (images in [-1, 1])
BANDS = ("large", "medium", "small")
RANDOM_DRAWS = 1000  # seeds of the random-score baseline's spread

# Pass/partly criteria of every claim, fixed in advance and printed in the report.
CRITERIA = {
    "medium_sigma": "reproduced: the small model's per-sigma memorization peaks (peak rate >= 0.1) at a sigma inside "
                    "the medium band of the 18-step schedule, and the rates at the smallest and largest sigma are both "
                    "<= 0.25 x peak; partly: peak >= 0.1 inside the medium band with one end not low, or peak >= 0.1 "
                    "within a factor 2 outside the band; otherwise not reproduced.",
    "swap": "reproduced: in both directions the medium-band swap moves trajectory memorization (absolute change) by "
            ">= 0.2 and by >= 2x the larger of the large- and small-band changes; partly: the medium-band change is "
            "the largest in at least one direction; otherwise not reproduced.",
    "gap": "reproduced: the baseline memorizes (rate >= 0.1), gap training cuts the memorization rate by >= 50% "
           "and its Frechet distance is <= 1.25x the baseline's; partly: a cut >= 50% with a worse Frechet "
           "distance, or a cut of 20-50% at <= 1.25x; otherwise not reproduced.",
    "danger_zone": "reproduced: the sigma where the small model's per-sigma memorization peaks lies inside the danger "
                   "zone computed from the data before training; partly: within a factor 2 of it; otherwise not "
                   "reproduced (also when the model has no per-sigma memorization, peak < 0.1).",
    "risk": f"reproduced: the primary score ({risk.PRIMARY_SCORE}) has Spearman rho >= 2 null standard deviations "
            "(2 / sqrt(N - 1)) with how often the small model reproduces each training image; partly: >= 1 null "
            "standard deviation; otherwise not reproduced.",
}


# ------------------------------------------------------------------------------------------------ settings
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short CPU run on the embedded digits (~5 min on 2 cores)")
    mode.add_argument("--tiny", action="store_true", help="every stage at toy sizes (under a minute)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="output directory (default runs/study)")
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default="digits",
                        help="cifar10 needs --data-root with cifar-10-batches-py (full mode only)")
    parser.add_argument("--data-root", default="data/cifar10", help="folder holding cifar-10-batches-py")
    for name in SIZE_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset {name}")
    parser.add_argument("--reweight-factor", type=float, default=0.1, help="loss factor inside the band (Reweighted)")
    parser.add_argument("--gap-margin", type=float, default=1.0,
                        help="widen the danger band to [a / margin, b * margin] for gap and reweighted training")
    parser.add_argument("--fid-feature", choices=("random", "inception"), default="random",
                        help="Frechet-distance features: random (offline, not comparable with FID) or inception")
    parser.add_argument("--fid-weights-path", default=None,
                        help="InceptionV3 weights file (for --fid-feature inception)")
    parser.add_argument("--seed", type=int, default=0, help="training, sampling and Monte Carlo seed")
    parser.add_argument("--device", default=None, help="device of the analysis commands (default cuda if available)")
    parser.add_argument("--configs-only", action="store_true",
                        help="run the geometry stage, write the fit configs and stop (to train them elsewhere)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: tiny convolutions gain nothing from more, and lose a lot when "
                             "the cores are shared)")
    return parser.parse_args(argv)


def cifar10_available(root: str | Path) -> list[str]:
    """The CIFAR-10 batch files missing under ``root``/cifar-10-batches-py (empty when all are there)."""
    folder = Path(root) / "cifar-10-batches-py"
    return [name for name in CIFAR10_FILES if not (folder / name).is_file()]


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that determine every number of the study: the preset of the mode and dataset, the size flags
    on top. ``--dataset cifar10`` falls back to the embedded digits (with a message saying why) in the quick and tiny
    modes and when the CIFAR-10 files are missing."""
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    dataset = args.dataset
    if dataset == "cifar10":
        missing = cifar10_available(args.data_root)
        if mode != "full":
            print(f"[study] --dataset cifar10 is a full-mode (GPU) setup; --{mode} uses the embedded digits instead",
                  flush=True)
            dataset = "digits"
        elif missing:
            print(f"[study] CIFAR-10 not found under {Path(args.data_root) / 'cifar-10-batches-py'} (missing "
                  f"{', '.join(missing)}): falling back to the embedded digits. Place the extracted "
                  "cifar-10-batches-py folder there (or pass --data-root) for the paper's setup.", flush=True)
            dataset = "digits"
    preset = copy.deepcopy(PRESETS["cifar10" if dataset == "cifar10" else mode])
    for name in SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
            preset[name] = value
    if preset["steps"] % preset["eval_every"]:
        raise ValueError(f"--steps {preset['steps']} must be a multiple of --eval-every {preset['eval_every']} (the "
                         "last checkpoint and the last memorization evaluation fall on the final step)")
    if preset["batch_size"] > preset["small_n"]:
        raise ValueError(f"--batch-size {preset['batch_size']} exceeds the small training set --small-n "
                         f"{preset['small_n']}")
    if preset["large_n"] <= preset["small_n"]:
        raise ValueError(f"--large-n {preset['large_n']} must exceed --small-n {preset['small_n']}")
    if not 0.0 <= args.reweight_factor <= 1.0:
        raise ValueError(f"--reweight-factor must lie in [0, 1], got {args.reweight_factor}")
    if not args.gap_margin >= 1.0:
        raise ValueError(f"--gap-margin must be >= 1, got {args.gap_margin}")
    return {"mode": mode, "dataset": dataset, "data_root": str(args.data_root) if dataset == "cifar10" else None,
            **preset, "reweight_factor": args.reweight_factor, "gap_margin": args.gap_margin,
            "fid_feature": args.fid_feature, "fid_weights_path": args.fid_weights_path, "seed": args.seed,
            "threshold": 1 / 3, "risk_k": 5}


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


# ------------------------------------------------------------------------------------------------ stages
class Stages:
    """Runs named stages once: a stage whose marker ``<out>/stages/<name>.json`` exists is skipped unless one of its
    dependencies ran in this invocation. The marker holds the stage's result and its wall-clock seconds."""

    def __init__(self, out: Path, commands: list[str]):
        self.dir = out / "stages"
        self.ran: set[str] = set()
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.commands: dict[str, list[str]] = {}  # per stage, also for stages that ran in an earlier invocation
        self._log = commands  # the list the study appends every command to

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def __call__(self, name: str, deps: tuple[str, ...], work: Callable[[], dict]) -> dict:
        marker = self.marker(name)
        if marker.is_file() and not self.ran.intersection(deps):
            record = json.loads(marker.read_text())
            self.status[name], self.seconds[name] = "skipped (done earlier)", record["seconds"]
            self.commands[name] = record.get("commands", [])
            print(f"[study] {name}: done earlier ({record['seconds']:.1f} s then), skipped", flush=True)
            return record["result"]
        marker.unlink(missing_ok=True)
        print(f"[study] {name}: running", flush=True)
        start, first = time.perf_counter(), len(self._log)
        result = to_jsonable(work())  # as a later invocation reads it back: lists, inf and NaN as null
        seconds = time.perf_counter() - start
        self.commands[name] = self._log[first:]
        write_json({"stage": name, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "commands": self.commands[name], "result": result}, marker)
        self.ran.add(name)
        self.status[name], self.seconds[name] = "ran", seconds
        print(f"[study] {name}: done in {seconds:.1f} s", flush=True)
        return result


class Study:
    """The study's state: settings, paths, the generated configs and the commands run."""

    def __init__(self, out: Path, settings: dict[str, Any], device: str):
        self.out, self.s, self.device = out, settings, device
        self.commands: list[str] = []
        self.invocation = "python scripts/study.py"
        self.sigmas = check_sigmas(edm_sigma_steps(settings["sigma_levels"]).flip(0), distinct_names=True).tolist()
        template_path = TEMPLATES[settings["template"]]
        self.template = yaml.safe_load(template_path.read_text())
        backbone = self.template["model"]["backbone"]
        if isinstance(backbone, str):  # a backbone kept in its own file: inline it (the config is written elsewhere)
            self.template["model"]["backbone"] = yaml.safe_load((template_path.parent / backbone).read_text())

    # ----- commands
    def calmwild(self, *argv: Any) -> Any:
        """Runs one ``calmwild`` command in this process and records it. sys.argv is emptied meanwhile: LightningCLI
        warns when it sees command-line arguments (this script's) beside the ones it is given."""
        args = [str(a) for a in argv]
        self.commands.append("calmwild " + shlex.join(args))
        saved, sys.argv = sys.argv, sys.argv[:1]
        try:
            return calmwild(args)
        finally:
            sys.argv = saved

    def config(self, name: str) -> Path:
        return self.out / "configs" / f"{name}.yaml"

    def write_config(self, name: str, sampler: dict | None = None) -> Path:
        """``<out>/configs/<name>.yaml``: the template with this model's training-set size, step budget, evaluation
        cadence and sigma sampler."""
        s, cfg = self.s, copy.deepcopy(self.template)
        cfg["seed_everything"] = s["seed"]
        trainer = cfg["trainer"]
        trainer["max_steps"] = s["steps"]
        trainer["default_root_dir"] = str((self.out / "train" / name).resolve())
        for callback in trainer["callbacks"]:
            kind, init = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
            if kind == "ModelCheckpoint":
                init["every_n_train_steps"] = s["eval_every"]
            elif kind in ("TrajectoryMemorization", "SampleGrid"):
                init.update(every_n_steps=s["eval_every"], num_samples=s["traj_samples"], threshold=s["threshold"],
                            sampling={**init.get("sampling", {}), "seed": s["seed"]})
        data = cfg["data"]["init_args"]
        data.update(num_train=s["large_n"] if name == "large" else s["small_n"], num_heldout=s["heldout_n"],
                    batch_size=s["batch_size"])
        if s["dataset"] == "cifar10":
            data["root"] = str(Path(s["data_root"]).resolve())
        if s["model_channels"] is not None:
            cfg["model"]["backbone"]["init_args"]["model_channels"] = s["model_channels"]
        if sampler is not None:
            cfg["model"]["sigma_sampler"] = sampler
        path = self.config(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Generated by scripts/study.py from {TEMPLATES[s['template']].relative_to(ROOT)}\n"
                        + yaml.safe_dump(cfg, sort_keys=False))
        return path

    def band_sampler(self, kind: str, band: list[float]) -> dict:
        base = self.template["model"]["sigma_sampler"]
        init = {"base": base, "bands": [list(band)], "unit": "sigma"}
        if kind == "Reweighted":
            init["factors"] = self.s["reweight_factor"]
        return {"class_path": f"calmwild.sigma.{kind}", "init_args": init}

    # ----- 1. geometry
    def geometry(self) -> dict:
        out = self.out / "geometry"
        g = self.s["geometry"]
        report = self.calmwild("analyze", "--data", self.config("small"), "--out", out, "--overwrite", "true",
                               "--geometry.seed", self.s["seed"], "--device", self.device, "--risk_k",
                               self.s["risk_k"], "--risk_noises", self.s["risk_noises"],
                               *[x for k, v in g.items() for x in (f"--geometry.{k}", v)])
        zone = report["danger_zone"]
        if zone["empty"] and zone["crossing"]["sigma"] is None:
            raise RuntimeError("the weight and coverage curves never cross on the sigma grid: no band to remove; "
                               "see geometry/geometry.png")
        if not zone["empty"]:
            source = f"danger zone (max weight >= {zone['weight_level']}, coverage >= {zone['coverage_level']})"
        else:
            source = (f"danger zone empty at the levels (joint level at most {zone['max_joint_level']:.3f}): "
                      f"the crossing sigma of the two curves x/÷ {CROSSING_MIN_MARGIN}")
        lo, hi = gap_band(zone, 1.0, if_empty="crossing")
        gap_lo, gap_hi = gap_band(zone, self.s["gap_margin"], if_empty="crossing")  # as DangerZoneGap builds it
        return {"danger_zone": zone, "band": [lo, hi], "band_source": source,
                "gap_band": [gap_lo, gap_hi], "risk_sigma": report["risk"]["bandwidth_sigma"],
                "sigmas": report["sigmas"], "max_weight": report["max_weight"]["mean"],
                "coverage": report["coverage"]["mean"], "dataset": report["dataset"],
                "files": {"json": "geometry/geometry.json", "png": "geometry/geometry.png"}}

    # ----- 2. training
    def train(self, name: str) -> dict:
        root = self.out / "train" / name
        argv = ["fit", "--config", self.config(name)]
        try:
            previous = find_latest_run(root) / "checkpoints" / "last.ckpt"
            argv += ["--ckpt_path", previous]
            print(f"[study] resuming {name} from {previous}", flush=True)
        except FileNotFoundError:
            pass
        self.calmwild(*argv)
        run_dir = find_latest_run(root)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        if step != self.s["steps"]:
            raise RuntimeError(f"{ckpt} is at step {step}, expected {self.s['steps']}")
        history = json.loads((run_dir / "eval" / "trajectory_memorization" / "history.json").read_text())["history"]
        sampler = yaml.safe_load(self.config(name).read_text())["model"]["sigma_sampler"]
        return {"run_dir": str(run_dir), "checkpoint": str(ckpt), "config": str(self.config(name)),
                "num_train": self.s["large_n"] if name == "large" else self.s["small_n"], "steps": step,
                "sigma_sampler": sampler,
                "history": [{"step": h["step"], "rate": h["traj_mem/rate"], "stderr": h["traj_mem/stderr"],
                             "num_samples": int(h["traj_mem/num_samples"])} for h in history]}

    # ----- 3 / 5. evaluation
    def evaluate(self, name: str, ckpt: str, data: Path) -> dict:
        s = self.s
        argv = ["evaluate", "--ckpt", ckpt, "--data", data, "--out", self.out / "evaluate" / name, "--overwrite",
                "true", "--per_sigma.sigmas", json.dumps(self.sigmas), "--per_sigma.num_images", s["eval_images"],
                "--per_sigma.seed", s["seed"], "--num_samples", s["eval_samples"], "--threshold", s["threshold"],
                "--fid.feature_extractor", s["fid_feature"], "--fid.reference", "heldout", "--fid.cache_dir",
                self.out / "fid_cache", "--sampling.seed", s["seed"], "--device", self.device]
        if s["fid_weights_path"]:
            argv += ["--fid.weights_path", s["fid_weights_path"]]
        report = self.calmwild(*argv)
        mse, mem = report["per_sigma_mse"], report["per_sigma_memorization"]
        return {"sigmas": mse["sigmas"], "mse_train": mse["train"]["mse_per_pixel"],
                "mse_heldout": mse["heldout"]["mse_per_pixel"], "mse_num_train": mse["train"]["num_items"],
                "mse_num_heldout": mse["heldout"]["num_items"], "mem_rate": mem["rate"], "mem_stderr": mem["stderr"],
                "mem_num_items": mem["num_items"], "peak_rate": mem["peak_rate"], "peak_sigma": mem["peak_sigma"],
                "trajectory": report["trajectory_memorization"], "fid": report["fid"],
                "files": {k: f"evaluate/{name}/{v}" for k, v in report["files"].items()}}

    def per_sigma(self, geometry: dict, trained: dict) -> dict:
        results = {"small": self.evaluate("small", trained["small"]["checkpoint"], self.config("small")),
                   "large": self.evaluate("large", trained["large"]["checkpoint"], self.config("large")),
                   "empirical": self.evaluate("empirical", "empirical", self.config("small"))}
        labels = {"small": f"small model (N={self.s['small_n']})", "large": f"large model (N={self.s['large_n']})",
                  "empirical": f"empirical denoiser (N={self.s['small_n']})"}
        fig = plot_per_sigma(results, labels, geometry["band"], self.s)
        save_figure(fig, self.out / "figures" / "per_sigma.png")
        return {"models": results, "labels": labels, "figure": "figures/per_sigma.png"}

    # ----- 4. swap
    def swap(self, trained: dict) -> dict:
        s, data = self.s, self.config("small")
        ckpt = {name: trained[name]["checkpoint"] for name in ("small", "large")}
        common = ["--data", data, "--num", s["swap_samples"], "--sampling.seed", s["seed"],
                  "--threshold", s["threshold"],
                  "--device", self.device, "--overwrite", "true"]
        table: dict[str, dict[str, Any]] = {}
        for base, other in (("small", "large"), ("large", "small")):
            row = {"none": self.calmwild("sample", "--ckpt", ckpt[base], "--out", self.out / "swap" / f"{base}_pure",
                                         *common)["memorization"]}
            for band in BANDS:
                report = self.calmwild("swap", "--base", ckpt[base], "--other", ckpt[other], "--band", band, "--out",
                                       self.out / "swap" / f"{base}_with_{other}_{band}", *common)
                row[band] = {**report["memorization"], "sigma_bands": report["sigma_bands"]}
            table[f"{base}_with_{other}"] = row
        return {"table": table, "num_samples": s["swap_samples"], "memorized_against": f"small training set "
                f"(N={s['small_n']})", "bands": {b: swap_bands_from_steps(SWAP_PRESETS[b]) for b in BANDS}}

    # ----- 5. mitigation
    def mitigation(self, geometry: dict, trained: dict, per_sigma: dict) -> dict:
        rows = {"baseline": per_sigma["models"]["small"],
                "gap": self.evaluate("gap", trained["gap"]["checkpoint"], self.config("small")),
                "reweighted": self.evaluate("reweighted", trained["reweighted"]["checkpoint"], self.config("small"))}
        fig = plot_mitigation(rows, geometry["gap_band"], self.s)
        save_figure(fig, self.out / "figures" / "mitigation.png")
        return {"models": rows, "gap_band": geometry["gap_band"], "reweight_factor": self.s["reweight_factor"],
                "figure": "figures/mitigation.png"}

    # ----- 6. risk
    def risk(self, geometry: dict, trained: dict) -> dict:
        s = self.s
        train = load_datamodule(str(self.config("small"))).train_images
        sigma = geometry["risk_sigma"]
        saved = json.loads((self.out / "geometry" / "risk.json").read_text())  # written by `calmwild analyze`
        scores = {name: torch.tensor(values, dtype=torch.float64) for name, values in saved["per_image"].items()}
        out = self.out / "risk"
        self.calmwild("sample", "--ckpt", trained["small"]["checkpoint"], "--data", self.config("small"),
                      "--num", s["risk_samples"], "--sampling.seed", s["seed"], "--threshold", s["threshold"],
                      "--device", self.device, "--out", out / "samples", "--overwrite", "true")
        per_sample = json.loads((out / "samples" / "per_sample.json").read_text())
        counts = risk.reproduction_counts(per_sample["nearest_index"], per_sample["memorized"], train.shape[0])
        final = score_against(scores, counts, s["seed"])
        per_step = []
        for path in sorted((Path(trained["small"]["run_dir"]) / "eval" / "sample_grid").glob("step_*.json")):
            record = json.loads(path.read_text())["samples"]
            step_counts = risk.reproduction_counts(record["nearest_index"], record["memorized"], train.shape[0])
            per_step.append({"step": int(path.stem.split("_")[1]), "num_samples": record["num_samples"],
                             "rate": record["num_memorized"] / record["num_samples"],
                             **score_against(scores, step_counts, s["seed"])})
        samples = torch.load(out / "samples" / "samples.pt")
        memorized = torch.tensor(per_sample["memorized"], dtype=torch.bool)
        nearest = torch.tensor(per_sample["nearest_index"], dtype=torch.long)
        files = {"scores": "risk/scores.json", "figure": "figures/risk.png"}
        if memorized.any():
            shown = memorized.nonzero()[:, 0][:32]
            save_png(pair_grid(enlarge(samples[shown]), enlarge(train[nearest[shown]]), memorized[shown]),
                     self.out / "figures" / "memorized_pairs.png")
            files["memorized_pairs"] = "figures/memorized_pairs.png"
        files["risk_extremes"] = "geometry/risk.png"  # drawn by `calmwild analyze` in the geometry stage
        write_json({"sigma": sigma, "scores_file": "geometry/risk.json", "counts": counts}, out / "scores.json")
        save_figure(plot_risk(scores, counts, per_step, final), self.out / "figures" / "risk.png")
        return {"sigma": sigma, "num_train": int(train.shape[0]), "num_samples": s["risk_samples"],
                "rate": float(memorized.float().mean()), "num_reproduced": int((counts > 0).sum()),
                "final": final, "per_step": per_step, "primary": risk.PRIMARY_SCORE,
                "extremes_shown": len(saved["most_at_risk"]),
                "files": files}

    # ----- 7. report
    def memorization_figure(self, trained: dict) -> str:
        save_figure(plot_memorization_vs_steps(trained, self.s), self.out / "figures" / "memorization_vs_steps.png")
        return "figures/memorization_vs_steps.png"


def first_partial_step(per_step: list[dict]) -> dict | None:
    """The first training checkpoint at which 10-90% of the samples are memorized (some images reproduced, some
    not), or None."""
    return next((p for p in per_step if 0.1 <= p["rate"] <= 0.9), None)


def score_against(scores: dict[str, torch.Tensor], counts: torch.Tensor, seed: int) -> dict:
    """AUROC (reproduced at all) and Spearman (how often) of every score, and the seeded random baseline; undefined
    statistics (one class empty, constant counts) are None."""
    reproduced = counts > 0
    both = bool(reproduced.any()) and not bool(reproduced.all())
    varied = bool((counts != counts[0]).any())
    per_score = {name: {"auroc": stats.auroc(v, reproduced) if both else None,
                        "spearman": stats.spearman(v, counts) if varied else None} for name, v in scores.items()}
    return {"num_reproduced": int(reproduced.sum()), "scores": per_score,
            "random": risk.random_score_baseline(reproduced, counts, seed=seed, num_draws=RANDOM_DRAWS)}


# ------------------------------------------------------------------------------------------------ figures
def _log_axis(ax, xlabel: str = "σ (EDM noise level)") -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)


def _rate_curve(ax, x: list[float], rate: list[float], stderr: list[float], color: str, label: str) -> None:
    """A rate with its +-2 standard-error band, clipped to [0, 1]."""
    rate, se = np.asarray(rate, dtype=float), np.asarray(stderr, dtype=float)
    ax.plot(x, rate, color=color, marker="o", ms=3, label=label)
    ax.fill_between(x, np.clip(rate - 2 * se, 0, 1), np.clip(rate + 2 * se, 0, 1), color=color, alpha=0.2, lw=0)


def plot_per_sigma(results: dict, labels: dict, band: list[float], s: dict) -> Figure:
    """Paper Fig. 1-2: per-pixel MSE on training (solid) and held-out (dashed) images, and the per-sigma
    memorization rate (+-2 SE), against sigma; the danger zone shaded, the medium swap band dotted."""
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    mse_ax, mem_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (name, r) in enumerate(results.items()):
        sig = np.asarray(r["sigmas"])
        mse_ax.plot(sig, r["mse_train"], color=f"C{i}", marker="o", ms=3, label=f"{labels[name]}: train")
        mse_ax.plot(sig, r["mse_heldout"], color=f"C{i}", ls="--", marker="x", ms=3, label=f"{labels[name]}: held-out")
        _rate_curve(mem_ax, sig, r["mem_rate"], r["mem_stderr"], f"C{i}", labels[name])
    for ax in (mse_ax, mem_ax):
        _log_axis(ax)
        ax.axvspan(*band, color="red", alpha=0.12, lw=0, label="danger zone (data only)")
        for edge in swap_bands_from_steps(SWAP_PRESETS["medium"])[0]:
            ax.axvline(edge, color="gray", ls=":", lw=1)
    mse_ax.set_yscale("log")
    mse_ax.set_ylim(bottom=MSE_FLOOR)  # the empirical denoiser's training error reaches 0 at small sigma
    mse_ax.set_ylabel("MSE per pixel")
    mse_ax.set_title(f"Per-sigma denoising error (eq. 5), {s['eval_images']} images per set", fontsize=10)
    mse_ax.legend(fontsize=7)
    mem_ax.set_ylim(-0.02, 1.02)
    mem_ax.set_ylabel("fraction of denoised held-out images memorized")
    mem_ax.set_title(f"Per-sigma memorization ({s['eval_images']} held-out images; dotted: medium band)", fontsize=10)
    mem_ax.legend(fontsize=7)
    return fig


def plot_mitigation(rows: dict, band: list[float], s: dict) -> Figure:
    """Per-sigma memorization of baseline, gap and reweighted models (calmwild's plot_sigma_curves), band shaded."""
    curves = {name: (r["mem_rate"], r["mem_stderr"]) for name, r in rows.items()}
    fig = plot_sigma_curves(rows["baseline"]["sigmas"], curves,
                            ylabel="fraction of denoised held-out images memorized", unit_interval=True,
                            title=f"Per-sigma memorization after gap / reweighted training (N={s['small_n']})")
    ax = fig.axes[0]
    ax.axvspan(*band, color="red", alpha=0.12, lw=0, label="band removed / down-weighted")
    ax.legend(fontsize=8)
    return fig


def plot_memorization_vs_steps(trained: dict, s: dict) -> Figure:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, t) in enumerate(trained.items()):
        _rate_curve(ax, [h["step"] for h in t["history"]], [h["rate"] for h in t["history"]],
                    [h["stderr"] for h in t["history"]], f"C{i}", f"{name} (N={t['num_train']})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("trajectory memorization rate")
    ax.set_title(f"Memorization against iterations ({s['traj_samples']} EMA samples per point)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_risk(scores: dict, counts: torch.Tensor, per_step: list[dict], final: dict) -> Figure:
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.scatter(scores[risk.PRIMARY_SCORE].numpy(), counts.numpy(), s=14)
    rho = final["scores"][risk.PRIMARY_SCORE]["spearman"]
    left.set_xlabel(f"risk score: {risk.PRIMARY_SCORE} (relative nearest-neighbour distance)")
    left.set_ylabel("memorized samples reproducing the image")
    left.set_title(f"Final small model: Spearman rho = {_fmt(rho)}", fontsize=10)
    left.grid(True, alpha=0.3)
    steps = [p["step"] for p in per_step]
    for i, name in enumerate(scores):
        values = [np.nan if p["scores"][name]["spearman"] is None else p["scores"][name]["spearman"] for p in per_step]
        right.plot(steps, values, marker="o", ms=3, color=f"C{i}", label=name)
    random = [np.nan if p["random"]["spearman"] is None else p["random"]["spearman"] for p in per_step]
    null = stats.spearman_null_std(len(counts))
    right.plot(steps, random, color="k", ls="--", lw=1, label="seeded random score")
    right.axhspan(-2 * null, 2 * null, color="gray", alpha=0.2, lw=0, label="chance ± 2 null SD")
    right.axhline(0, color="k", lw=0.6)
    right.set_ylim(-1, 1)
    right.set_xlabel("training step (small model)")
    right.set_ylabel("Spearman rho: score vs times reproduced")
    right.set_title("Which images are reproduced, during training (SampleGrid samples)", fontsize=10)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------------ claims
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def claim_medium_sigma(per_sigma: dict) -> dict:
    r, emp = per_sigma["models"]["small"], per_sigma["models"]["empirical"]
    lo, hi = swap_bands_from_steps(SWAP_PRESETS["medium"])[0]
    peak, at = r["peak_rate"], r["peak_sigma"]
    low_end, high_end = r["mem_rate"][0], r["mem_rate"][-1]
    inside = at is not None and lo <= at <= hi
    near = at is not None and lo / 2 <= at <= 2 * hi
    ends_low = peak > 0 and low_end <= 0.25 * peak and high_end <= 0.25 * peak
    if peak >= 0.1 and inside and ends_low:
        status = "reproduced"
    elif peak >= 0.1 and (inside or near):
        status = "partly"
    else:
        status = "not reproduced"
    evidence = (f"small model: peak per-sigma memorization {_pct(peak)} at σ = {_fmt(at)} (medium band "
                f"{lo:.3g}-{hi:.3g}); {_pct(low_end)} at σ = {r['sigmas'][0]:.3g} and {_pct(high_end)} at "
                f"σ = {r['sigmas'][-1]:.3g}; empirical denoiser {_pct(emp['mem_rate'][0])} at "
                f"σ = {emp['sigmas'][0]:.3g}; "
                f"large model peak {_pct(per_sigma['models']['large']['peak_rate'])} "
                f"({r['mem_num_items']} held-out images per σ)")
    return {"status": status, "evidence": evidence,
            "numbers": {"peak_rate": peak, "peak_sigma": at, "rate_smallest_sigma": low_end,
                        "rate_largest_sigma": high_end, "medium_band": [lo, hi]}}


def claim_swap(swap: dict) -> dict:
    deltas, lines, ok_both, largest_any = {}, [], True, False
    for direction, row in swap["table"].items():
        base = row["none"]["rate"]
        d = {band: abs(row[band]["rate"] - base) for band in BANDS}
        deltas[direction] = d
        other = max(d["large"], d["small"])
        ok_both &= d["medium"] >= 0.2 and d["medium"] >= 2 * other
        largest_any |= d["medium"] > other
        lines.append(f"{direction.replace('_with_', ' with ')} in band: none {_pct(base)}, large "
                     f"{_pct(row['large']['rate'])}, medium {_pct(row['medium']['rate'])}, small "
                     f"{_pct(row['small']['rate'])}")
    status = "reproduced" if ok_both else "partly" if largest_any else "not reproduced"
    return {"status": status, "evidence": "; ".join(lines) + f" ({swap['num_samples']} samples each)",
            "numbers": {"abs_change": deltas}}


def claim_gap(mitigation: dict) -> dict:
    base, gap = mitigation["models"]["baseline"], mitigation["models"]["gap"]
    rate_b, rate_g = base["trajectory"]["rate"], gap["trajectory"]["rate"]
    fd_b, fd_g = base["fid"]["fid"], gap["fid"]["fid"]
    cut = 1 - rate_g / rate_b if rate_b > 0 else None
    fd_ratio = fd_g / fd_b if fd_b > 0 else math.inf
    if rate_b < 0.1 or cut is None:
        status = "not reproduced"
    elif cut >= 0.5 and fd_ratio <= 1.25:
        status = "reproduced"
    elif cut >= 0.5 or (cut >= 0.2 and fd_ratio <= 1.25):
        status = "partly"
    else:
        status = "not reproduced"
    rw = mitigation["models"]["reweighted"]
    feature = base["fid"]["feature_extractor"]
    evidence = (f"memorized: baseline {_pct(rate_b)}, gap {_pct(rate_g)} (cut {_pct(cut)}), reweighted "
                f"{_pct(rw['trajectory']['rate'])}; Frechet distance [{feature}, {base['fid']['num_samples']} samples "
                f"vs {base['fid']['num_reference']} held-out]: baseline {_fmt(fd_b)}, gap {_fmt(fd_g)} "
                f"(x{_fmt(fd_ratio)}), reweighted {_fmt(rw['fid']['fid'])}")
    return {"status": status, "evidence": evidence,
            "numbers": {"baseline_rate": rate_b, "gap_rate": rate_g, "cut": cut, "fd_baseline": fd_b, "fd_gap": fd_g,
                        "fd_ratio": fd_ratio, "reweighted_rate": rw["trajectory"]["rate"],
                        "fd_reweighted": rw["fid"]["fid"]}}


def claim_danger_zone(geometry: dict, per_sigma: dict) -> dict:
    lo, hi = geometry["band"]
    r = per_sigma["models"]["small"]
    peak, at = r["peak_rate"], r["peak_sigma"]
    if peak < 0.1 or at is None:
        status = "not reproduced"
    elif lo <= at <= hi:
        status = "reproduced"
    elif lo / 2 <= at <= 2 * hi:
        status = "partly"
    else:
        status = "not reproduced"
    factor = None if at is None else (1.0 if lo <= at <= hi else max(lo / at, at / hi))
    where = ("n/a" if factor is None else "inside the zone" if factor == 1.0
             else f"a factor {factor:.3g} outside the zone")
    evidence = (f"danger zone σ {lo:.3g}-{hi:.3g} ({geometry['band_source']}); small model's per-sigma memorization "
                f"peaks at σ = {_fmt(at)} ({_pct(peak)}), {where}; "
                f"empirical denoiser crosses 50% at σ ≈ {_fmt(_crossing(per_sigma['models']['empirical'], 0.5))}")
    return {"status": status, "evidence": evidence,
            "numbers": {"zone": [lo, hi], "peak_sigma": at, "peak_rate": peak, "factor_outside": factor}}


def _crossing(result: dict, level: float) -> float | None:
    """The largest sigma at which the per-sigma memorization rate is still >= level (None if never)."""
    above = [s for s, r in zip(result["sigmas"], result["mem_rate"]) if r >= level]
    return max(above) if above else None


def claim_risk(risk_result: dict) -> dict:
    primary = risk_result["final"]["scores"][risk.PRIMARY_SCORE]
    rho, n = primary["spearman"], risk_result["num_train"]
    null = stats.spearman_null_std(n)
    if rho is None:
        status = "not reproduced"
    elif rho >= 2 * null:
        status = "reproduced"
    elif rho >= null:
        status = "partly"
    else:
        status = "not reproduced"
    random = risk_result["final"]["random"]
    evidence = (f"final small model, {risk.PRIMARY_SCORE}: Spearman rho {_fmt(rho)} (null SD {null:.3g}), AUROC "
                f"{_fmt(primary['auroc'])}; seeded random score: rho {_fmt(random['spearman'])}, AUROC "
                f"{_fmt(random['auroc'])}; "
                f"{risk_result['num_reproduced']} of {n} training images reproduced by "
                f"{risk_result['num_samples']} samples ({_pct(risk_result['rate'])} memorized)")
    early = first_partial_step(risk_result["per_step"])
    if early is not None:
        e = early["scores"][risk.PRIMARY_SCORE]
        evidence += (f". Post hoc, not part of the criterion: at step {early['step']} ({_pct(early['rate'])} "
                     f"memorized, {early['num_reproduced']} of {n} images reproduced) rho {_fmt(e['spearman'])}, AUROC "
                     f"{_fmt(e['auroc'])}")
    return {"status": status, "evidence": evidence,
            "numbers": {"spearman": rho, "null_std": null, "auroc": primary["auroc"],
                        "post_hoc_first_partial_step": None if early is None else {
                            "step": early["step"], **early["scores"][risk.PRIMARY_SCORE]}}}


def all_claims(results: dict) -> list[dict]:
    claims = [
        ("medium_sigma", "Memorization of the small-data model is concentrated at medium noise levels (Fig. 1-2)",
         claim_medium_sigma(results["per_sigma"])),
        ("swap", "Swapping the medium band moves trajectory memorization far more than the large or small band "
                 "(Table 1)", claim_swap(results["swap"])),
        ("gap", "Gap training (danger band removed) cuts memorization at comparable quality (Section 5)",
         claim_gap(results["mitigation"])),
        ("danger_zone", "The danger zone computed from the data alone matches where per-sigma memorization peaks "
                        "(Section 4)", claim_danger_zone(results["geometry"], results["per_sigma"])),
        ("risk", "Isolated training images (sparse local coverage) are the ones reproduced (seed 002)",
         claim_risk(results["risk"])),
    ]
    return [{"id": cid, "claim": text, **verdict, "criterion": CRITERIA[cid]} for cid, text, verdict in claims]


# ------------------------------------------------------------------------------------------------ report
def write_report(study: Study, stages: Stages, results: dict) -> dict:
    s, out = study.s, study.out
    claims = all_claims(results)
    geometry, per_sigma, swap, mit, rk = (results[k] for k in ("geometry", "per_sigma", "swap", "mitigation", "risk"))
    timings = {name: {"seconds": stages.seconds[name], "status": stages.status[name]} for name in stages.seconds}
    report = {"settings": s, "claims": claims, "results": results, "timings": timings,
              "commands": {**stages.commands, "report": []}}
    zone = geometry["danger_zone"]
    lines = [
        "# calmwild study: memorization in the wild middle",
        "",
        f"Mode **{s['mode']}**, data **{s['dataset']}** ({geometry['dataset']['dim']} dimensions): small training set "
        f"N = {s['small_n']}, large N = {s['large_n']}, {s['heldout_n']} held-out images; {s['steps']} steps of batch "
        f"{s['batch_size']} for every model; seed {s['seed']}. Memorization: d1/d2 < 1/3 against the training set.",
        "",
        f"Command: `{study.invocation}` (stages finished earlier are skipped; see Timings).",
        "",
        "## Claims",
        "",
        "| claim | verdict | numbers |",
        "|---|---|---|",
        *[f"| {c['claim']} | **{c['status']}** | {c['evidence']} |" for c in claims],
        "",
        "Criteria, fixed before the run:",
        "",
        *[f"- *{c['id']}*: {c['criterion']}" for c in claims],
        "",
        "## 1. Geometry before training",
        "",
        f"Danger zone of the small training set: σ {geometry['band'][0]:.3g}-{geometry['band'][1]:.3g}"
        + (f" (DDPM t {zone['timesteps'][0]:.0f}-{zone['timesteps'][1]:.0f})" if not zone["empty"] else "")
        + f"; {geometry['band_source']}. Gap / reweighted band: σ {geometry['gap_band'][0]:.3g}-"
        f"{geometry['gap_band'][1]:.3g} (margin {s['gap_margin']}).",
        "",
        f"![geometry]({geometry['files']['png']})",
        "",
        "## 2. Memorization against iterations",
        "",
        "| model | N | sigma sampler | " + " | ".join(f"step {h['step']}" for h in results["train"]["small"]["history"])
        + " |",
        "|---|---|---|" + "---|" * len(results["train"]["small"]["history"]),
        *[f"| {name} | {t['num_train']} | {_sampler_text(t['sigma_sampler'])} | "
          + " | ".join(_pct(h["rate"]) for h in t["history"]) + " |" for name, t in results["train"].items()],
        "",
        f"Trajectory memorization of {s['traj_samples']} EMA samples per point (callbacks.TrajectoryMemorization).",
        "",
        f"![memorization]({results['memorization_figure']})",
        "",
        "## 3. Per-sigma curves (paper Fig. 1-2)",
        "",
        "| denoiser | peak per-sigma memorization | at σ | trajectory memorization |",
        "|---|---|---|---|",
        *[f"| {per_sigma['labels'][name]} | {_pct(r['peak_rate'])} | {_fmt(r['peak_sigma'])} | "
          f"{_pct(r['trajectory']['rate'])} of {r['trajectory']['num_samples']} |"
          for name, r in per_sigma["models"].items()],
        "",
        f"![per-sigma]({per_sigma['figure']})",
        "",
        "## 4. Denoiser swap (paper Table 1)",
        "",
        f"Trajectory memorization (against the {swap['memorized_against']}) of {swap['num_samples']} samples, same "
        "noises in every row; the other model's denoiser is used inside the band only.",
        "",
        "| base model | no swap | large band | medium band | small band |",
        "|---|---|---|---|---|",
        *[f"| {d.replace('_with_', ' (other: ')}) | " + " | ".join(_pct(row[k]["rate"]) for k in ("none", *BANDS))
          + " |" for d, row in swap["table"].items()],
        "",
        "Bands (σ): " + ", ".join(f"{b} {lo:.3g}-{'∞' if hi is None else f'{hi:.3g}'}"
                                  for b, ((lo, hi),) in swap["bands"].items()) + ".",
        "",
        "## 5. Mitigation",
        "",
        "| model | sigma sampler | memorized | Frechet distance (extractor, samples vs reference) |",
        "|---|---|---|---|",
        *[f"| {name} | {_sampler_text(results['train']['small' if name == 'baseline' else name]['sigma_sampler'])} | "
          f"{_pct(r['trajectory']['rate'])} ± {_pct(r['trajectory']['stderr'])} of {r['trajectory']['num_samples']} | "
          f"{_fmt(r['fid']['fid'])} ({r['fid']['feature_extractor']}, {r['fid']['num_samples']} samples vs "
          f"{r['fid']['num_reference']} held-out) |" for name, r in mit["models"].items()],
        "",
        "The random-feature Frechet distance is a consistency check between these rows, not FID."
        if s["fid_feature"] == "random" else "Inception FID on few samples is biased upwards: compare rows only.",
        "",
        f"![mitigation]({mit['figure']})",
        "",
        "## 6. Which images get memorized",
        "",
        f"Scores from the small training set alone (kernel scores at σ = {rk['sigma']:.3g}, the geometric centre of "
        f"the danger band); reproduction counts from {rk['num_samples']} samples of the final small model "
        f"({_pct(rk['rate'])} memorized, {rk['num_reproduced']} of {rk['num_train']} images reproduced).",
        "",
        "| score | AUROC (reproduced at all) | Spearman (how often) |",
        "|---|---|---|",
        *[f"| {name}{' (primary)' if name == rk['primary'] else ''} | {_fmt(v['auroc'])} | {_fmt(v['spearman'])} |"
          for name, v in rk["final"]["scores"].items()],
        f"| seeded random score (seed {rk['final']['random']['seed']}) | {_fmt(rk['final']['random']['auroc'])} | "
        f"{_fmt(rk['final']['random']['spearman'])} |",
        f"| random scores, mean ± SD over {RANDOM_DRAWS} seeds | {_spread(rk['final']['random']['auroc_draws'])} | "
        f"{_spread(rk['final']['random']['spearman_draws'])} |",
        "",
        "During training (the samples of callbacks.SampleGrid at each checkpoint; AUROC / Spearman rho):",
        "",
        "| step | memorized | images reproduced | " + " | ".join(rk["final"]["scores"]) + " | random (seed) |",
        "|---|---|---|" + "---|" * (len(rk["final"]["scores"]) + 1),
        *[f"| {p['step']} | {_pct(p['rate'])} of {p['num_samples']} | {p['num_reproduced']} of {rk['num_train']} | "
          + " | ".join(f"{_fmt(v['auroc'])} / {_fmt(v['spearman'])}" for v in p["scores"].values())
          + f" | {_fmt(p['random']['auroc'])} / {_fmt(p['random']['spearman'])} |" for p in rk["per_step"]],
        "",
        "Null standard deviation of rho for independent scores: "
        f"{stats.spearman_null_std(rk['num_train']):.3g} (1 / sqrt(N - 1)). AUROC is undefined (n/a) when every "
        "image, or none, is reproduced.",
        "",
        f"![risk]({rk['files']['figure']})",
        "",
        *(["Memorized samples (left) beside their nearest training image (right):", "",
           f"![memorized]({rk['files']['memorized_pairs']})", ""] if "memorized_pairs" in rk["files"] else
          ["No sample of the final small model was memorized: no pairs to show.", ""]),
        f"Training images with the {rk['extremes_shown']} highest (top row) and the {rk['extremes_shown']} lowest "
        f"(bottom row) {risk.PRIMARY_SCORE} scores:",
        "",
        f"![extremes]({rk['files']['risk_extremes']})",
        "",
        "## Timings",
        "",
        "| stage | wall clock (s) | this invocation |",
        "|---|---|---|",
        *[f"| {name} | {t['seconds']:.1f} | {t['status']} |" for name, t in timings.items()],
        f"| total of the stages above | {sum(t['seconds'] for t in timings.values()):.1f} | |",
        "",
        "## Commands",
        "",
        "Every command of the study, by stage (the generated fit configs are in `configs/`):",
        "",
        "```",
        *[line for name, cmds in stages.commands.items() for line in (f"# {name}", *cmds)],
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    write_json(report, out / "report.json")
    return {"claims": {c["id"]: c["status"] for c in claims}, "files": ["report.md", "report.json"]}


def _spread(spread: dict | None) -> str:
    return "n/a" if spread is None else f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def _sampler_text(sampler: dict) -> str:
    kind = sampler["class_path"].rsplit(".", 1)[-1]
    init = sampler.get("init_args", {})
    if kind in ("Gap", "Reweighted"):
        (lo, hi), = init["bands"]
        extra = f", factor {init['factors']}" if kind == "Reweighted" else ""
        return f"{kind} σ {lo:.3g}-{hi:.3g}{extra}"
    return kind + (f"({', '.join(f'{k}={v}' for k, v in init.items())})" if init else "")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = resolve_settings(args)
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_same_settings(out, settings)
    study = Study(out, settings, device)
    study.invocation = shlex.join(["python", "scripts/study.py", *(sys.argv[1:] if argv is None else argv)])
    stages = Stages(out, study.commands)
    print(f"[study] mode {settings['mode']}, data {settings['dataset']}, output {out}", flush=True)

    study.write_config("small")
    study.write_config("large")
    load_datamodule(str(study.config("large")))  # fail now, not after hours of training, if the sizes do not fit

    results: dict[str, Any] = {}
    results["geometry"] = geometry = stages("geometry", (), study.geometry)
    study.write_config("gap", study.band_sampler("Gap", geometry["gap_band"]))
    study.write_config("reweighted", study.band_sampler("Reweighted", geometry["gap_band"]))
    if args.configs_only:
        print(f"[study] fit configs written to {out / 'configs'}; stopping (--configs-only)", flush=True)
        return {"out": str(out), "status": dict(stages.status), "seconds": dict(stages.seconds), "claims": {}}
    trained = {}
    for name in MODELS:
        deps = ("geometry",) if name in ("gap", "reweighted") else ()
        trained[name] = stages(f"train_{name}", deps, lambda name=name: study.train(name))
    results["train"] = trained
    train_stages = tuple(f"train_{m}" for m in MODELS)
    results["per_sigma"] = stages("per_sigma", ("geometry", "train_small", "train_large"),
                                  lambda: study.per_sigma(geometry, trained))
    results["swap"] = stages("swap", ("train_small", "train_large"), lambda: study.swap(trained))
    results["mitigation"] = stages("mitigation", ("geometry", "per_sigma", "train_gap", "train_reweighted"),
                                   lambda: study.mitigation(geometry, trained, results["per_sigma"]))
    results["risk"] = stages("risk", ("geometry", "train_small"), lambda: study.risk(geometry, trained))

    def report() -> dict:
        results["memorization_figure"] = study.memorization_figure(trained)
        return write_report(study, stages, results)

    summary = stages("report", ("geometry", *train_stages, "per_sigma", "swap", "mitigation", "risk"), report)
    total = sum(stages.seconds.values())
    print("[study] stage timings: " + ", ".join(f"{k} {v:.1f} s ({stages.status[k]})"
                                                 for k, v in stages.seconds.items()), flush=True)
    print(f"[study] claims: {summary['claims']}; report: {out / 'report.md'} (stages total {total:.1f} s)", flush=True)
    return {"out": str(out), "status": dict(stages.status), "seconds": dict(stages.seconds),
            "claims": summary["claims"]}


if __name__ == "__main__":
    main()
