"""Gathering evaluation work back from the DDP ranks, and what evaluations keep between calls: generated samples
shared between callbacks, tensors copied to the device once.

Work is split by item index into contiguous slices, one per rank (:func:`calmwild.evaluation.shard_bounds`), never
with a DistributedSampler, whose padding duplicates items and biases rates. Every rank then calls
:func:`gather_rows` the same number of times with tensors of the same trailing shape, so every rank reaches the
same collectives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch

from calmwild.evaluation import shard_bounds


def gather_rows(pl_module, rows: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """Concatenation (on CPU, in rank order) of every rank's ``rows`` [len(shard), ...], where rank r holds rows
    ``shard_bounds(total, r, world_size)``; the result has ``total`` rows.

    Shards are padded to the longest length ceil(total / world_size) before ``pl_module.all_gather`` (which needs
    equal shapes) and the padding is dropped by the known shard lengths. bool tensors travel as uint8.
    """
    rank_bounds = [shard_bounds(total, r, world_size) for r in range(world_size)]
    if world_size == 1:
        return rows.cpu()
    width = -(-total // world_size)
    send = rows.to(torch.uint8) if rows.dtype == torch.bool else rows
    padded = send.new_zeros((width, *send.shape[1:]), device=pl_module.device)
    padded[: send.shape[0]] = send
    gathered = pl_module.all_gather(padded).cpu()  # [world_size, width, ...]
    out = torch.cat([gathered[r, : stop - start] for r, (start, stop) in enumerate(rank_bounds)])
    return out.to(rows.dtype)


class SampleCache:
    """Generated samples shared by the callbacks that evaluate at the same point of the same training run.

    Entries are keyed by trainer (held weakly) and evaluation point (global step and hook: the EMA weights differ
    between a step's batch end and the end of training), then by the sampler settings that change samples. A request
    for samples [start, stop) is served from any cached slice covering it: sample i depends only on seed + i, so a
    smaller request reuses a larger one. Moving to a new point drops the previous point's samples.
    """

    def __init__(self) -> None:
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(
        self,
        trainer: object,
        point: Hashable,
        settings: Hashable,
        start: int,
        stop: int,
        make: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Samples [start, stop) for ``settings`` at ``point``: cached if some slice covers them, else ``make()``
        (which must return exactly stop - start samples) and cache the result."""
        entry = self._store.get(trainer)
        if entry is None or entry[0] != point:
            entry = (point, {})
            self._store[trainer] = entry
        slices = entry[1].setdefault(settings, [])
        for a, b, samples in slices:
            if a <= start and stop <= b:
                return samples[start - a : stop - a]
        samples = make()
        if samples.shape[0] != stop - start:
            raise ValueError(f"expected {stop - start} samples for [{start}, {stop}), got {samples.shape[0]}")
        slices.append((start, stop, samples))
        return samples

    def clear(self) -> None:
        self._store.clear()


SHARED_SAMPLES = SampleCache()


class DeviceCache:
    """Tensors an evaluation needs on its device (the training images), copied there once per trainer (held weakly)
    and device instead of at every evaluation: ``get(trainer, name, device, make)``."""

    def __init__(self) -> None:
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, trainer: object, name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        entry = self._store.setdefault(trainer, {})
        key = (name, str(device))
        if key not in entry:
            entry[key] = make().to(device)
        return entry[key]


DEVICE_CACHE = DeviceCache()
