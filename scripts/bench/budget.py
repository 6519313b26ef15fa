"""What evaluation costs during training, for every shipped fit config (``configs/*.yaml``): per evaluation round the
denoiser evaluations (one network forward of one image) each configured callback spends, the rounds over the whole
run, and both against training (one step = a forward and a backward of ``batch_size`` images, about three forwards
per image).

Counted as calmwild computes them: samples that TrajectoryMemorization, FID and SampleGrid draw with the same sampler
settings at the same step are generated once (``callbacks.sharding.SHARED_SAMPLES``) and counted once; a Heun run of
N steps costs 2N - 1 evaluations per sample; PerSigmaMSE denoises its training and held-out items at every level,
PerSigmaMemorization its held-out items, and the two denoise their held-out items once between them when they
evaluate the same items at the same step (``callbacks.per_sigma``; the evaluations saved are reported as
``held_out_evaluations_shared``). Seconds come from the measured time of one image forward and one training step
per image of the config's own network on ``device`` (timed at ``batch`` images and scaled linearly).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
import yaml

from calmwild.precond import EDMPrecond

from .common import rate, say, time_side_by_side, tf32

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SAMPLE_CALLBACKS = ("TrajectoryMemorization", "FID", "SampleGrid")


def _load(section: Any, folder: Path) -> Any:
    """A config section, read from its own file when it is given by path (calmwild's configs include pieces)."""
    return yaml.safe_load((folder / section).read_text()) if isinstance(section, str) else section


def read_config(path: Path) -> dict:
    """The fit config with its included pieces (trainer, data, model.backbone) read in."""
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"] = _load(cfg["trainer"], path.parent)
    cfg["data"] = _load(cfg["data"], path.parent)
    cfg["model"]["backbone"] = _load(cfg["model"]["backbone"], path.parent)
    return cfg


def _callback(spec: dict):
    """(class name, keyword arguments with the class's defaults filled in, settings dataclasses built)."""
    module, name = spec["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    given = spec.get("init_args") or {}
    args = {}
    for key, parameter in inspect.signature(cls.__init__).parameters.items():
        if key == "self" or parameter.default is inspect.Parameter.empty and key not in given:
            continue
        default = parameter.default
        value = given.get(key, default)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = dataclasses.replace(default, **value)
        args[key] = value
    return name, args


def _sampler_evaluations(sampling) -> int:
    return 2 * sampling.steps - 1 if sampling.solver == "heun" else sampling.steps


def evaluation_rounds(cfg: dict) -> dict:
    """Per callback: its steps over the run and the denoiser evaluations of one round; shared samples once."""
    trainer, data = cfg["trainer"], cfg["data"]["init_args"]
    if "base" in data:  # the dummy class wraps the real data
        data = data["base"]["init_args"]
    max_steps = int(trainer["max_steps"])
    num_train, num_heldout = int(data.get("num_train", 0) or 0), int(data.get("num_heldout", 0) or 0)
    steps_of: dict[int, list[tuple[str, dict]]] = {}
    per_callback = {}
    for spec in trainer.get("callbacks") or []:
        if not spec["class_path"].startswith("callbacks."):
            continue
        name, args = _callback(spec)
        every = int(args.get("every_n_steps", max_steps) or max_steps)
        steps = list(range(every, max_steps + 1, every))
        if args.get("at_train_end", False) and (not steps or steps[-1] != max_steps):
            steps.append(max_steps)
        if name == "DangerZone":
            steps = [0]
        evaluations, heldout, items = 0, 0, None
        if name in ("PerSigmaMSE", "PerSigmaMemorization"):
            ps = args["per_sigma"]
            items = ps.items_key()
            levels = len(ps.sigma_list())
            heldout = min(ps.num_images, num_heldout or ps.num_images) * ps.num_noises * levels
            train = min(ps.num_images, num_train or ps.num_images) * ps.num_noises * levels
            evaluations = heldout + (train if name == "PerSigmaMSE" else 0)
        elif name == "EarlyDetection":
            evaluations = args["num_samples"] * _sampler_evaluations(args["sampling"])
        per_callback[name] = {"every_n_steps": every, "rounds": len(steps), "evaluations_per_round": evaluations,
                              "held_out_evaluations_per_round": heldout,
                              "items": items}
        for step in steps:
            steps_of.setdefault(step, []).append((name, args))
    per_step: dict[int, int] = {}
    shared_samples, shared_held_out = 0, 0
    for step, entries in steps_of.items():
        samples: dict[tuple, tuple[int, int]] = {}
        held_out_passes: set[tuple] = set()  # the held-out items already denoised at this step
        cost = 0
        for name, args in entries:
            if name in SAMPLE_CALLBACKS:
                s = args["sampling"]
                key = (s.seed, s.steps, s.solver, s.s_churn, s.precision)
                count = max(samples.get(key, (0, 0))[0], int(args["num_samples"]))
                samples[key] = (count, _sampler_evaluations(s))
                continue
            entry = per_callback[name]
            cost += entry["evaluations_per_round"]
            if entry["items"] is not None:
                held_out = entry["items"]
                if held_out in held_out_passes:
                    cost -= entry["held_out_evaluations_per_round"]
                    shared_held_out += entry["held_out_evaluations_per_round"]
                held_out_passes.add(held_out)
        drawn = sum(count * per_sample for count, per_sample in samples.values())
        per_step[step] = cost + drawn
        shared_samples += drawn
    total = sum(per_step.values())
    for entry in per_callback.values():
        entry.pop("items")
    batch = int(data.get("batch_size", 512))
    training = max_steps * batch * 3
    return {"max_steps": max_steps, "batch_size": batch, "callbacks": per_callback,
            "evaluations_total": total, "heaviest_round_evaluations": max(per_step.values(), default=0),
            "of_which_shared_samples": shared_samples,
            "held_out_evaluations_shared": shared_held_out,
            "training_forward_equivalents": training,
            "evaluation_share_of_training": total / training if training else None}


def _measure(unet: dict, device: torch.device, batch: int, repeats: int) -> dict:
    """Seconds per image of one network forward (no grad) and of one training step (forward + backward) of the
    config's network at ``batch`` images."""
    module, name = unet["class_path"].rsplit(".", 1)
    net = EDMPrecond(getattr(importlib.import_module(module), name)(**unet["init_args"])).to(device)
    args = unet["init_args"]
    shape = (args["in_channels"], args["img_resolution"], args["img_resolution"])
    x = torch.randn(batch, *shape, device=device)
    sigma = torch.full((batch,), 0.5, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if args.get("num_classes") else None

    def forward() -> None:
        with torch.no_grad():
            net(x, sigma, labels)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x, sigma, labels).square().mean().backward()

    with tf32(False):
        times, _ = time_side_by_side({"forward": forward, "train_step": step}, device, repeats)
    return {"forward_seconds_per_image": rate(times["forward"], 1, "per_s")["seconds"] / batch,
            "train_step_seconds_per_image": rate(times["train_step"], 1, "per_s")["seconds"] / batch,
            "measured_at_batch": batch}


def run(device: torch.device, batch: int, repeats: int) -> dict:
    out: dict[str, Any] = {"configs": {}}
    measured: dict[str, dict] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = read_config(path)
        counts = evaluation_rounds(cfg)
        unet = cfg["model"]["backbone"]
        key = yaml.safe_dump(unet, sort_keys=True)
        if key not in measured:
            say(f"budget: timing the network of {path.name} at batch {batch}")
            measured[key] = _measure(unet, device, batch, repeats)
        speed = measured[key]
        evaluation_seconds = counts["evaluations_total"] * speed["forward_seconds_per_image"]
        step_seconds = counts["batch_size"] * speed["train_step_seconds_per_image"]
        training_seconds = counts["max_steps"] * step_seconds
        out["configs"][path.name] = {
            **counts, "speed": speed,
            "evaluation_seconds_estimate": evaluation_seconds,
            "training_seconds_estimate": training_seconds,
            "evaluation_share_of_training_seconds": evaluation_seconds / training_seconds,
            "heaviest_round_in_training_steps":
                counts["heaviest_round_evaluations"] * speed["forward_seconds_per_image"] / step_seconds,
        }
    return out
