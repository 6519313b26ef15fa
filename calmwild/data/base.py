"""The shared machinery of every calmwild datamodule: images held in memory, validated once, served in seeded order.

A subclass implements only :meth:`InMemoryImageDataModule.load` (and :meth:`~InMemoryImageDataModule.origin`);
checks, the dataloader, the description and the checkpoint fingerprint live here once.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from calmwild.checks import check_count
from calmwild.data.convert import content_hash

LoadedImages = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class EpochSeededSampler(DistributedSampler):
    """One random permutation per epoch, drawn from (seed, epoch) only; each DDP rank serves its slice of every
    global batch; an interrupted epoch can resume at any batch.

    With B = ``batch_size`` (per rank), W = ``num_replicas`` and G = B * W, the permutation p of epoch e is split into
    floor(N / G) global batches; rank r serves p[k G + r B : k G + (r + 1) B] as its batch k. One process with batch
    G therefore trains on exactly the images that W processes with batch B train on together, step by step. A
    trailing part of p shorter than G is dropped (EDM's loss expects fixed batches). With the defaults (B = 1,
    W = 1) the sampler yields the whole permutation.

    The order does not depend on any RNG state: a resumed run reproduces epoch e from (seed, e). Lightning calls
    :meth:`set_epoch` before every training epoch. :meth:`resume_at` makes the next pass over epoch e start at batch
    k, so a run resumed from a mid-epoch checkpoint serves the batches the uninterrupted run would have served
    (see :class:`ResumableDataLoader`, which records the position in checkpoints).

    Why a ``DistributedSampler`` subclass: Lightning leaves a ``DistributedSampler`` in place under DDP, while it
    would replace any other sampler by its own (interleaved, seeded with the global seed), which breaks both the
    equality with a single process and mid-epoch resume. It never calls into ``torch.distributed``: the rank and
    the number of ranks are given.

    Args:
        data_source: the served dataset (only its length is used).
        seed: seed of the permutations.
        batch_size: per-rank batch size B.
        num_replicas: number of DDP ranks W.
        rank: this process's rank r in [0, W).
    """

    def __init__(self, data_source: TensorDataset, seed: int = 0, batch_size: int = 1, num_replicas: int = 1,
                 rank: int = 0):
        check_count(batch_size, "batch_size")
        check_count(num_replicas, "num_replicas")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.data_source = data_source
        self.batch_size = batch_size
        self.steps_per_epoch = len(data_source) // (batch_size * num_replicas)
        self._resume: tuple[int, int] | None = None  # (epoch, first batch) of the next pass

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batch: int) -> None:
        """The next pass over ``epoch`` starts at its batch ``batch`` (passes over other epochs start at 0)."""
        if not 0 <= batch <= self.steps_per_epoch:
            raise ValueError(f"cannot resume at batch {batch} of an epoch of {self.steps_per_epoch} batches")
        self._resume = (int(epoch), int(batch))

    def first_batch(self) -> int:
        """The batch the next pass over the current epoch starts at (0 unless :meth:`resume_at` said otherwise)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def permutation(self) -> list[int]:
        """The permutation of the current epoch (all ranks draw the same one)."""
        # numpy's SeedSequence hashes the pair (seed, epoch) into the full PCG64 state; torch's CPU generator would keep
        # only 32 bits of a combined integer seed, so different (seed, epoch) pairs could share a permutation.
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data_source)).tolist()

    def __iter__(self):
        start = self.first_batch()
        self._resume = None
        order = self.permutation()
        size, global_size = self.batch_size, self.batch_size * self.num_replicas
        for k in range(start, self.steps_per_epoch):
            offset = k * global_size + self.rank * size
            yield from order[offset : offset + size]

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size


class _EpochPosition:
    """The position in the epoch that a training loader records in checkpoints (its ``epoch_sampler`` is an
    :class:`EpochSeededSampler`).

    Lightning stores ``state_dict()`` of a training dataloader that has ``state_dict`` / ``load_state_dict`` in the
    checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back on resume before the first batch;
    without it Lightning restarts an interrupted epoch from its first batch while counting the batches already done
    (a different data order than the uninterrupted run). The position is counted in batches handed to the training
    loop, not in indices drawn from the sampler, so prefetching does not shift it."""

    epoch_sampler: EpochSeededSampler

    def state_dict(self) -> dict[str, int]:
        epoch, served = getattr(self, "_position", (self.epoch_sampler.epoch, 0))
        return {"epoch": epoch, "batches_served": served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = int(state["epoch"]), int(state["batches_served"])
        sampler = self.epoch_sampler
        if served >= sampler.steps_per_epoch:  # saved after the epoch's last batch: the next epoch starts afresh
            epoch, served = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.resume_at(epoch, served)
        self._position = (epoch, served)


class ResumableDataLoader(_EpochPosition, DataLoader):
    """A DataLoader over an :class:`EpochSeededSampler` whose position in the epoch is saved in checkpoints
    (:class:`_EpochPosition`). Iteration is lazy: the sampler starts when the first batch is requested, after
    Lightning's ``set_epoch``."""

    @property
    def epoch_sampler(self) -> EpochSeededSampler:
        return self.batch_sampler.sampler

    def __iter__(self):
        sampler = self.epoch_sampler
        served = sampler.first_batch()
        self._position = (sampler.epoch, served)
        for batch in super().__iter__():
            served += 1
            self._position = (sampler.epoch, served)
            yield batch


class DeviceBatches(_EpochPosition):
    """The training batches of an in-memory set, gathered by index where training runs: batch k is one
    ``index_select`` of the served images (and labels), already on the device, with the indices of the
    :class:`EpochSeededSampler`'s k-th slice -- no per-image collation and no host-to-device copy per step. The
    (seed, epoch) order, the DDP slicing and the mid-epoch resume are those of :class:`ResumableDataLoader` (the same
    ``state_dict``, :class:`_EpochPosition`); Lightning calls ``set_epoch`` on :attr:`sampler`.
    """

    def __init__(self, tensors: list[torch.Tensor], sampler: EpochSeededSampler, device: torch.device):
        self.sampler = sampler
        self.device = device
        self._tensors = [t.to(device) for t in tensors]
        self._position = (sampler.epoch, 0)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self):
        sampler, size = self.sampler, self.sampler.batch_size
        served = sampler.first_batch()
        self._position = (sampler.epoch, served)
        order = torch.as_tensor(list(sampler), dtype=torch.long, device=self.device)  # this rank, from batch `served`
        for start in range(0, order.numel(), size):
            index = order[start : start + size]
            batch = [t.index_select(0, index) for t in self._tensors]
            served += 1
            self._position = (sampler.epoch, served)
            yield batch

    @property
    def epoch_sampler(self) -> EpochSeededSampler:
        return self.sampler


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class InMemoryImageDataModule(LightningDataModule, ABC):
    """A datamodule whose images live in memory as tensors (memorization studies use 1k-50k small images).

    After :meth:`setup`:

    - ``train_images`` / ``heldout_images``: float32 CPU [N, C, H, W] in [-1, 1]; memorization is measured against
      ``train_images``, FID and generalisation against ``heldout_images``;
    - ``train_labels``: long [N] aligned with ``train_images`` for class-conditional training, else None;
    - ``served_images`` / ``served_labels``: what the training dataloader serves (the training set itself, except
      for wrappers such as :class:`~calmwild.data.dummy.DummyClassDataModule`);
    - ``image_shape`` (C, H, W), ``num_classes`` (0 when unconditional), ``sample_class`` (None unless the data
      prescribes the class to sample) and :meth:`describe`.

    The training dataloader yields ``[images]`` or ``[images, labels]`` batches of exactly ``batch_size`` (drop_last,
    as EDM's loss expects a fixed batch) in an order fixed by ``seed`` and the epoch (:class:`EpochSeededSampler`).

    Args:
        batch_size: images per training batch (per device); must not exceed the number of served training images.
        num_workers: dataloader worker processes; 0 (default) keeps the set on the training device and gathers
            each batch there by index (:class:`DeviceBatches`), which is fastest for in-memory tensors; > 0 collates
            on the host in workers kept alive between epochs.
        seed: seed of the per-epoch shuffling order.
        pin_memory: pin batches in page-locked memory for faster host-to-GPU copies.
    """

    def __init__(self, batch_size: int = 512, num_workers: int = 0, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        check_count(batch_size, "batch_size")
        check_count(num_workers, "num_workers", 0)
        check_count(seed, "seed", 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = bool(pin_memory)
        self.num_classes = 0
        self.sample_class: int | None = None
        self._train: torch.Tensor | None = None
        self._heldout: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._hashes: dict[str, str] = {}
        # hparams = constructor arguments of the concrete class (saved in checkpoints, reported by describe());
        # a wrapped datamodule ("base") is described by its own describe(), never pickled into hparams.
        # logger=False: Lightning would merge them with the module's hparams for the loggers and stop the run when a
        # key of both differs (``seed`` here and in DiffusionModule); the CLI's config.yaml records them instead.
        self.save_hyperparameters(ignore=["base"], logger=False)

    # ----- to implement -------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> LoadedImages:
        """Returns (train_images, heldout_images, train_labels or None), images float32 [N, C, H, W] in [-1, 1]."""

    @abstractmethod
    def origin(self) -> str:
        """Where the images come from (a path or a package function), for :meth:`describe`."""

    # ----- lifecycle ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Loads and validates the images once (later calls, e.g. for another stage, reuse them)."""
        if self._train is not None:
            return
        train, heldout, labels = self.load()
        train = _checked_images(train, "training", self.origin())
        heldout = _checked_images(heldout, "held-out", self.origin())
        if train.shape[1:] != heldout.shape[1:]:
            raise ValueError(
                f"training images {tuple(train.shape[1:])} and held-out images {tuple(heldout.shape[1:])} "
                "differ in shape"
            )
        if labels is not None:
            labels = _checked_labels(labels, len(train))
        self._train, self._heldout, self._labels = train, heldout, labels

    def _require_setup(self) -> None:
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before using its images")

    # ----- data ---------------------------------------------------------------------------------------------------
    @property
    def train_images(self) -> torch.Tensor:
        self._require_setup()
        return self._train

    @property
    def heldout_images(self) -> torch.Tensor:
        self._require_setup()
        return self._heldout

    @property
    def train_labels(self) -> torch.Tensor | None:
        self._require_setup()
        return self._labels

    @property
    def served_images(self) -> torch.Tensor:
        return self.train_images

    @property
    def served_labels(self) -> torch.Tensor | None:
        return self.train_labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def train_dataloader(self) -> DeviceBatches | DataLoader:
        """Batches of exactly ``batch_size`` served images (and labels) per rank, shuffled per epoch
        (:class:`EpochSeededSampler`: under DDP each rank serves its slice of a global batch of
        ``batch_size * world_size``), resumable mid-epoch. The last partial global batch is dropped, so
        ``batch_size * world_size`` may not exceed the number of served images (ValueError naming the numbers).
        Without workers the set lives on the training device and each batch is gathered there
        (:class:`DeviceBatches`); with ``num_workers`` > 0 a :class:`ResumableDataLoader` collates on the host."""
        served = len(self.served_images)
        world, rank = self._distribution()
        if self.batch_size * world > served:
            ranks = f" x {world} ranks = {self.batch_size * world}" if world > 1 else ""
            raise ValueError(
                f"batch_size={self.batch_size}{ranks} exceeds the {served} training images served; with drop_last "
                "there would be no batch at all: lower batch_size or use more training images"
            )
        tensors = [self.served_images] if self.served_labels is None else [self.served_images, self.served_labels]
        dataset = TensorDataset(*tensors)
        sampler = EpochSeededSampler(dataset, seed=self.seed, batch_size=self.batch_size, num_replicas=world, rank=rank)
        if self.num_workers == 0:
            trainer = getattr(self, "trainer", None)
            return DeviceBatches(tensors, sampler, trainer.strategy.root_device if trainer is not None else
                                 torch.device("cpu"))
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out images in order, in batches of ``batch_size`` (``calmwild validate``: the module's held-out
        loss; fits run no validation loop unless ``trainer.limit_val_batches`` is set)."""
        return DataLoader(TensorDataset(self.heldout_images), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def test_dataloader(self) -> DataLoader:
        """The held-out images in order (``calmwild test``), as :meth:`val_dataloader`."""
        return self.val_dataloader()

    def _distribution(self) -> tuple[int, int]:
        """(number of ranks, this rank) of the attached trainer; (1, 0) for a datamodule used on its own."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    # ----- provenance ---------------------------------------------------------------------------------------------
    def configuration(self) -> dict:
        """The class name and constructor settings (JSON-able; available before :meth:`setup`)."""
        return {"name": type(self).__name__,
                "settings": _jsonable({k: v for k, v in self.hparams.items() if not k.startswith("_")})}

    def describe(self) -> dict:
        """JSON-able record of the data: class, source, constructor settings, sizes, shapes and content hashes
        (:func:`~calmwild.data.convert.content_hash` of the uint8-quantised images)."""
        self._require_setup()
        return {
            **self.configuration(),
            "source": self.origin(),
            "image_shape": list(self.image_shape),
            "train_size": len(self.train_images),
            "heldout_size": len(self.heldout_images),
            "served_size": len(self.served_images),
            "num_classes": self.num_classes,
            "sample_class": self.sample_class,
            "train_hash": self.cached_hash("train", self.train_images),
            "heldout_hash": self.cached_hash("heldout", self.heldout_images),
        }

    def cached_hash(self, key: str, images: torch.Tensor) -> str:
        """:func:`~calmwild.data.convert.content_hash` of a set that is fixed after setup, computed once (checkpoints
        call :meth:`describe` at every save)."""
        if key not in self._hashes:
            self._hashes[key] = content_hash(images)
        return self._hashes[key]

    def state_dict(self) -> dict[str, Any]:
        """Stored in checkpoints: the description, so a checkpoint records exactly which images it was trained on."""
        return {"describe": self.describe()} if self._train is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, warns when the training set differs from the one the checkpoint was trained on."""
        saved = state_dict.get("describe", {}).get("train_hash")
        if saved is None or self._train is None:
            return
        current = self.cached_hash("train", self.train_images)
        if saved != current:
            warnings.warn(
                f"{type(self).__name__}: the checkpoint was trained on a training set with hash {saved}, the data "
                f"now loaded hashes to {current}: memorization results will refer to "
                "the new set",
                stacklevel=2,
            )


def _checked_images(images: torch.Tensor, what: str, source: str) -> torch.Tensor:
    """The images as float32 CPU [N, C, H, W] in [-1, 1]; errors name the set, the first offending image and the
    source (:meth:`InMemoryImageDataModule.origin`)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = f"a tensor of dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"{what} images from {source} must be a float tensor [N, C, H, W], got {got}")
    if images.ndim != 4:
        raise ValueError(f"{what} images from {source} must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"the {what} set is empty (source: {source}): at least one image is needed")
    finite = torch.isfinite(images)
    if not finite.all():
        first = int((~finite).flatten(1).any(1).nonzero()[0])
        raise ValueError(
            f"{int((~finite).sum())} NaN/inf pixel values in the {what} images (first in image {first}) from {source}"
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
        raise ValueError(f"{what} images from {source} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return images.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _checked_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"train_labels must be an integer tensor [N], got {labels!r:.80}")
    if labels.shape != (count,):
        raise ValueError(f"train_labels must have shape [{count}] (one per training image), got {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"train_labels must be non-negative class indices, got minimum {int(labels.min())}")
    return labels.to(device="cpu", dtype=torch.long).contiguous()
