"""The fit config of every model of the study, written from the dataset's template in ``configs/study/``.

A model is an arm (the training intervention), a training-set size and a training seed: ``baseline_N64_s1`` is the
baseline trained on the first 64 images with seed 1. Every model of a study shares the template's network and
recipe and the study's one budget (steps, batch, evaluation cadence); the arm changes only the noise-level sampler
(:mod:`calmwild.sigma`) or, for the dummy class, the data and the network's class input.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from study.settings import ROOT, TEMPLATES

ARMS = ("baseline", "gap", "reweighted", "dummy", "placebo_below", "placebo_above")


class Model(NamedTuple):
    arm: str
    num_train: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}_N{self.num_train}_s{self.seed}"


class Configs:
    """Writes ``<out>/configs/<model>.yaml``; each model trains into ``<out>/train/<model>/run-*``."""

    def __init__(self, out: Path, settings: dict[str, Any]):
        self.out, self.s = out, settings
        path = TEMPLATES[settings["dataset"]]
        self.template_path = path
        self.template = yaml.safe_load(path.read_text())
        for key in ("backbone",):  # a piece kept in its own file is inlined: the config is written elsewhere
            value = self.template["model"][key]
            if isinstance(value, str):
                self.template["model"][key] = yaml.safe_load((path.parent / value).read_text())

    def path(self, model: Model) -> Path:
        return self.out / "configs" / f"{model.name}.yaml"

    def root(self, model: Model) -> Path:
        return self.out / "train" / model.name

    def base_sampler(self) -> dict:
        return copy.deepcopy(self.template["model"]["sigma_sampler"])

    def write(self, model: Model, sampler: dict | None = None) -> Path:
        """The template with the model's size, seed and arm, and the study's budget."""
        s, cfg = self.s, copy.deepcopy(self.template)
        cfg["seed_everything"] = model.seed
        trainer = cfg["trainer"]
        trainer["max_steps"] = s["steps"]
        trainer["default_root_dir"] = str(self.root(model).resolve())
        for callback in trainer["callbacks"]:
            kind, init = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
            if kind == "ModelCheckpoint":
                init["every_n_train_steps"] = s["eval_every"]
            elif kind == "TrajectoryMemorization":
                init.update(every_n_steps=s["eval_every"], num_samples=s["trajectory_samples"],
                            threshold=s["threshold"], sampling={**init.get("sampling", {}), "seed": s["sampling_seed"]})
        data = cfg["data"]["init_args"]
        data.update(num_train=model.num_train, num_heldout=s["heldout"], batch_size=min(s["batch_size"],
                                                                                        model.num_train))
        if s["data_root"] is not None:
            data["root"] = s["data_root"]
        backbone = cfg["model"]["backbone"]["init_args"]
        if s["model_channels"] is not None:
            backbone["model_channels"] = s["model_channels"]
        if sampler is not None:
            cfg["model"]["sigma_sampler"] = sampler
        if model.arm == "dummy":  # Yoon et al. 2023: as many pure-noise images as a second class, sampled as class 0
            cfg["data"] = {"class_path": "calmwild.data.DummyClassDataModule",
                           "init_args": {"base": cfg["data"], "seed": model.seed}}
            backbone["num_classes"] = 2
            cfg["model"]["sample_class"] = 0
        path = self.path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Written by scripts/study.py from {self.template_path.relative_to(ROOT)}: model {model.name}\n"
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        return path


def band_sampler(base: dict, kind: str, band: list[float], factor: float | None = None) -> dict:
    """A :class:`calmwild.sigma.Gap` (or ``Reweighted`` with loss ``factor``) of ``base`` over one sigma band."""
    init: dict[str, Any] = {"base": base, "bands": [list(band)], "unit": "sigma"}
    if kind == "Reweighted":
        init["factors"] = factor
    return {"class_path": f"calmwild.sigma.{kind}", "init_args": init}
