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
results, metrics, seconds), ``step_<global_step:07d>.png`` (the evaluation's plot or image grid),
``<curve>_heatmap.png`` (each per-sigma curve over every evaluation so far, :func:`calmwild.plots.sigma_step_heatmap`;
redrawn at every evaluation under a WandbLogger, otherwise at the end of training) and ``history.json`` (every
evaluation's scalar metrics so far, kept in the callback state across resumes).

Logging (rank 0): ``logger.log_metrics(metrics, step=...)`` on every logger (step-level ``self.log`` can be dropped
when the step does not line up with ``log_every_n_steps``); the same metrics also reach ``trainer.callback_metrics``
through ``pl_module.log(logger=False)``, for ``ModelCheckpoint`` / ``EarlyStopping(monitor=...)``. A WandbLogger
also gets, per curve, a ``wandb.Table`` of (step, sigma, series, value) over every evaluation so far and its heatmap,
and every PNG of the step as an image (``log_image``); a TensorBoardLogger gets the image grids (``add_image``).
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
from tqdm.auto import tqdm

from calmwild.checks import check_count
from calmwild.evaluation import Gather, shard_bounds
from calmwild.io import save_figure, save_png, write_json
from calmwild.plots import sigma_step_heatmap
from calmwild.runs import evaluation_name
from calmwild.settings import SamplingSettings
from callbacks.interrupt import interrupt_pending
from callbacks.sharding import DEVICE_CACHE, SHARED_SAMPLES, gather_rows

PHASE_FIT_START = "fit_start"
PHASE_BATCH_END = "train_batch_end"
PHASE_TRAIN_END = "train_end"
PHASE_VALIDATE = "validate"
PHASE_TEST = "test"
EVALUATED_STAGES = ("fit", PHASE_VALIDATE, PHASE_TEST)


def _brief(metrics: dict[str, float]) -> str:
    """The headline metrics of an evaluation for the console (not the per-sigma series)."""
    shown = [f"{key} {value:.4g}" for key, value in metrics.items() if "/sigma_" not in key][:4]
    return f": {', '.join(shown)}" if shown else ""


class Curve(NamedTuple):
    """A curve of one evaluation: one x grid (sigma), named y series of the same length, and whether its PNG shows
    the values on a log axis. Across evaluations the curves become a sigma x step table and heatmap."""

    xs: list[float]
    ys: dict[str, list[float]]
    title: str
    xname: str = "sigma"
    log_values: bool = False


class Evaluation(NamedTuple):
    """What :meth:`EvaluationCallback.evaluate` returns on rank 0.

    metrics: scalars to log (may be empty); record: the JSON body; figure: a matplotlib Figure written as the step's
    PNG; image: a [3, H, W] grid in [0, 1] written as the step's PNG (if no figure) and logged as an image under
    ``image_key``; curves: per-sigma curves keyed by logged name (accumulated into sigma x step tables).
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


def evaluated_step(trainer: Trainer, pl_module: LightningModule) -> int:
    """The training step of the weights being evaluated: the trainer's step during a fit, the checkpoint's step in
    ``validate`` / ``test`` (which load the weights themselves: :meth:`DiffusionModule.load_network_weights`)."""
    if trainer.state.fn == "fit":
        return trainer.global_step
    return int(getattr(pl_module, "evaluated_step", trainer.global_step))


class EvaluationCallback(Callback):
    """Base class: schedules an evaluation of the EMA denoiser during training and writes / logs its results.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` is a positive multiple of this.
        at_train_end: evaluate once more when training ends, unless that step was just evaluated.
        name: directory name under ``<run dir>/eval/`` and part of the state key; default: the class name in
            snake case. Two evaluation callbacks of one trainer must have different names.
    """

    metric_prefixes: tuple[str, ...] = ()  # the prefixes of the metric keys this callback logs (``traj_mem/``)

    def __init__(self, every_n_steps: int = 1000, at_train_end: bool = True, name: str | None = None):
        super().__init__()
        self.every_n_steps = check_count(every_n_steps, "every_n_steps")
        if not isinstance(at_train_end, bool):
            raise TypeError(f"at_train_end must be a bool, got {at_train_end!r}")
        self.at_train_end = at_train_end
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
            raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
        self.name = name or evaluation_name(type(self).__name__)
        self.last_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.curve_rows: dict[str, list[list]] = {}  # curve key -> rows [step, sigma, series, value], all evaluations
        self._curves: dict[str, Curve] | None = None  # the curves of the latest evaluation (titles, axes of heatmaps)

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
        return {"last_step": self.last_step, "history": list(self.history),
                "curve_rows": {key: list(rows) for key, rows in self.curve_rows.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")
        self.history = list(state_dict.get("history", []))
        self.curve_rows = {key: list(rows) for key, rows in state_dict.get("curve_rows", {}).items()}

    # ------------------------------------------------------------------ schedule
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in EVALUATED_STAGES:
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
        if stage == "fit":
            self._check_monitors(trainer)

    def _check_monitors(self, trainer: Trainer) -> None:
        """A ModelCheckpoint that monitors one of this callback's metrics must look at it on the steps it is computed:
        its ``every_n_train_steps`` a multiple of ``every_n_steps`` (otherwise it would pair a checkpoint with the
        value of an earlier step, or wait for a validation loop that never comes)."""
        for checkpoint in self._monitoring_me(trainer.checkpoint_callbacks):
            every = getattr(checkpoint, "_every_n_train_steps", 0)
            if not every or every % self.every_n_steps != 0:
                raise ValueError(
                    f"ModelCheckpoint(monitor={checkpoint.monitor!r}) checks every_n_train_steps={every or None}, but "
                    f"{type(self).__name__} computes {checkpoint.monitor} every {self.every_n_steps} steps: set the "
                    f"checkpoint's every_n_train_steps to {self.every_n_steps} (or a multiple of it)")

    def _monitoring_me(self, callbacks: list) -> list:
        """The callbacks (checkpoint, early stopping) whose ``monitor`` is one of this callback's metrics."""
        return [callback for callback in callbacks
                if getattr(callback, "monitor", None) and callback.monitor.startswith(self.metric_prefixes)]

    def due(self, trainer: Trainer, phase: str) -> bool:
        """Whether this callback evaluates at the current point of ``trainer`` in hook ``phase``: at a batch end every
        ``every_n_steps`` steps, at the end of training if ``at_train_end`` (never twice for one step, never while
        sanity checking or after a stop signal), and once in each ``validate`` / ``test`` loop."""
        if phase in (PHASE_VALIDATE, PHASE_TEST):
            return True
        step = trainer.global_step
        if trainer.sanity_checking or step <= 0 or step == self.last_step:
            return False
        if phase == PHASE_BATCH_END:
            return step % self.every_n_steps == 0
        return phase == PHASE_TRAIN_END and self.at_train_end and not interrupt_pending(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.due(trainer, PHASE_BATCH_END):
            self.run(trainer, pl_module, PHASE_BATCH_END)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_step <= 0 or interrupt_pending(trainer):
            return  # nothing trained, or a signal: seconds left, not minutes
        if self.due(trainer, PHASE_TRAIN_END):
            self.run(trainer, pl_module, PHASE_TRAIN_END)
        elif trainer.is_global_zero and not self._heatmaps_current(trainer):
            self._draw_heatmaps(trainer)  # no evaluation now: draw the heatmaps the earlier ones deferred

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``calmwild validate``: one evaluation of the checkpoint (a fit's own validation loop, if one is configured,
        does not trigger it: evaluations during training follow ``every_n_steps``)."""
        if trainer.state.fn == PHASE_VALIDATE and not trainer.sanity_checking:
            self.run(trainer, pl_module, PHASE_VALIDATE)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``calmwild test``: one evaluation of the checkpoint (FID scores against the held-out set:
        :meth:`callbacks.samples.FID.reference_name`)."""
        self.run(trainer, pl_module, PHASE_TEST)

    # ------------------------------------------------------------------ one evaluation
    def run(self, trainer: Trainer, pl_module: LightningModule, phase: str) -> Evaluation | None:
        """One evaluation on every rank; rank 0 writes and logs; all ranks meet at a barrier afterwards."""
        ctx = Context(evaluated_step(trainer, pl_module), phase, trainer.global_rank, trainer.world_size,
                      pl_module.device)
        modes = [(module, module.training) for module in pl_module.modules()]
        if trainer.is_global_zero:
            tqdm.write(f"calmwild: step {ctx.step}, {self.name} ...")
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
            tqdm.write(f"calmwild: step {ctx.step}, {self.name} done in {seconds:.1f} s{_brief(result.metrics)}")
            self.history.append({"step": ctx.step, "phase": phase, "seconds": seconds, **result.metrics})
            for key, curve in (result.curves or {}).items():
                self.curve_rows.setdefault(key, []).extend(
                    [ctx.step, x, series, y] for series, ys in curve.ys.items() for x, y in zip(curve.xs, ys))
            files = self._write(trainer, ctx, result, seconds)
            self._log(trainer, ctx.step, result, files)
        metrics = trainer.strategy.broadcast(result.metrics if result is not None else {}, src=0)
        self._to_callback_metrics(pl_module, phase, metrics)
        if phase == PHASE_BATCH_END:
            self._check_early_stopping(trainer)
        trainer.strategy.barrier()
        return result

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """An ``EarlyStopping`` that monitors one of this callback's metrics is checked at the steps the metric is
        computed, and only then (:meth:`_check_early_stopping`): Lightning's own checks would run after validation
        loops (a calmwild fit runs none by default) or at every epoch end, where the same value, computed every
        ``every_n_steps``, would be counted again and again against the patience."""
        for callback in self._monitoring_me(trainer.early_stopping_callbacks):
            callback._check_on_train_epoch_end = False

    def _check_early_stopping(self, trainer: Trainer) -> None:
        """Runs the check of each EarlyStopping on this callback's metrics (every rank: the decision is reduced)."""
        for callback in self._monitoring_me(trainer.early_stopping_callbacks):
            callback._run_early_stopping_check(trainer)

    @staticmethod
    def _to_callback_metrics(pl_module: LightningModule, phase: str, metrics: dict[str, float]) -> None:
        """The metrics, on every rank, through Lightning's own ``log`` (not sent to the loggers again): they land in
        ``trainer.callback_metrics`` at the step they were computed, where ``ModelCheckpoint(monitor=...)`` and
        ``EarlyStopping(monitor=...)`` read them (checkpoint callbacks run after the others in the same hook).
        Lightning refuses ``log`` when a fit starts and ends, where no callback would read it anyway. In ``validate``
        and ``test`` they are the epoch's results Lightning prints and returns."""
        if phase in (PHASE_FIT_START, PHASE_TRAIN_END):
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
    def cached_heldout(trainer: Trainer, ctx: Context):
        """The held-out images on the evaluation device, copied there once per run."""
        return DEVICE_CACHE.get(trainer, "heldout_images", ctx.device, lambda: trainer.datamodule.heldout_images)

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
        label = f"calmwild: step {ctx.step}, sampling for the evaluations" if trainer.is_global_zero else False
        return SHARED_SAMPLES.get(
            trainer, (ctx.step, ctx.phase), numbers, start, stop,
            lambda: pl_module.sample(stop - start, **{**sampling.generate_kwargs(), "seed": sampling.seed + start},
                                     precision=sampling.precision, progress=label).cpu(),
        )

    def output_dir(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir) / "eval" / self.name

    # ------------------------------------------------------------------ rank-0 output
    def _write(self, trainer: Trainer, ctx: Context, result: Evaluation, seconds: float) -> dict[str, Path]:
        """The step's JSON and PNG, the history, and one sigma x step heatmap per curve; returns the images written
        (logged key -> path)."""
        out = self.output_dir(trainer)
        stem = f"step_{ctx.step:07d}"
        record = {"callback": self.name, "step": ctx.step, "phase": ctx.phase, "world_size": ctx.world_size,
                  "seconds": seconds, "settings": self.settings(), **result.record, "metrics": result.metrics}
        files: dict[str, Path] = {}
        if result.figure is not None:
            files[f"{self.name}/plot"] = save_figure(result.figure, out / f"{stem}.png")
            record["plot"] = f"{stem}.png"
        elif result.image is not None:
            save_png(result.image, out / f"{stem}.png")
            record["image"] = f"{stem}.png"
        self._curves = result.curves or self._curves
        # a heatmap takes seconds to draw on a CPU: at every evaluation only when W&B shows it, else at the end
        if ctx.phase != PHASE_BATCH_END or self._heatmaps_current(trainer):
            files.update(self._draw_heatmaps(trainer))
        write_json(record, out / f"{stem}.json")
        write_json({"callback": self.name, "settings": self.settings(), "history": self.history},
                   out / "history.json")
        return files

    @staticmethod
    def _heatmaps_current(trainer: Trainer) -> bool:
        """Whether the heatmaps are redrawn at every evaluation (under a WandbLogger, which shows them)."""
        return any(isinstance(logger, WandbLogger) for logger in trainer.loggers)

    def _draw_heatmaps(self, trainer: Trainer) -> dict[str, Path]:
        """One sigma x step heatmap per curve over every evaluation so far (logged key -> file)."""
        out, files = self.output_dir(trainer), {}
        for key, curve in (self._curves or {}).items():
            figure = sigma_step_heatmap(self.curve_rows[key], curve.title, curve.xname, curve.log_values)
            files[f"{key}_heatmap"] = save_figure(figure, out / f"{key.replace('/', '_')}_heatmap.png")
        return files

    def _log(self, trainer: Trainer, step: int, result: Evaluation, files: dict[str, Path]) -> None:
        for logger in trainer.loggers:
            if result.metrics:
                logger.log_metrics(result.metrics, step=step)
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, step, result, files)
            elif isinstance(logger, TensorBoardLogger) and result.image is not None:
                logger.experiment.add_image(result.image_key or self.name, result.image, step)

    def _log_wandb(self, logger: WandbLogger, step: int, result: Evaluation, files: dict[str, Path]) -> None:
        """Per curve, a ``wandb.Table`` of every evaluation so far (step, sigma, series, value: a line per step in a
        custom chart) and its sigma x step heatmap; the step's figure and image grid as images at their step."""
        import wandb

        for key, curve in (result.curves or {}).items():
            table = wandb.Table(columns=["step", curve.xname, "series", "value"], data=self.curve_rows[key])
            logger.log_metrics({f"{key}_table": table}, step=step)
        for key, path in files.items():
            logger.log_image(key, images=[str(path)], step=step, caption=[f"step {step}"])
        if result.image is not None:
            logger.log_image(result.image_key or "image", images=[result.image], step=step,
                             caption=[f"step {step}"])
