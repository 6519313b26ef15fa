"""The study's stages, each built from calmwild's own commands (``fit``, ``evaluate``, ``analyze``, ``sample``,
``swap``) and results on disk:

1. :meth:`Study.regime`: the baseline at every size of the sweep (one seed), trajectory memorization against N; N* by
   :func:`study.criteria.choose_regime`, bisecting in log N when no size of the grid falls in the band.
2. :meth:`Study.geometry`: ``calmwild analyze`` of the N* training set: the danger zone, the gap band
   (:func:`calmwild.geometry.zone.gap_band`, the library's one rule), the placebo bands
   (:func:`calmwild.placebo.placebo_bands`), Remark 4.3 and the per-image risk scores.
3. :meth:`Study.arm_models`: baseline, gap, reweighted, dummy class and both placebos at N*, each with every seed.
4. :meth:`Study.swap_units`: the N* baseline and the largest-N baseline swapped in each band, both directions, on
   blocks of noise shared by every band: the paper's step bands and bands placed by the data. (3 and 4 run as one
   batch: the swaps need only the regime's models.)
5. :meth:`Study.risk`: the risk scores against which images the N* baseline over-reproduces.

Each model is trained and then evaluated (``calmwild evaluate`` on its newest ``last.ckpt``: trajectory memorization
of ``samples`` samples, per-sigma curves, Frechet distance and KID) in one unit of work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from calmwild import sigma as sigma_samplers
from calmwild import stats
from calmwild.denoisers import SWAP_PRESETS, swap_bands_from_steps
from calmwild.geometry import risk as risk_scores
from calmwild.geometry.zone import gap_band
from calmwild.placebo import placebo_bands
from calmwild.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, checkpoint_step, find_latest_run
from calmwild.schedule import edm_sigma_steps
from calmwild.stats import wilson_interval
from study import criteria
from study.configs import ARMS, Configs, Model, band_sampler
from study.lanes import Lanes, Ledger, Unit
from study.settings import SWAP_SEEDS

STEP_BANDS = ("large", "medium", "small")
ZONE_BANDS = ("below", "zone", "above")
SIGMA_CEILING = 1e9  # the open upper end of the "above the zone" swap band


class TrainingNeeded(Exception):
    """``--configs-only``: models that must be trained before the study can go on (their configs are written)."""

    def __init__(self, configs: list[Path]):
        super().__init__(f"{len(configs)} models to train")
        self.configs = configs


class Study:
    """The state of one study: settings, output directory, the configs, the ledger and the lanes."""

    def __init__(self, out: Path, settings: dict[str, Any], device: str, lanes: Lanes, configs_only: bool = False):
        self.out, self.s, self.device, self.lanes = out, settings, device, lanes
        self.configs = Configs(out, settings)
        self.ledger = Ledger(out)
        self.configs_only = configs_only
        self.sigmas = [float(f"{x:.6g}") for x in edm_sigma_steps(settings["sigma_levels"]).flip(0).tolist()]

    # ------------------------------------------------------------------------------------------------ one model
    def _fit_command(self, model: Model, config: Path) -> list[str] | None:
        """``calmwild fit`` of the model: fresh, resumed from its run's ``last.ckpt``, or None when that run is done."""
        try:
            last = find_latest_run(self.configs.root(model)) / CHECKPOINT_DIR / LAST_CHECKPOINT
        except FileNotFoundError:
            return ["fit", "--config", str(config)]
        if checkpoint_step(last) >= self.s["steps"]:
            return None
        return ["fit", "--config", str(config), "--ckpt_path", str(last)]

    def _evaluate_command(self, model: Model, config: Path) -> list[str]:
        s = self.s
        argv = ["evaluate", "--ckpt", str(self.configs.root(model)), "--data", str(config),
                "--out", str(self.out / "models" / model.name), "--overwrite", "true",
                "--per_sigma.sigmas", json.dumps(self.sigmas), "--per_sigma.num_images", str(s["per_sigma_images"]),
                "--per_sigma.seed", str(s["sampling_seed"]), "--num_samples", str(s["samples"]),
                "--threshold", str(s["threshold"]), "--sampling.seed", str(s["sampling_seed"]),
                "--fid.feature_extractor", s["fid_feature"], "--fid.reference", "heldout",
                "--fid.cache_dir", str(self.out / "fid_cache"), "--device", self.device]
        if s["fid_weights_path"]:
            argv += ["--fid.weights_path", s["fid_weights_path"]]
        return argv

    def _model_unit(self, model: Model, sampler: dict | None) -> tuple[Unit, Path | None]:
        config = self.configs.write(model, sampler)
        fit = self._fit_command(model, config)
        commands = ([fit] if fit else []) + [self._evaluate_command(model, config)]
        unit = Unit(model.name, commands, lambda returned: self._collect_model(model, config, returned[-1]),
                    label=f"{'train + ' if fit else ''}evaluate {model.name}")
        return unit, (config if fit else None)

    def _collect_model(self, model: Model, config: Path, report: dict) -> dict:
        run_dir = find_latest_run(self.configs.root(model))
        history = json.loads((run_dir / "eval" / "trajectory_memorization" / "history.json").read_text())["history"]
        traj, mem, mse, fid = (report[k] for k in ("trajectory_memorization", "per_sigma_memorization",
                                                   "per_sigma_mse", "fid"))
        return {
            "model": model._asdict(), "name": model.name, "config": str(config), "run_dir": str(run_dir),
            "evaluation_dir": str(self.out / "models" / model.name),
            "trajectory": {"rate": traj["rate"], "num_samples": traj["num_samples"],
                           "num_memorized": traj["num_memorized"],
                           "interval": wilson_interval(traj["num_memorized"], traj["num_samples"]).as_dict()},
            "history": [{"step": h["step"], "rate": h["traj_mem/rate"], "num_samples": int(h["traj_mem/num_samples"])}
                        for h in history],
            "per_sigma": {"sigmas": mem["sigmas"], "rate": mem["rate"], "stderr": mem["stderr"],
                          "num_items": mem["num_items"], "mse_train": mse["train"]["mse_per_pixel"],
                          "mse_heldout": mse["heldout"]["mse_per_pixel"]},
            "quality": {key: fid[key] for key in ("fid", "kid", "kid_std", "num_samples", "num_reference",
                                                  "feature_extractor")},
        }

    def model_units(self, models: list[tuple[Model, dict | None]]) -> list[Unit]:
        """A unit per (model, sampler) that trains (or resumes) and evaluates it; with ``--configs-only`` raises
        :class:`TrainingNeeded` when any of them is untrained, after writing every config."""
        units, untrained = [], []
        for model, sampler in models:
            if self.ledger.cached(model.name) is not None:
                units.append(Unit(model.name, [], lambda _: {}))  # done earlier: the lanes read it back
                continue
            unit, needs_fit = self._model_unit(model, sampler)
            units.append(unit)
            if needs_fit is not None:
                untrained.append(needs_fit)
        if self.configs_only and untrained:
            raise TrainingNeeded(untrained)
        return units

    def run_models(self, models: list[tuple[Model, dict | None]]) -> dict[str, dict]:
        """Trains (or resumes) and evaluates each (model, sampler): name -> result."""
        return self.lanes.run(self.ledger, self.model_units(models))

    # ------------------------------------------------------------------------------------------------ 1. regime
    def regime(self) -> dict:
        seed = self.s["seeds"][0]
        results = self.run_models([(Model("baseline", n, seed), None) for n in self.s["sizes"]])
        rates = {r["model"]["num_train"]: r["trajectory"]["rate"] for r in results.values()}
        refinements = []
        for _ in range(self.s["refine_rounds"]):
            choice = criteria.choose_regime(rates)
            if choice["n_star"] is not None or choice["bracket"] is None:
                break
            low, high = choice["bracket"]
            size = round(math.sqrt(low * high))
            if size in rates:
                break
            refinements.append({"between": [low, high], "size": size})
            more = self.run_models([(Model("baseline", size, seed), None)])
            results.update(more)
            rates[size] = next(iter(more.values()))["trajectory"]["rate"]
        choice = criteria.choose_regime(rates)
        n_star, in_band = choice["n_star"], True
        if n_star is None:  # no size in the band even after bisecting: the nearest rate, said plainly
            n_star, in_band = min(rates, key=lambda n: (abs(rates[n] - criteria.REGIME_TARGET), -n)), False
        by_size = {r["model"]["num_train"]: r for r in results.values()}
        return {"n_star": n_star, "in_band": in_band, "band": list(criteria.REGIME_BAND),
                "target": criteria.REGIME_TARGET, "refinements": refinements,
                "sizes": {str(n): by_size[n] for n in sorted(by_size)}}

    # ------------------------------------------------------------------------------------------------ 2. geometry
    def base_sampler(self) -> sigma_samplers.SigmaSampler:
        spec = self.configs.base_sampler()
        return getattr(sigma_samplers, spec["class_path"].rsplit(".", 1)[-1])(**spec.get("init_args", {}))

    def geometry(self, n_star: int) -> dict:
        model = Model("baseline", n_star, self.s["seeds"][0])
        config = self.configs.write(model)
        out = self.out / f"geometry_N{n_star}"
        argv = ["analyze", "--data", str(config), "--out", str(out), "--overwrite", "true", "--device", self.device,
                "--risk_k", str(self.s["risk_k"])]
        argv += [x for key, value in self.s["geometry"].items() for x in (f"--geometry.{key}", str(value))]
        unit = Unit(f"geometry_N{n_star}", [argv], lambda returned: self._collect_geometry(out),
                    label=f"analyze the N={n_star} training set")
        return self.lanes.run(self.ledger, [unit])[unit.name]

    def _collect_geometry(self, out: Path) -> dict:
        report = json.loads((out / "geometry.json").read_text())
        zone = report["danger_zone"]
        band = gap_band(zone, self.s["gap_margin"], if_empty="crossing")
        zone_band = list(zone["sigma"]) if zone["sigma"] is not None else list(gap_band(zone, 1.0, "crossing"))
        base = self.base_sampler()
        placebos = {side: p.to_dict() for side, p in placebo_bands(base, band).items()}
        return {"dir": str(out), "zone": zone_band, "zone_empty": zone["sigma"] is None,
                "danger_zone": zone, "gap_band": list(band), "gap_mass": base.mass(*band),
                "margin": self.s["gap_margin"], "placebos": placebos, "remark_4_3": report["remark_4_3"],
                "thresholds": report["thresholds"]["summary"],
                "sigmas": report["sigmas"], "max_weight": report["max_weight"]["mean"],
                "coverage": report["coverage"]["mean"], "dataset": report["dataset"], "base": base.describe()}

    # ------------------------------------------------------------------------------------------------ 3. arms
    def arm_sampler(self, arm: str, geometry: dict) -> dict | None:
        base = self.configs.base_sampler()
        if arm == "gap":
            return band_sampler(base, "Gap", geometry["gap_band"])
        if arm == "reweighted":
            return band_sampler(base, "Reweighted", geometry["gap_band"], self.s["reweight_factor"])
        if arm.startswith("placebo_"):
            return band_sampler(base, "Gap", geometry["placebos"][arm.removeprefix("placebo_")]["sigma"])
        return None

    def arm_models(self, n_star: int, geometry: dict) -> dict[str, list[tuple[Model, dict | None]]]:
        """Per arm, its (model, sampler) for every seed; a placebo side without any training mass is left out."""
        present = [arm for arm in ARMS if not arm.startswith("placebo_")
                   or arm.removeprefix("placebo_") in geometry["placebos"]]
        return {arm: [(Model(arm, n_star, seed), self.arm_sampler(arm, geometry)) for seed in self.s["seeds"]]
                for arm in present}

    @staticmethod
    def arms_result(arm_models: dict[str, list[tuple[Model, dict | None]]], results: dict[str, dict]) -> dict:
        return {arm: {"sampler": models[0][1], "models": [results[model.name] for model, _ in models]}
                for arm, models in arm_models.items()}

    # ------------------------------------------------------------------------------------------------ 4. swap
    def swap_bands(self, geometry: dict) -> dict[str, dict[str, list[list[float]]]]:
        low, high = geometry["zone"]
        steps = {band: [[low, min(high, SIGMA_CEILING)] for low, high in swap_bands_from_steps(SWAP_PRESETS[band])]
                 for band in STEP_BANDS}
        zone = {"below": [[0.0, low]], "zone": [[low, high]], "above": [[high, SIGMA_CEILING]]}
        return {"steps": steps, "zone": zone}

    def swap_pair(self, n_star: int, sizes: list[int]) -> tuple[int, int]:
        """The sizes of the memorizing and the generalizing baseline: N* and the sweep's largest N (the smallest and
        N* when N* is the largest)."""
        return (n_star, max(sizes)) if n_star < max(sizes) else (min(sizes), n_star)

    def swap_units(self, n_star: int, sizes: list[int], geometry: dict) -> list[Unit]:
        """Per direction and block of noises, one unit: ``calmwild sample`` of the base and ``calmwild swap`` in
        every band, all on the same noises; memorization against the N* training set."""
        seed, s = self.s["seeds"][0], self.s
        small, large = self.swap_pair(n_star, sizes)
        roots = {"memorizing": self.configs.root(Model("baseline", small, seed)),
                 "generalizing": self.configs.root(Model("baseline", large, seed))}
        config = self.configs.path(Model("baseline", n_star, seed))
        cells = self.swap_cells(geometry)
        units = []
        for base, other in (("memorizing", "generalizing"), ("generalizing", "memorizing")):
            for block in SWAP_SEEDS[: s["swap_blocks"]]:
                name = f"swap_{base}_N{small}_vs_N{large}_block{block}"
                folder = self.out / "swap" / name
                common = ["--data", str(config), "--num", str(s["swap_samples"]), "--sampling.seed", str(block),
                          "--threshold", str(s["threshold"]), "--device", self.device, "--overwrite", "true"]
                commands = []
                for cell, cell_bands in cells.items():
                    if cell_bands is None:
                        commands.append(["sample", "--ckpt", str(roots[base]), "--out", str(folder / cell), *common])
                    else:
                        commands.append(["swap", "--base", str(roots[base]), "--other", str(roots[other]),
                                         "--sigma_bands", json.dumps(cell_bands), "--out", str(folder / cell),
                                         *common])
                units.append(Unit(name, commands, lambda returned, folder=folder: self._collect_swap(folder, cells),
                                  label=f"swap {base} base, noise block {block}"))
        return units

    def swap_cells(self, geometry: dict) -> dict[str, list[list[float]] | None]:
        """The swap's cells: no swap, the paper's step bands, the bands placed by the data."""
        bands = self.swap_bands(geometry)
        return {"none": None, **{f"steps_{b}": v for b, v in bands["steps"].items()},
                **{f"zone_{b}": v for b, v in bands["zone"].items()}}

    def swap_result(self, n_star: int, sizes: list[int], geometry: dict, results: dict[str, dict]) -> dict:
        small, large = self.swap_pair(n_star, sizes)
        cells = self.swap_cells(geometry)
        table: dict[str, dict[str, Any]] = {}
        for base in ("memorizing", "generalizing"):
            blocks = [results[f"swap_{base}_N{small}_vs_N{large}_block{block}"]
                      for block in SWAP_SEEDS[: self.s["swap_blocks"]]]
            table[base] = {cell: {"memorized": [flag for b in blocks for flag in b[cell]],
                                  "per_block": [sum(b[cell]) / len(b[cell]) for b in blocks]} for cell in cells}
        return {"bands": self.swap_bands(geometry), "table": table, "blocks": list(SWAP_SEEDS[: self.s["swap_blocks"]]),
                "samples_per_block": self.s["swap_samples"], "memorizing": f"baseline N={small}",
                "generalizing": f"baseline N={large}", "memorized_against": f"the N={n_star} training set"}

    @staticmethod
    def _collect_swap(folder: Path, cells: dict) -> dict:
        return {cell: json.loads((folder / cell / "per_sample.json").read_text())["memorized"] for cell in cells}

    # ------------------------------------------------------------------------------------------------ 5. risk
    def risk(self, geometry: dict, baseline: list[dict]) -> dict:
        saved = json.loads((Path(geometry["dir"]) / "risk.json").read_text())
        scores = {name: torch.tensor(values, dtype=torch.float64) for name, values in saved["per_image"].items()}
        num_train = len(next(iter(scores.values())))
        counts = torch.zeros(num_train, dtype=torch.long)
        for model in baseline:
            per_sample = json.loads((Path(model["evaluation_dir"]) / "per_sample.json").read_text())
            counts += risk_scores.reproduction_counts(per_sample["nearest_index"], per_sample["memorized"], num_train)
        memorized = int(counts.sum())
        over = counts.double() > memorized / num_train
        defined = 0 < int(over.sum()) < num_train
        random = risk_scores.random_scores(num_train, self.s["sampling_seed"])
        per_score = {}
        for name, values in {**scores, "seeded random": random}.items():
            per_score[name] = {
                "auroc": stats.auroc_interval(values, over).as_dict() if defined else None,
                "spearman": stats.spearman(values, counts) if bool((counts != counts[0]).any()) else None,
            }
        return {"num_train": num_train, "num_models": len(baseline), "memorized_samples": memorized,
                "counts": counts.tolist(), "over_reproduced": int(over.sum()),
                "reproduced_at_all": int((counts > 0).sum()), "primary": risk_scores.PRIMARY_SCORE,
                "scores": per_score, "spearman_null_std": stats.spearman_null_std(num_train),
                "risk_figure": str(Path(geometry["dir"]) / "risk.png")}


def arm_rates(arm: dict) -> list[float]:
    return [m["trajectory"]["rate"] for m in arm["models"]]
