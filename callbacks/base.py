"""The scheduling, DDP and logging shell shared by every evaluation callback.

An :class:`EvaluationCallback` runs its :meth:`~EvaluationCallback.evaluate` every ``every_n_steps`` optimizer steps
(at ``on_train_batch_end``) and once more at the end of training, on the EMA weights, under ``torch.no_grad`` and
with the module's train/eval modes restored afterwards. Every rank runs ``evaluate`` (each on its shard, then
gathering); rank 0 writes and logs; all ranks then meet at ``trainer.strategy.barrier()``.

Hook order (lightning 2.6): callbacks' ``on_train_batch_end`` run before the module's, and DiffusionModule updates
its EMA in its own ``on_train_batch_end``. An evaluation at step N therefore sees the EMA after N - 1 updates --
exactly the EMA a ModelCheckpoint written at step N holds (checkpoint callbacks also run before the module hook).
The end-of-training evaluation runs after the last update.

Files (rank 0), under ``<trainer.default_root_dir>/eval/<name>/``: ``step_<global_step:07d>.json`` (settings,
results, metrics, seconds), ``step_<global_step:07d>.png`` (the evaluation's plot or image grid) and
``history.json`` (every evaluation's scalar metrics so far, kept in the callback state across resumes).

Logging (rank 0): ``logger.log_metrics(metrics, step=trainer.global_step)`` on every logger (step-level
``self.log`` can be dropped when the step does not line up with ``log_every_n_steps``); for a WandbLogger also a
``wandb.plot.line_series`` snapshot of each per-sigma curve and ``log_image`` for image grids; for a
TensorBoardLogger ``add_image``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from calmwild.checks import check_count
from calmwild.evaluation import Gather, shard_bounds
from calmwild.io import save_figure, save_png, write_json
from calmwild.settings import SamplingSettings
from callbacks.interrupt import interrupt_pending
from callbacks.sharding import DEVICE_CACHE, SHARED_SAMPLES, gather_rows

PHASE_BATCH_END = "train_batch_end"
PHASE_TRAIN_END = "train_end"


class Curve(NamedTuple):
    """A curve logged to W&B as a ``line_series`` snapshot: one x grid, named y series of the same length."""

    xs: list[float]
    ys: dict[str, list[float]]
    title: str
    xname: str = "sigma"


class Evaluation(NamedTuple):
    """What :meth:`EvaluationCallback.evaluate` returns on rank 0.

    metrics: scalars to log (may be empty); record: the JSON body; figure: a matplotlib Figure written as the step's
    PNG; image: a [3, H, W] grid in [0, 1] written as the step's PNG (if no figure) and logged as an image under
    ``image_key``; curves: W&B line-series snapshots keyed by logged name.
    """

    metrics: dict[str, float]
    record: dict[str, Any]
    figure: Figure | None = None
    image: torch.Tensor | None = None
    image_key: str | None = None
    curves: dict[str, Curve] | None = None


class Context(NamedTuple):
    """Where an evaluation runs: the step and hook, this rank, the world size and the module's device."""

    step: int
    phase: str
    rank: int
    world_size: int
    device: torch.device


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class EvaluationCallback(Callback):
    """Base class: schedules an evaluation of the EMA denoiser during training and writes / logs its results.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` is a positive multiple of this.
        at_train_end: evaluate once more when training ends, unless that step was just evaluated.
        name: directory name under ``<run dir>/eval/`` and part of the state key; default: the class name in
            snake case. Two evaluation callbacks of one trainer must have different names.
    """

    def __init__(self, every_n_steps: int = 1000, at_train_end: bool = True, name: str | None = None):
        super().__init__()
        self.every_n_steps = check_count(every_n_steps, "every_n_steps")
        if not isinstance(at_train_end, bool):
            raise TypeError(f"at_train_end must be a bool, got {at_train_end!r}")
        self.at_train_end = at_train_end
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
            raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
        self.name = name or _snake_case(type(self).__name__)
        self.last_step: int | None = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ to be provided by subclasses
    def settings(self) -> dict[str, Any]:
        """The settings that change this callback's numbers (in every JSON file and in the state key)."""
        return {}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        """Computes this rank's share, gathers, and returns the results on rank 0 (other ranks may return None).
        Runs on every rank under ``torch.no_grad`` with the module in eval mode."""
        raise NotImplementedError

    def check_world(self, world_size: int) -> None:
        """Refuses settings that cannot be split over ``world_size`` ranks (ValueError)."""

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, every_n_steps=self.every_n_steps, **self.settings())

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ schedule
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_images") or not hasattr(datamodule, "heldout_images"):
            raise ValueError(f"{type(self).__name__} needs a calmwild datamodule (train_images and heldout_images); "
                             f"got {type(datamodule).__name__}")
        names = [cb.name for cb in trainer.callbacks if isinstance(cb, EvaluationCallback)]
        if names.count(self.name) > 1:
            raise ValueError(f"two evaluation callbacks are named {self.name!r}; give each a distinct `name` "
                             "(it names the output directory)")
        self.check_world(trainer.world_size)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step <= 0 or step % self.every_n_steps != 0 or step == self.last_step:
            return
        self.run(trainer, pl_module, PHASE_BATCH_END)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if not self.at_train_end or trainer.sanity_checking or step <= 0 or step == self.last_step:
            return
        if interrupt_pending(trainer):  # stopped by a signal: the job may have seconds left, not minutes
            return
        self.run(trainer, pl_module, PHASE_TRAIN_END)

    # ------------------------------------------------------------------ one evaluation
    def run(self, trainer: Trainer, pl_module: LightningModule, phase: str) -> Evaluation | None:
        """One evaluation on every rank; rank 0 writes and logs; all ranks meet at a barrier afterwards."""
        ctx = Context(trainer.global_step, phase, trainer.global_rank, trainer.world_size, pl_module.device)
        modes = [(module, module.training) for module in pl_module.modules()]
        start = time.perf_counter()
        try:
            pl_module.eval()
            with torch.no_grad():
                result = self.evaluate(trainer, pl_module, ctx)
        finally:
            for module, training in modes:
                module.training = training
        seconds = time.perf_counter() - start
        self.last_step = ctx.step
        if trainer.is_global_zero and result is not None:
            self.history.append({"step": ctx.step, "phase": phase, "seconds": seconds, **result.metrics})
            self._write(trainer, ctx, result, seconds)
            self._log(trainer, ctx.step, result)
        metrics = trainer.strategy.broadcast(result.metrics if result is not None else {}, src=0)
        self._to_callback_metrics(pl_module, phase, metrics)
        trainer.strategy.barrier()
        return result

    @staticmethod
    def _to_callback_metrics(pl_module: LightningModule, phase: str, metrics: dict[str, float]) -> None:
        """The metrics, on every rank, through Lightning's own ``log`` (not sent to the loggers again): they land in
        ``trainer.callback_metrics`` at the step they were computed, where ``ModelCheckpoint(monitor=...)`` and
        ``EarlyStopping(monitor=...)`` read them (checkpoint callbacks run after the others in the same hook).
        Lightning refuses ``log`` at the end of training, where no callback would read it anyway."""
        if phase == PHASE_TRAIN_END:
            return
        for key, value in metrics.items():
            pl_module.log(key, float(value), logger=False, on_step=phase == PHASE_BATCH_END,
                          on_epoch=phase != PHASE_BATCH_END, sync_dist=False)

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def gatherer(pl_module: LightningModule, ctx: Context) -> Gather:
        """The gather of :mod:`calmwild.evaluation`: every rank's rows of a ``total``-row result, in rank order (see
        :func:`callbacks.sharding.gather_rows`)."""
        return lambda rows, total: gather_rows(pl_module, rows, total, ctx.world_size)

    @staticmethod
    def shard(ctx: Context, total: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, stop) of ``total`` items."""
        return shard_bounds(total, ctx.rank, ctx.world_size)

    @staticmethod
    def cached_train(trainer: Trainer, ctx: Context):
        """The training images on the evaluation device, copied there once per run (not at every evaluation)."""
        return DEVICE_CACHE.get(trainer, "train_images", ctx.device, lambda: trainer.datamodule.train_images)

    @staticmethod
    def shared_samples(trainer: Trainer, pl_module: LightningModule, ctx: Context, start: int, stop: int,
                       sampling: SamplingSettings):
        """Samples [start, stop) of the EMA network (sample i from seed + i), CPU float32; generated once per
        evaluation point and sampler settings and shared between callbacks
        (:data:`callbacks.sharding.SHARED_SAMPLES`)."""
        shape = (0, *pl_module.image_shape)
        if stop <= start:
            return torch.empty(shape)
        numbers = (sampling.seed, sampling.steps, sampling.solver, sampling.s_churn, sampling.precision)
        return SHARED_SAMPLES.get(
            trainer, (ctx.step, ctx.phase), numbers, start, stop,
            lambda: pl_module.sample(stop - start, **{**sampling.generate_kwargs(), "seed": sampling.seed + start},
                                     precision=sampling.precision).cpu(),
        )

    def output_dir(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / "eval" / self.name

    # ------------------------------------------------------------------ rank-0 output
    def _write(self, trainer: Trainer, ctx: Context, result: Evaluation, seconds: float) -> None:
        out = self.output_dir(trainer)
        stem = f"step_{ctx.step:07d}"
        record = {"callback": self.name, "step": ctx.step, "phase": ctx.phase, "world_size": ctx.world_size,
                  "seconds": seconds, "settings": self.settings(), **result.record, "metrics": result.metrics}
        if result.figure is not None:
            save_figure(result.figure, out / f"{stem}.png")
            record["plot"] = f"{stem}.png"
        elif result.image is not None:
            save_png(result.image, out / f"{stem}.png")
            record["image"] = f"{stem}.png"
        write_json(record, out / f"{stem}.json")
        write_json({"callback": self.name, "settings": self.settings(), "history": self.history},
                   out / "history.json")

    def _log(self, trainer: Trainer, step: int, result: Evaluation) -> None:
        for logger in trainer.loggers:
            if result.metrics:
                logger.log_metrics(result.metrics, step=step)
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, step, result)
            elif isinstance(logger, TensorBoardLogger) and result.image is not None:
                logger.experiment.add_image(result.image_key or self.name, result.image, step)

    @staticmethod
    def _log_wandb(logger: WandbLogger, step: int, result: Evaluation) -> None:
        import wandb

        for key, curve in (result.curves or {}).items():
            names = list(curve.ys)
            plot = wandb.plot.line_series(xs=curve.xs, ys=[curve.ys[n] for n in names], keys=names,
                                          title=f"{curve.title} (step {step})", xname=curve.xname)
            logger.log_metrics({key: plot}, step=step)
        if result.image is not None:
            logger.log_image(result.image_key or "image", images=[result.image], step=step,
                             caption=[f"step {step}"])
