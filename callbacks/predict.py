"""``calmwild predict``: the samples of a checkpoint, written as a tensor file, a PNG grid and a JSON summary.

:class:`SampleWriter` hands Lightning the sample numbers 0 .. num_samples - 1 as the predict dataloader; the module's
``predict_step`` turns each batch of numbers into EMA samples (sample i from seed + i noise, so a sample does not
depend on its batch or its DDP rank). At the end every rank's samples are gathered, de-duplicated by number (the
distributed sampler pads the last rank) and written by rank 0 into the run directory: ``samples.pt`` ({"index",
"samples" [N, C, H, W] in [-1, 1], "step", "sampling"}), ``samples.png`` (a grid of up to 256 samples, enlarged to
be legible) and ``samples.json`` (counts, step, sampler settings, files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from calmwild.checks import check_count
from calmwild.grids import render, samples_figure
from calmwild.io import atomic_write, save_png, write_json
from calmwild.settings import SamplingSettings
from callbacks.base import evaluated_step

SAMPLES_FILE = "samples.pt"
GRID_FILE = "samples.png"
SUMMARY_FILE = "samples.json"
GRID_LIMIT = 64


class SampleWriter(BasePredictionWriter):
    """Writes ``num_samples`` EMA samples of the checkpoint (see the module docstring).

    Args:
        num_samples: samples to generate (numbered 0 .. num_samples - 1).
        sampling: the sampler (:class:`calmwild.settings.SamplingSettings`; its batch size is the predict batch).
    """

    def __init__(self, num_samples: int = 64, sampling: SamplingSettings = SamplingSettings()):
        super().__init__(write_interval="epoch")
        self.num_samples = check_count(num_samples, "num_samples")
        if not isinstance(sampling, SamplingSettings):
            raise TypeError(f"sampling must be SamplingSettings, got {type(sampling).__name__}")
        self.sampling = sampling
        self.written: dict[str, Any] | None = None

    def dataloader(self) -> DataLoader:
        """The sample numbers in batches of ``sampling.batch_size``."""
        return DataLoader(torch.arange(self.num_samples), batch_size=self.sampling.batch_size, shuffle=False)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            pl_module.predict_sampling = self.sampling

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: list,
                           batch_indices: Any) -> None:
        index = torch.cat([p["index"] for p in predictions])
        samples = torch.cat([p["samples"] for p in predictions])
        if trainer.world_size > 1:  # equal shares (the sampler pads), so all_gather applies
            index = pl_module.all_gather(index.to(pl_module.device)).reshape(-1).cpu()
            samples = pl_module.all_gather(samples.to(pl_module.device)).reshape(-1, *samples.shape[1:]).cpu()
        if trainer.is_global_zero:
            order = torch.unique(index)  # sorted
            first = {int(i): row for row, i in reversed(list(enumerate(index.tolist())))}
            samples = samples[[first[int(i)] for i in order]]
            self.written = self._write(Path(trainer.default_root_dir), order, samples,
                                       evaluated_step(trainer, pl_module))
        trainer.strategy.barrier()

    def _write(self, out: Path, index: torch.Tensor, samples: torch.Tensor, step: int) -> dict[str, Any]:
        content = {"index": index, "samples": samples.contiguous(), "step": step, "sampling": self.sampling.to_dict()}
        atomic_write(out / SAMPLES_FILE, lambda handle: torch.save(content, handle))
        save_png(render(samples_figure(samples, f"Samples of the checkpoint at step {step}", GRID_LIMIT)),
                 out / GRID_FILE)
        summary = {"num_samples": int(index.numel()), "step": step, "image_shape": list(samples.shape[1:]),
                   "sampling": self.sampling.to_dict(), "files": {"samples": SAMPLES_FILE, "grid": GRID_FILE},
                   "grid_samples": min(GRID_LIMIT, int(index.numel()))}
        write_json(summary, out / SUMMARY_FILE)
        return {**summary, "directory": str(out)}
