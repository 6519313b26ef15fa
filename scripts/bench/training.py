"""Training throughput (images/s): ``DiffusionModule`` driven by ``lightning.pytorch.Trainer.fit`` against a plain
PyTorch loop that calls the same module's hooks (``on_train_batch_start``, ``training_step``, backward,
``on_before_optimizer_step``, Adam, ``on_train_batch_end`` = the EMA update) on the same dataloader.

Both paths run ``warmup + timed`` optimizer steps on a fresh, identically initialised module; the clock starts at
the beginning of step ``warmup`` (after its batch is fetched: Lightning's ``on_train_batch_start``) and stops
after the last step (Lightning: ``on_train_end``, so its end-of-epoch bookkeeping is counted as overhead). The ratio
lightning / plain is the share of speed kept through Lightning; the issue's target is an overhead below 5 %.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from calmwild.data import InMemoryImageDataModule
from calmwild.module import DiffusionModule
from calmwild.sigma import LogNormal
from calmwild.unet import UNet, count_parameters

from .common import random_images, rate, ratio, say, synchronize, time_side_by_side, tf32


@dataclass(frozen=True)
class Variant:
    """One training configuration: Trainer precision, TF32, and the module's memory-format / compile flags."""

    name: str
    precision: str = "32-true"
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32"),
        Variant("tf32", tf32=True),
        Variant("bf16-mixed", precision="bf16-mixed", tf32=True),
        Variant("bf16-mixed+channels_last", precision="bf16-mixed", tf32=True, channels_last=True),
        Variant("bf16-mixed+channels_last+compile", precision="bf16-mixed", tf32=True, channels_last=True,
                compile=True),
    )
}
CUDA_VARIANTS = tuple(VARIANTS)
CPU_VARIANTS = ("fp32",)


class RandomImageDataModule(InMemoryImageDataModule):
    """Random image-like tensors held in memory (:func:`bench.common.random_images`), served like any calmwild
    datamodule (per-epoch seeded order, fixed batch size)."""

    def __init__(self, num_train: int, num_heldout: int, image_shape: tuple[int, int, int], data_seed: int = 0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.num_train, self.num_heldout = num_train, num_heldout
        self.shape, self.data_seed = tuple(image_shape), data_seed

    def origin(self) -> str:
        return f"scripts/bench random_images(seed={self.data_seed})"

    def load(self):
        cpu = torch.device("cpu")
        train = random_images(self.num_train, self.shape, self.data_seed, cpu)
        heldout = random_images(self.num_heldout, self.shape, self.data_seed + 1, cpu)
        return train, heldout, None


class _TrainerStandIn:
    """The few Trainer attributes DiffusionModule's step hooks read, for driving them from a plain loop.

    ``training_step`` dereferences ``self.trainer`` unconditionally, which raises without a Trainer, so the plain
    loop attaches this. ``barebones = True`` makes ``self.log`` return at once (a plain loop logs nothing)."""

    barebones = True
    world_size = 1
    global_rank = 0
    loggers: list = []

    def __init__(self) -> None:
        self.global_step = 0
        self.strategy = self

    @staticmethod
    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:  # noqa: A002 (Lightning's name)
        return decision


class _StepClock(Callback):
    """Records the time at ``on_train_batch_start`` of step ``start_step`` and at ``on_train_end``."""

    def __init__(self, start_step: int, device: torch.device):
        self.start_step, self.device = start_step, device
        self.start = self.end = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None and trainer.global_step == self.start_step:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.start_step


def build_module(unet_config: dict, variant: Variant, seed: int = 0) -> DiffusionModule:
    torch.manual_seed(seed)
    return DiffusionModule(UNet(**unet_config), sigma_sampler=LogNormal(), channels_last=variant.channels_last,
                           compile=variant.compile, seed=seed)


def lightning_seconds(module: DiffusionModule, data: RandomImageDataModule, variant: Variant, device: torch.device,
                      warmup: int, steps: int) -> float:
    """Seconds of ``steps`` optimizer steps after ``warmup`` steps of ``Trainer.fit``."""
    clock = _StepClock(warmup, device)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision=variant.precision, max_steps=warmup + steps, callbacks=[clock], default_root_dir=root,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=data)
    if clock.start is None or clock.steps != steps:
        raise RuntimeError(f"Lightning ran {clock.steps} timed steps, expected {steps}")
    return clock.end - clock.start


def plain_seconds(module: DiffusionModule, data: RandomImageDataModule, variant: Variant, device: torch.device,
                  warmup: int, steps: int) -> float:
    """Seconds of ``steps`` optimizer steps after ``warmup`` steps of a plain loop over the module's own hooks,
    with the module's own optimizer (``configure_optimizers``: fused Adam on CUDA) and the same autocast as
    Lightning's ``bf16-mixed`` (around ``training_step`` only)."""
    data.setup("fit")
    stand_in = _TrainerStandIn()
    module.to(device).train()
    module.trainer = stand_in
    optimizer = module.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant.precision == "bf16-mixed"
                else contextlib.nullcontext())
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    start = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*barebones.*")
            for step in range(warmup + steps):
                batch = [t.to(device, non_blocking=True) for t in next(batches)]
                if step == warmup:
                    synchronize(device)
                    start = time.perf_counter()
                module.on_train_batch_start(batch, step)
                with autocast:
                    loss = module.training_step(batch, step)
                loss.backward()
                module.on_before_optimizer_step(optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stand_in.global_step += 1
                module.on_train_batch_end(loss, batch, step)
        synchronize(device)
        return time.perf_counter() - start
    finally:
        module.trainer = None


def dataloader_rates(data: RandomImageDataModule, batches: int, repeats: int) -> dict:
    """The datamodule's loader (batches gathered by index, :class:`calmwild.data.base.DeviceBatches`) against the
    per-item collation of a TensorDataset DataLoader (what it replaced) and one bare index_select per batch, on the
    CPU (no device copy): what serving a batch costs the training loop per step."""
    images, batch = data.served_images, data.batch_size
    batches = min(batches, len(images) // batch)
    loader = data.train_dataloader()
    collating = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=batch, shuffle=True,
                                            drop_last=True)

    def first(iterable):
        def call():
            for i, item in enumerate(iterable):
                if i + 1 == batches:
                    return item
        return call

    def by_index():
        order = torch.randperm(len(images))
        for i in range(batches):
            out = images.index_select(0, order[i * batch:(i + 1) * batch])
        return out

    cpu = torch.device("cpu")
    calls = {"loader": first(loader), "collating": first(collating), "index": by_index}
    times, _ = time_side_by_side(calls, cpu, repeats)
    work = batches * batch
    rates = {name: rate(times[name], work, "img_per_s") for name in calls}
    return {
        "calmwild_dataloader": rates["loader"],
        "per_item_collation": rates["collating"],
        "batched_index_select": rates["index"],
        "ratio_dataloader_to_index": ratio(rates["loader"]["img_per_s"], rates["index"]["img_per_s"]),
        "ratio_dataloader_to_collation": ratio(rates["loader"]["img_per_s"], rates["collating"]["img_per_s"]),
    }


def run(unet_config: dict, device: torch.device, batch_size: int, warmup: int, steps: int, repeats: int,
        variants: tuple[str, ...]) -> dict:
    """Lightning vs plain-loop throughput for every variant (alternating the two paths ``repeats`` times)."""
    image_shape = (unet_config["in_channels"], unet_config["img_resolution"], unet_config["img_resolution"])
    num_train = batch_size * (warmup + steps + 1)
    data = RandomImageDataModule(num_train, batch_size, image_shape, batch_size=batch_size,
                                 pin_memory=device.type == "cuda")
    data.setup("fit")
    out = {
        "sizes": {"batch_size": batch_size, "warmup_steps": warmup, "timed_steps": steps, "repeats": repeats,
                  "image_shape": list(image_shape), "train_images": num_train},
        "network": {"unet": unet_config, "parameters": count_parameters(UNet(**unet_config)),
                    "sigma_sampler": "LogNormal(-1.2, 1.2)", "ema": "EDM half-life with ramp-up, every step"},
        "variants": {},
    }
    images = steps * batch_size
    for name in variants:
        variant = VARIANTS[name]
        say(f"training {name}: Lightning fit vs plain loop, {repeats} x {warmup}+{steps} steps of {batch_size}")
        with tf32(variant.tf32) as settings:
            times = {"lightning": [], "plain": []}
            for _ in range(repeats):
                times["plain"].append(plain_seconds(build_module(unet_config, variant), data, variant, device,
                                                    warmup, steps))
                times["lightning"].append(lightning_seconds(build_module(unet_config, variant), data, variant,
                                                            device, warmup, steps))
        lightning, plain = rate(times["lightning"], images, "img_per_s"), rate(times["plain"], images, "img_per_s")
        kept = ratio(lightning["img_per_s"], plain["img_per_s"])
        out["variants"][name] = {
            "settings": {**asdict(variant), **settings},
            "calmwild_lightning_fit": lightning,
            "plain_pytorch_loop": plain,
            "ratio_lightning_to_plain": kept,
            "lightning_overhead_percent": None if kept is None else 100.0 * (1.0 / kept - 1.0),
            "ratio_lightning_to_plain_fastest": ratio(plain["seconds_min"], lightning["seconds_min"]),
        }
    say("training: dataloader collation vs batched indexing")
    out["dataloader"] = dataloader_rates(data, warmup + steps, repeats)
    return out
