"""What trading precision for speed costs in the quantity the paper measures: per-sigma MSE (paper eq. 5).

Two models are trained on the embedded digits from the same initialisation, seeds and batches, one with
``Trainer(precision="32-true")`` and one with ``"bf16-mixed"``; each is then evaluated on the held-out images with
the EMA network in float32 and under bf16 autocast (``NetworkDenoiser(precision=...)``), on the same noises
(:func:`calmwild.memorization.per_sigma_mse` pairs them by seed). Reported per sigma: the MSE of every
(training, evaluation) pair, its change relative to fp32/fp32, and the reference's standard error for scale, plus
the wall-clock ratios of training and evaluation. A change well inside the standard error is invisible in a
per-sigma curve; the paired differences are far more precise than that error, so they are given as well.
"""

from __future__ import annotations

import tempfile
import time

import lightning.pytorch as pl
import torch

from calmwild.data import DigitsDataModule
from calmwild.denoisers import NetworkDenoiser
from calmwild.memorization.per_sigma import per_sigma_errors
from calmwild.module import DiffusionModule
from calmwild.sigma import LogNormal
from calmwild.unet import UNet

from .common import ratio, say, synchronize

TRAIN_PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
EVAL_PRECISIONS = ("fp32", "bf16")
SIGMAS = (0.002, 0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)


def train(unet: dict, precision: str, data: DigitsDataModule, steps: int, device: torch.device) -> tuple:
    """A module trained ``steps`` steps with Trainer precision ``precision`` (same seed for every call), and the
    seconds the fit took."""
    torch.manual_seed(0)
    module = DiffusionModule(UNet(**unet), sigma_sampler=LogNormal(), lr=2e-3, lr_warmup_steps=20,
                             ema_halflife_images=2_000, seed=0)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1, precision=precision, max_steps=steps,
            default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        synchronize(device)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        synchronize(device)
    return module.to(device), time.perf_counter() - start


def evaluate(module: DiffusionModule, precision: str, heldout: torch.Tensor, num_noises: int,
             device: torch.device) -> tuple[torch.Tensor, float]:
    """Per-item squared errors [S, M] of the EMA network in ``precision`` on the held-out set, and the seconds."""
    denoiser = NetworkDenoiser(module.net_ema, precision=precision)
    synchronize(device)
    start = time.perf_counter()
    errors = per_sigma_errors(denoiser, heldout, SIGMAS, num_noises=num_noises, seed=0, device=device)
    synchronize(device)
    return errors, time.perf_counter() - start


def run(unet: dict, device: torch.device, steps: int, batch_size: int, num_heldout: int, num_noises: int) -> dict:
    unet = {**unet, "in_channels": 1}
    data = DigitsDataModule(num_train=500, num_heldout=num_heldout, resolution=unet["img_resolution"],
                            batch_size=batch_size)
    data.setup("fit")
    heldout = data.heldout_images
    say(f"precision: {len(TRAIN_PRECISIONS)} trainings x {steps} steps, per-sigma MSE on {heldout.shape[0]} "
        f"held-out digits x {num_noises} noises at {len(SIGMAS)} sigmas, evaluated in {', '.join(EVAL_PRECISIONS)}")
    errors, train_seconds, eval_seconds = {}, {}, {}
    for name, trainer_precision in TRAIN_PRECISIONS.items():
        module, train_seconds[name] = train(unet, trainer_precision, data, steps, device)
        for evaluation in EVAL_PRECISIONS:
            key = f"train {name} / eval {evaluation}"
            errors[key], eval_seconds[key] = evaluate(module, evaluation, heldout, num_noises, device)
    reference = errors["train fp32 / eval fp32"]
    ref_mse = reference.mean(dim=1)
    ref_se = reference.std(dim=1) / reference.shape[1] ** 0.5
    table = {}
    for key, err in errors.items():
        diff = err - reference  # paired: same images, same noises
        table[key] = {
            "mse_per_pixel": err.mean(dim=1).tolist(),
            "relative_change": (diff.mean(dim=1) / ref_mse).tolist(),
            "relative_change_stderr": (diff.std(dim=1) / reference.shape[1] ** 0.5 / ref_mse).tolist(),
            "max_abs_relative_change": float((diff.mean(dim=1) / ref_mse).abs().max()),
            "eval_seconds": eval_seconds[key],
        }
    return {
        "sizes": {"train_steps": steps, "batch_size": batch_size, "num_heldout": int(heldout.shape[0]),
                  "num_noises": num_noises, "unet": unet, "data": "embedded digits"},
        "sigmas": list(SIGMAS),
        "reference": "train fp32 / eval fp32",
        "reference_relative_stderr": (ref_se / ref_mse).tolist(),
        "per_sigma_mse": table,
        "train_seconds": train_seconds,
        "ratio_train_bf16_to_fp32_speed": ratio(train_seconds["fp32"], train_seconds["bf16"]),
        "ratio_eval_bf16_to_fp32_speed": ratio(eval_seconds["train fp32 / eval fp32"],
                                               eval_seconds["train fp32 / eval bf16"]),
    }
