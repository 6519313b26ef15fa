"""callbacks.EarlyDetection in a real fit: its metrics reach the logger and Lightning's callback_metrics at the
evaluated global steps, and equal the step's JSON. The EMA network of a 4-step fit memorizes nothing, so the fit's
denoiser is replaced by a half-empirical, half-Gaussian one (rows 0..5 memorize, 6..11 do not) to reach the AUROC."""

import json

import pytest
import torch

from calmwild.denoisers import EmpiricalDenoiser, GaussianDenoiser
from calmwild.memorization.early import SCORES
from tiny import in_process_fit, only_run_dir, read_metrics

NUM = 12


class HalfMemorizing:
    """Rows [0, NUM / 2) of each call through the empirical denoiser of the training set, the rest through the
    Gaussian fitted to it (the callback sends all NUM trajectories in one batch, row i = trajectory i)."""

    def __init__(self, train):
        self.empirical, self.gaussian = EmpiricalDenoiser(train), GaussianDenoiser.fit(train)

    def __call__(self, x, sigma):
        half = NUM // 2
        return torch.cat([self.empirical(x[:half], sigma[:half]), self.gaussian(x[half:], sigma[half:])])


@pytest.mark.slow
def test_early_detection_logs_against_the_global_step(tmp_path, monkeypatch, one_torch_thread):
    from calmwild.module import DiffusionModule

    monkeypatch.setattr(DiffusionModule, "ema_denoiser",
                        lambda self, precision="fp32": HalfMemorizing(self.trainer.datamodule.train_images))
    callback = {"class_path": "callbacks.EarlyDetection",
                "init_args": {"num_samples": NUM, "every_n_steps": 2, "sampling": {"steps": 5, "batch_size": NUM}}}
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 5, "trainer.callbacks": [callback]})
    run_dir = only_run_dir(tmp_path / "runs")
    rows = read_metrics(run_dir)
    for step in (2, 4, 5):  # every 2 steps, and at the end of training
        record = json.loads((run_dir / "eval" / "early_detection" / f"step_{step:07d}.json").read_text())
        report = record["early_detection"]
        assert report["num_memorized"] == NUM // 2 and report["num_trajectories"] == NUM
        logged = {key: float(value) for row in rows if int(row["step"]) == step for key, value in row.items()
                  if key.startswith("early/") and value}
        assert logged == pytest.approx(record["metrics"])
        assert {f"early/{name}/max_auroc" for name in SCORES} <= set(logged)
        assert logged["early/earliest_step"] == min(logged[f"early/{name}/earliest_step"] for name in SCORES
                                                    if f"early/{name}/earliest_step" in logged)
        assert (run_dir / "eval" / "early_detection" / f"step_{step:07d}.png").is_file()
    assert "early/num_memorized" in cli.trainer.callback_metrics
    heatmaps = {p.name for p in (run_dir / "eval" / "early_detection").glob("*_heatmap.png")}
    assert heatmaps == {f"early_{name}_auroc_heatmap.png" for name in SCORES}
