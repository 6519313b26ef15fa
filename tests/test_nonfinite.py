"""Non-finite losses: `nan_policy: raise` stops at that step leaving the last good checkpoint, `skip` drops the step
and gives up on a diverged run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import (
    in_process_fit,
    load_checkpoint,
    only_run_dir,
    read_metrics,
    tiny_config,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ===== 5. non-finite losses ===========================================================================================
POISON_STEP = 5


def poisoned(value: float = float("nan")) -> dict:
    checkpoint = tiny_config()["trainer"]["callbacks"][0]
    checkpoint = {**checkpoint, "init_args": {**checkpoint["init_args"], "every_n_train_steps": 2}}
    poison = {"class_path": "tiny.PoisonBatch", "init_args": {"step": POISON_STEP, "value": value}}
    return {"trainer.max_steps": 8, "trainer.callbacks": [checkpoint, poison]}


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_run_at_that_step_leaving_the_last_good_checkpoint(tmp_path, value):
    from calmwild.denoisers import load_denoiser

    with pytest.raises(FloatingPointError, match=f"non-finite training loss .* at global step {POISON_STEP};"):
        in_process_fit(tmp_path, **poisoned(value))
    run_dir = only_run_dir(tmp_path / "runs")
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]  # nothing written at or after step 5
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    denoiser = load_denoiser(run_dir / "checkpoints" / "last.ckpt")
    x = torch.zeros(2, 1, 8, 8)
    assert torch.isfinite(denoiser(x, torch.full((2,), 0.5))).all()
    assert [int(r["step"]) for r in read_metrics(run_dir)] == list(range(POISON_STEP))  # no row for the bad step
    # the last good checkpoint resumes (without the poison) to the end
    cli = in_process_fit(tmp_path, "--ckpt_path", "last", **{"trainer.max_steps": 8})
    assert cli.trainer.global_step == 8 and Path(cli.trainer.default_root_dir) == run_dir


@pytest.mark.slow
def test_skip_policy_drops_only_the_non_finite_step(tmp_path):
    cli = in_process_fit(tmp_path, "--model.nan_policy", "skip", **poisoned())
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 8 and module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    rows = read_metrics(only_run_dir(tmp_path / "runs"))
    assert [int(r["step"]) for r in rows if r.get("train/skipped_steps")] == [POISON_STEP]
    assert [int(r["step"]) for r in rows] == list(range(8))


@pytest.mark.slow
def test_skipped_step_does_not_log_the_previous_steps_loss(tmp_path):
    in_process_fit(tmp_path, "--model.nan_policy", "skip", **poisoned())
    rows = {int(r["step"]): r for r in read_metrics(only_run_dir(tmp_path / "runs"))}
    assert rows[POISON_STEP]["train/loss"] != rows[POISON_STEP - 1]["train/loss"]
    assert not math.isfinite(float(rows[POISON_STEP]["train/loss"] or "nan"))


@pytest.mark.slow
def test_an_absurd_learning_rate_is_stopped_at_the_first_non_finite_step(tmp_path):
    """lr = 1e6: the loss explodes within a few steps. The error names step k, and the metrics log holds finite
    losses for exactly the steps before k (an independent record of when the loss was last finite)."""
    import re

    with pytest.raises(FloatingPointError) as info:
        in_process_fit(tmp_path, **{"trainer.max_steps": 30, "model.lr": 1e6, "model.lr_warmup_steps": 0})
    step = int(re.search(r"at global step (\d+);", str(info.value)).group(1))
    rows = read_metrics(only_run_dir(tmp_path / "runs"))
    assert 0 < step < 30 and [int(r["step"]) for r in rows] == list(range(step))
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)

# ===== 7. a diverged run under nan_policy=skip ========================================================================


@pytest.mark.slow
def test_skip_policy_gives_up_after_too_many_consecutive_non_finite_steps(tmp_path):
    poison = {"class_path": "tiny.PoisonFrom", "init_args": {"step": 3}}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}
    with pytest.raises(FloatingPointError) as info:
        in_process_fit(tmp_path, "--model.nan_policy", "skip", "--model.nan_max_consecutive", "4",
                       **{"trainer.max_steps": 30, "trainer.callbacks": [checkpoint, poison]})
    message = str(info.value)
    assert "gives up at global step 7: 5 consecutive non-finite steps (from step 3" in message
    last = torch.load(next((tmp_path / "runs").glob("run-*/checkpoints/last.ckpt")), weights_only=True)
    assert last["global_step"] <= 7 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
