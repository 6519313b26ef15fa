"""The saved W&B workspace of a calmwild config: the panels a researcher opens first, built from the callbacks the
config runs (through ``wandb-workspaces``; ``calmwild wandb-workspace`` saves it when online).

Sections, each only when its callback is configured:

- memorization against iterations: ``traj_mem/rate`` (trajectory memorization, paper Section 3) and
  ``mem/peak_rate`` against ``trainer/global_step``;
- per-sigma memorization (paper Fig. 2): the sigma x step heatmap and the step's log-x plot as images, and every
  ``mem/sigma_*`` scalar against iterations;
- per-sigma MSE (train, held-out and their gap, eq. 5): heatmap, plot, and the ``mse/gap/*`` scalars (log y);
- sample quality: FID and KID with their sample counts;
- samples: the nearest-neighbour grid and the ratio histogram.

Runs are grouped by their experiment family (the ``group`` calmwild sets: dataset and N) so the seeds and samplers
of one family sit together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from calmwild.runs import evaluation_name

STEP = "trainer/global_step"


def read_fit_config(path: str | Path) -> dict:
    """A fit config as one dict, with the parts it names by file (``trainer: celeba/trainer.yaml``, relative to the
    config's folder, as LightningCLI resolves them) read in place."""
    path = Path(path)

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (path.parent / value).is_file():
            return resolve(yaml.safe_load((path.parent / value).read_text()))
        return value

    return resolve(yaml.safe_load(path.read_text()) or {})


def _callback_names(config: dict) -> dict[str, str]:
    """Callback class name -> its output name (``init_args.name`` or the default), for calmwild's callbacks."""
    names = {}
    for callback in ((config.get("trainer") or {}).get("callbacks") or []):
        if not isinstance(callback, dict) or not str(callback.get("class_path", "")).startswith("callbacks."):
            continue
        class_name = callback["class_path"].rsplit(".", 1)[-1]
        names[class_name] = (callback.get("init_args") or {}).get("name") or evaluation_name(class_name)
    return names


def workspace_panels(config: dict) -> list[tuple[str, list[dict[str, Any]]]]:
    """The sections of the workspace as plain data: (section name, [panel spec]) where a panel spec is
    ``{"kind": "line", "title", "y" | "metric_regex", "log_y"}`` or ``{"kind": "media", "title", "media_keys"}``."""
    names = _callback_names(config)
    sections = []
    memorization = []
    if "TrajectoryMemorization" in names:
        memorization.append({"kind": "line", "title": "trajectory memorization rate", "y": ["traj_mem/rate"]})
    if "PerSigmaMemorization" in names:
        memorization.append({"kind": "line", "title": "peak per-sigma memorization", "y": ["mem/peak_rate"]})
    if memorization:
        sections.append(("memorization against iterations", memorization))
    if "PerSigmaMemorization" in names:
        sections.append(("per-sigma memorization", [
            {"kind": "media", "title": "memorization: sigma x step", "media_keys": ["mem/curve_heatmap"]},
            {"kind": "media", "title": "memorization against sigma",
             "media_keys": [f"{names['PerSigmaMemorization']}/plot"]},
            {"kind": "line", "title": "memorization per sigma", "metric_regex": "mem/sigma_.*"},
        ]))
    if "PerSigmaMSE" in names:
        sections.append(("per-sigma MSE", [
            {"kind": "media", "title": "MSE train / held-out / gap: sigma x step", "media_keys": ["mse/curve_heatmap"]},
            {"kind": "media", "title": "MSE against sigma", "media_keys": [f"{names['PerSigmaMSE']}/plot"]},
            {"kind": "line", "title": "held-out minus train MSE per sigma", "metric_regex": "mse/gap/.*"},
            {"kind": "line", "title": "held-out MSE per sigma", "metric_regex": "mse/heldout/.*", "log_y": True},
        ]))
    if "FID" in names:
        sections.append(("sample quality", [
            {"kind": "line", "title": "FID", "y": ["fid/value"]},
            {"kind": "line", "title": "KID", "y": ["kid/value"]},
            {"kind": "line", "title": "samples behind FID / KID", "y": ["fid/num_samples", "kid/num_samples"]},
            {"kind": "media", "title": "FID and KID against step", "media_keys": [f"{names['FID']}/plot"]},
        ]))
    samples = []
    if "SampleGrid" in names:
        samples.append({"kind": "media", "title": "samples beside their nearest training images",
                        "media_keys": ["samples/nearest_pairs"]})
    if "TrajectoryMemorization" in names:
        samples.append({"kind": "media", "title": "ratio test d1/d2 of the samples",
                        "media_keys": [f"{names['TrajectoryMemorization']}/plot"]})
    if samples:
        sections.append(("samples", samples))
    if not sections:
        raise ValueError("the config runs none of calmwild's evaluation callbacks (callbacks.PerSigmaMSE, "
                         "PerSigmaMemorization, TrajectoryMemorization, FID, SampleGrid): a workspace would be empty")
    return sections


def build_workspace(config: dict, entity: str, project: str, name: str):
    """The ``wandb_workspaces.workspaces.Workspace`` of :func:`workspace_panels`, runs grouped by ``group``."""
    import wandb_workspaces.expr as expr
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(spec: dict[str, Any]):
        if spec["kind"] == "media":
            return wr.MediaBrowser(title=spec["title"], media_keys=spec["media_keys"])
        return wr.LinePlot(title=spec["title"], x=STEP, y=spec.get("y", []), metric_regex=spec.get("metric_regex"),
                           log_y=spec.get("log_y"))

    sections = [ws.Section(name=title, panels=[panel(spec) for spec in specs], is_open=True)
                for title, specs in workspace_panels(config)]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=STEP),
                        runset_settings=ws.RunsetSettings(groupby=[expr.Metric("group")]))


def workspace_specification(workspace) -> dict:
    """What saving the workspace would send to W&B (its view specification as JSON), for offline checks."""
    return workspace._to_model().model_dump(by_alias=True, mode="json")
