"""Early detection of memorization during training (seed 004; :mod:`calmwild.memorization.early`): how early along
the EMA network's sampling trajectories the final sample's memorization can be predicted, at every evaluation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from calmwild.checks import check_open_unit
from calmwild.memorization.early import (
    RELIABLE_AUROC,
    SCORES,
    ScoredTrajectories,
    check_deterministic,
    detection_curves,
    plot_detection_curves,
    score_trajectories,
)
from calmwild.memorization.ratio import RATIO_THRESHOLD
from calmwild.settings import SamplingSettings
from callbacks.base import Context, Curve, Evaluation
from callbacks.samples import _RatioTestCallback


class EarlyDetection(_RatioTestCallback):
    """Runs ``num_samples`` EMA trajectories (image i from noise seed ``sampling.seed`` + i, the samples of
    TrajectoryMemorization with the same settings), labels each by the ratio test of its final sample and measures,
    step by step, the AUROC of each early score for that label (:func:`calmwild.memorization.early.detection_curves`).

    Logs ``early/num_memorized`` and, when both classes occur, per score ``early/<score>/max_auroc``,
    ``early/<score>/earliest_step`` and ``early/<score>/earliest_sigma`` (the first step whose AUROC reaches
    ``level``; absent when none does) and ``early/earliest_step`` (the earliest over the scores); the AUROC of each
    score against sigma is a curve (a sigma x step table and heatmap over training) and the step's PNG is the
    AUROC plot. The deterministic ODE only (``sampling.s_churn`` 0).

    Args:
        num_samples: trajectories per evaluation (split over DDP ranks; at least 2).
        threshold: ratio-test threshold in (0, 1) of the final label.
        level: the AUROC a score must reach.
        sampling: the sampler (steps, solver, seed, batch size).
        every_n_steps: evaluate every this many optimizer steps.
        at_train_end: evaluate again when training ends.
        name: output directory name under <run dir>/eval/ (default early_detection).
    """

    metric_prefixes = ("early/",)

    def __init__(self, num_samples: int = 256, threshold: float = RATIO_THRESHOLD, level: float = RELIABLE_AUROC,
                 sampling: SamplingSettings = SamplingSettings(), every_n_steps: int = 1000, at_train_end: bool = True,
                 name: str | None = None):
        super().__init__(num_samples, threshold, sampling, every_n_steps, at_train_end, name)
        check_deterministic(sampling)
        self.level = check_open_unit(level, "level")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "level": self.level}

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        start, stop = self.shard(ctx, self.num_samples)
        mine = score_trajectories(pl_module.ema_denoiser(self.sampling.precision), self.cached_train(trainer, ctx),
                                  pl_module.image_shape, range(start, stop), self.sampling, self.threshold,
                                  ctx.device)
        gather = self.gatherer(pl_module, ctx)
        scores = {name: gather(mine.scores[name].to(ctx.device), self.num_samples).cpu() for name in SCORES}
        memorized = gather(mine.memorized.to(ctx.device), self.num_samples).cpu()
        if ctx.rank != 0:
            return None
        scored = ScoredTrajectories(scores, memorized, torch.empty(0), mine.sigmas, torch.empty(0))
        report = detection_curves(scored, self.sampling.solver, self.level)
        metrics: dict[str, float] = {"early/num_memorized": float(report["num_memorized"])}
        curves: dict[str, Curve] = {}
        earliest = [entry["earliest"] for entry in report.get("scores", {}).values() if entry["earliest"]]
        for name, entry in report.get("scores", {}).items():
            metrics[f"early/{name}/max_auroc"] = max(entry["auroc"])
            if entry["earliest"]:
                metrics[f"early/{name}/earliest_step"] = float(entry["earliest"]["step"])
                metrics[f"early/{name}/earliest_sigma"] = entry["earliest"]["sigma"]
            curves[f"early/{name}/auroc"] = Curve(report["sigmas"], {"auroc": entry["auroc"], "low": entry["low"],
                                                                     "high": entry["high"]},
                                                  f"AUROC of {name} for memorization")
        if earliest:
            metrics["early/earliest_step"] = float(min(point["step"] for point in earliest))
        figure = plot_detection_curves(report, f"EMA trajectories at step {ctx.step}")
        return Evaluation(metrics, {"early_detection": report}, figure=figure, curves=curves or None)
