"""The danger zone of the training set, computed from the data before training starts (paper Section 4), so that a
fit's per-sigma memorization can be read against it as it forms."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

from calmwild.compare import ZONE_KEYS
from calmwild.geometry.report import analyze_geometry, plot_geometry
from calmwild.settings import GeometrySettings
from callbacks.base import PHASE_FIT_START, Context, Evaluation, EvaluationCallback


class DangerZone(EvaluationCallback):
    """Once, when a fit starts (not again when it resumes), and in ``calmwild validate`` / ``test``: the posterior
    weight and shell-coverage curves of the training set and its danger zone (:func:`calmwild.geometry.report.
    analyze_geometry`, the numbers ``calmwild analyze`` gives). Logs ``zone/sigma_low`` and ``zone/sigma_high`` at
    step 0 (absent when the zone is empty), writes the report as ``eval/danger_zone/step_0000000.json`` and the
    paper's Figure 3 as its PNG; the fit's closing summary says where per-sigma memorization peaks against it.

    Args:
        geometry: Monte Carlo sizes and levels (:class:`calmwild.settings.GeometrySettings`).
        name: output directory name under <run dir>/eval/ (default danger_zone).
    """

    metric_prefixes = ("zone/",)

    def __init__(self, geometry: GeometrySettings = GeometrySettings(), name: str | None = None):
        super().__init__(every_n_steps=1, at_train_end=False, name=name)
        if not isinstance(geometry, GeometrySettings):
            raise TypeError(f"geometry must be GeometrySettings, got {type(geometry).__name__}")
        self.geometry = geometry

    def settings(self) -> dict[str, Any]:
        return {"geometry": self.geometry.to_dict()}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last_step is None:  # a resumed fit restored last_step: the zone is already written
            self.run(trainer, pl_module, PHASE_FIT_START)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        """The zone depends on the data only: nothing to do during training."""

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, ctx: Context) -> Evaluation | None:
        if ctx.rank != 0:
            return None
        datamodule = trainer.datamodule
        report = analyze_geometry(datamodule.train_images, datamodule.heldout_images, self.geometry,
                                  device=ctx.device, progress=False)
        zone = report["danger_zone"]["sigma"]
        metrics = {} if zone is None else dict(zip(ZONE_KEYS, zone))
        return Evaluation(metrics, {"geometry": report}, figure=plot_geometry(report))
