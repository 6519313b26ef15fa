"""Reliability of training and of the commands: crash and resume, atomic checkpoints, refusing bad configurations
and bad data before any work, non-finite losses, mismatched checkpoints, no hangs without a network, and a fuzz over
configurations.

End-to-end tests run ``calmwild`` in a subprocess (marked ``slow``) on a tiny configuration of the embedded digits:
8x8 images, 96 training images, batch 32 (an epoch is 3 steps), a 16-channel two-level U-Net. The test hooks below
(callbacks loaded by class path, ``test_reliability.X``, with this folder on PYTHONPATH) stall or corrupt a run at a
chosen step; nothing in ``calmwild`` knows about them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from calmwild.data import InMemoryImageDataModule

from tiny import (
    CALMWILD,
    calmwild,
    fit_error,
    in_process_fit,
    only_run_dir,
    read_metrics,
    run_command,
    subprocess_env,
    tiny_config,
    write_config,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """In-process runs use one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1): on 2 shared cores two
    spinning threads per process slow tiny models down several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- test hooks (callbacks a config can name by class path) ---------------------------------------------------------
class HangAtStep(Callback):
    """Before training step ``step`` (0-based global step) writes ``marker`` and sleeps, so that the test can kill the
    process at a known point: steps 0..step-1 are done and logged, later steps are not."""

    def __init__(self, step: int, marker: str, seconds: float = 300.0):
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(self.seconds)


class PoisonBatch(Callback):
    """Overwrites the first image of the batch of global step ``step`` with ``value`` (NaN by default) in place, after
    the datamodule's checks: the loss of that step is non-finite."""

    def __init__(self, step: int, value: float = float("nan")):
        self.step, self.value = step, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0][0].fill_(self.value)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, prefix: str) -> int:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    for key in keys:
        assert torch.equal(a[key], b[key]), f"{key} differs: max |diff| {float((a[key] - b[key]).abs().max())}"
    return len(keys)


# ===== 1. crash and resume ============================================================================================
CRASH_STEP = 10  # the crashed run has done steps 0..9 (checkpoints at 4 and 8) when it is killed
MAX_STEPS = 32  # a multiple of the checkpoint interval, as long runs use


@pytest.fixture(scope="module")
def crash_and_resume(tmp_path_factory):
    """An uninterrupted 32-step run, and a run SIGKILLed before step 10 then resumed with ``--ckpt_path last``."""
    work = tmp_path_factory.mktemp("crash")
    config = write_config(work / "tiny.yaml", **{"trainer.max_steps": MAX_STEPS})
    timings = {}
    start = time.perf_counter()
    calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(work / "reference")], cwd=work)
    timings["reference"] = time.perf_counter() - start

    marker = work / "hung.txt"
    hang = {"class_path": "test_reliability.HangAtStep", "init_args": {"step": CRASH_STEP, "marker": str(marker)}}
    crash_config = write_config(
        work / "crash.yaml",
        **{"trainer.max_steps": MAX_STEPS, "trainer.callbacks": tiny_config()["trainer"]["callbacks"] + [hang]},
    )
    start = time.perf_counter()
    log = open(work / "crashed.log", "w")  # a file, not a pipe: a full pipe would block the run
    process = subprocess.Popen(
        CALMWILD + ["fit", "--config", str(crash_config), "--trainer.default_root_dir", str(work / "crashed")],
        cwd=work, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            ended = process.poll() is not None
            assert not ended, f"the run ended before the crash point:\n{(work / 'crashed.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the run did not reach the crash point within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    timings["crashed"] = time.perf_counter() - start
    crashed_dir = only_run_dir(work / "crashed")
    last = load_checkpoint(crashed_dir / "checkpoints" / "last.ckpt")
    pre_resume_rows = read_metrics(crashed_dir)

    start = time.perf_counter()
    resumed = calmwild(
        ["fit", "--config", str(config), "--trainer.default_root_dir", str(work / "crashed"), "--ckpt_path", "last"],
        cwd=work,
    )
    timings["resumed"] = time.perf_counter() - start
    print(f"crash/resume timings (s): {timings}")
    return {
        "reference": only_run_dir(work / "reference"),
        "resumed": only_run_dir(work / "crashed"),  # resuming reuses the crashed run's directory
        "resume_step": last["global_step"],
        "pre_resume_rows": pre_resume_rows,
        "resume_output": resumed.stdout,
    }


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_bitwise_the_same_live_weights(crash_and_resume):
    """Data order (resumable loader), sigma/noise/dropout (seeded by step), Adam and LR-schedule state: the live
    weights after a SIGKILL and a mid-epoch resume are bitwise those of the uninterrupted run."""
    runs = crash_and_resume
    # killed before step 10: the last checkpoint is step 8, inside epoch 2 (an epoch is 3 steps): a mid-epoch resume
    assert runs["resume_step"] == 8 and runs["resume_step"] % 3 != 0
    assert "not resumable" not in runs["resume_output"]  # Lightning's mid-epoch warning: the loader is resumable
    ref = load_checkpoint(runs["reference"] / "checkpoints" / "last.ckpt")
    res = load_checkpoint(runs["resumed"] / "checkpoints" / "last.ckpt")
    assert ref["global_step"] == res["global_step"] == MAX_STEPS
    assert assert_same_tensors(ref["state_dict"], res["state_dict"], "net.") > 10
    for a, b in zip(ref["optimizer_states"][0]["state"].values(), res["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert ref["lr_schedulers"][0]["last_epoch"] == res["lr_schedulers"][0]["last_epoch"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_bitwise_the_same_ema_weights(crash_and_resume):
    """The EMA is updated in ``optimizer_step``, before ModelCheckpoint saves the step (an update in the module's
    ``on_train_batch_end`` would come after the callbacks' hooks, leaving checkpoints one EMA update behind)."""
    ref = load_checkpoint(crash_and_resume["reference"] / "checkpoints" / "last.ckpt")
    res = load_checkpoint(crash_and_resume["resumed"] / "checkpoints" / "last.ckpt")
    assert assert_same_tensors(ref["state_dict"], res["state_dict"], "net_ema.") > 10


@pytest.mark.slow
def test_resumed_run_logs_the_same_metric_values_as_the_uninterrupted_run(crash_and_resume):
    """Every step the resumed run logged after the resume has exactly the uninterrupted run's values."""
    ref = {row["step"]: row for row in read_metrics(crash_and_resume["reference"])}
    resumed_rows = [r for r in read_metrics(crash_and_resume["resumed"]) if int(r["step"]) >= 8]
    assert [int(r["step"]) for r in resumed_rows] == list(range(8, MAX_STEPS))
    for row in resumed_rows:
        assert row == ref[row["step"]], f"step {row['step']}: {row} != {ref[row['step']]}"


@pytest.mark.slow
def test_resumed_metrics_csv_holds_every_step_exactly_once(crash_and_resume):
    """The crashed run had logged steps 0..9; the resumed one re-runs 8 and 9. The run's metrics.csv must hold the
    uninterrupted run's history: each step once, with the same values."""
    assert [int(r["step"]) for r in crash_and_resume["pre_resume_rows"]] == list(range(CRASH_STEP))
    rows = read_metrics(crash_and_resume["resumed"])
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))
    assert rows == read_metrics(crash_and_resume["reference"])


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_and_resumes(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 7})
    last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 7
    live = cli.trainer.lightning_module.net.state_dict()
    assert all(torch.equal(checkpoint["state_dict"][f"net.{k}"], v) for k, v in live.items())
    resumed = in_process_fit(tmp_path, "--ckpt_path", "last", **{"trainer.max_steps": 9})  # a finished run extended
    assert resumed.trainer.global_step == 9 and load_checkpoint(last)["global_step"] == 9


@pytest.mark.slow
def test_ema_ramp_up_counts_the_current_batch_like_edm(tmp_path):
    """EDM (App. F training loop): after each step cur_nimg += batch, then half-life = min(H, ratio * cur_nimg),
    beta = 0.5 ** (batch / half-life). With ratio 1 and a huge H, step k (0-based) has beta_k = 0.5 ** (1 / (k + 1)).
    The EMA is recomputed from the live weights recorded after every step."""

    class LiveWeights(Callback):
        def __init__(self):
            self.after_step = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after_step.append([p.detach().clone() for p in pl_module.net.parameters()])

    import lightning.pytorch as pl

    from calmwild.data import DigitsDataModule
    from calmwild.module import DiffusionModule
    from calmwild.unet import UNet

    init = tiny_config()["model"]["backbone"]["init_args"]
    module = DiffusionModule(UNet(**{**init, "dropout": 0.0}), ema_halflife_images=1e12, ema_rampup_ratio=1.0)
    ema = [p.detach().clone() for p in module.net_ema.parameters()]
    recorder = LiveWeights()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(num_train=96, num_heldout=8, resolution=8, batch_size=32))
    for k, live in enumerate(recorder.after_step):
        beta = 0.5 ** (1.0 / (k + 1))
        ema = [beta * e + (1 - beta) * w for e, w in zip(ema, live)]
    for expected, got in zip(ema, module.net_ema.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_from_an_explicit_checkpoint_path_keeps_the_command_line_settings(tmp_path):
    """``--ckpt_path last`` and ``--ckpt_path <its file>`` must resume the same way: the config and command line
    decide the module's settings (here nan_policy and sampler_steps), the checkpoint only its state."""
    import shutil

    first = in_process_fit(tmp_path, **{"trainer.max_steps": 2})
    path = tmp_path / "copy" / "checkpoints" / "step2.ckpt"  # the resume below overwrites last.ckpt
    path.parent.mkdir(parents=True)
    shutil.copy(first.trainer.checkpoint_callback.last_model_path, path)
    by_last = in_process_fit(tmp_path, "--ckpt_path", "last", "--model.nan_policy", "skip", "--model.sampler_steps",
                             "5", **{"trainer.max_steps": 3})
    assert (by_last.model.hparams.nan_policy, by_last.model.hparams.sampler_steps) == ("skip", 5)
    by_path = in_process_fit(tmp_path, "--ckpt_path", str(path), "--model.nan_policy", "skip",
                             "--model.sampler_steps", "5", **{"trainer.max_steps": 3})
    assert (by_path.model.hparams.nan_policy, by_path.model.hparams.sampler_steps) == ("skip", 5)


@pytest.mark.slow
def test_a_learning_rate_given_on_resume_takes_effect_and_the_warm_up_continues(tmp_path):
    """Lightning restores the optimizer's hyperparameters from the checkpoint; ``--model.lr`` on resume must win,
    with the warm-up multiplier of the step reached: min(1, (step + 1) / lr_warmup_steps) with 5 warm-up steps."""
    in_process_fit(tmp_path, **{"trainer.max_steps": 2})
    resumed = in_process_fit(tmp_path, "--ckpt_path", "last", "--model.lr", "5e-4", **{"trainer.max_steps": 3})
    assert resumed.trainer.global_step == 3
    group = resumed.trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(5e-4 * min(1.0, (3 + 1) / 5))
    adam_state = next(iter(resumed.trainer.optimizers[0].state.values()))
    assert float(adam_state["step"]) == 3  # Adam's moments and step count came from the checkpoint (2 + 1)


# ===== 3. bad configuration is refused before training ================================================================
def sampler(class_path: str, **init_args) -> dict:
    return {"class_path": f"calmwild.sigma.{class_path}", "init_args": init_args}


LOGNORMAL = sampler("LogNormal")
DDPM = sampler("DDPMUniform")


@pytest.mark.parametrize(
    ("key", "class_path"),
    [("model.sigma_sampler", "calmwild.sigma.NoSuchSampler"), ("data", "calmwild.data.NoSuchDataModule"),
     ("model.backbone", "calmwild.unet.NoSuchNet")],
)
def test_unknown_class_paths_are_refused_at_parse_time_naming_the_key(tmp_path, key, class_path):
    error, said = fit_error(tmp_path, **{key: {"class_path": class_path}})
    assert isinstance(error, SystemExit) and error.code == 2
    assert f'Parser key "{key}"' in said and class_path.rsplit(".", 1)[1] in said
    assert not (tmp_path / "runs").exists()  # refused while parsing: not even a run directory


@pytest.mark.parametrize(
    ("sigma_sampler", "expected"),
    [
        (sampler("Gap", base=LOGNORMAL, bands=[[2.0, 1.0]]), r"band \[2.0, 1.0\] is inverted: low 2.0 > high 1.0"),
        (sampler("Gap", base=LOGNORMAL, bands=[[-1.0, 1.0]]), r"band \[-1.0, 1.0\] has a negative edge"),
        (sampler("Gap", base=DDPM, bands=[[100, 2000]], unit="timestep"), r"band \[100.0, 2000.0\] must lie within "
                                                                            r"\[1, 1000\]"),
        (sampler("Gap", base=DDPM, bands=[[500.0, 900.0]]), r"\[500.0, 900.0\].*holds no mass of the base DDPMUniform"),
        (sampler("Gap", base=LOGNORMAL, bands=[[0.0, 1e30]]), r"remove all the mass of LogNormal"),
        (sampler("Reweighted", base=LOGNORMAL, bands=[[0.1, 1.0]], factors=1.5), r"factor 1.5 is outside \[0, 1\]"),
        (sampler("Reweighted", base=LOGNORMAL, bands=[[0.1, 1.0]], factors=-0.1), r"factor -0.1 is outside \[0, 1\]"),
        (sampler("LogNormal", p_std=0.0), r"p_std must be positive, got 0.0"),
    ],
    ids=["inverted", "negative", "timestep-beyond-T", "outside-support", "all-mass", "factor>1", "factor<0",
         "p_std=0"],
)
def test_bad_sigma_samplers_are_refused_naming_value_and_rule(tmp_path, sigma_sampler, expected):
    import re

    _, said = fit_error(tmp_path, **{"model.sigma_sampler": sigma_sampler})
    assert re.search(expected, said), said[-2000:]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model.backbone.init_args.img_resolution": 12, "model.backbone.init_args.channel_mult": [1, 1, 1, 1]},
         "img_resolution=12 must be divisible by 2**3=8"),
        ({"data.init_args.num_train": 1700, "data.init_args.num_heldout": 500},
         "num_train + num_heldout = 1700 + 500 = 2200 exceeds the 1797 images available"),
        ({"data.init_args.num_heldout": 0}, "num_heldout must be >= 1, got 0"),
        ({"model.sampler_steps": 0}, "sampler_steps must be >= 1, got 0"),
        ({"model.lr": -1.0}, "lr must be positive, got -1.0"),
        ({"data.init_args.batch_size": 500}, "batch_size=500 exceeds the 96 training images served"),
        ({"model.nan_policy": "ignore"}, "nan_policy"),
    ],
    ids=["unet-downsampling", "subset-too-large", "empty-heldout", "sampler-steps", "lr", "batch-size", "nan-policy"],
)
def test_bad_model_and_data_settings_are_refused_before_training(tmp_path, changes, expected):
    _, said = fit_error(tmp_path, **changes)
    assert expected in said, said[-2000:]


@pytest.mark.slow
def test_different_seeds_for_model_and_data_are_accepted(tmp_path):
    """Both classes have a ``seed``; Lightning stops a run when the module's and the datamodule's logged hparams
    share a key with different values, so the datamodule keeps its hparams out of the loggers."""
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 1, "model.seed": 1, "data.init_args.seed": 2})
    assert cli.trainer.global_step == 1


def test_data_and_backbone_image_shapes_must_agree_before_training(tmp_path):
    _, said = fit_error(tmp_path, **{"data.init_args.resolution": 16})
    assert "(1, 16, 16)" in said and "(1, 8, 8)" in said and "img_resolution" in said


@pytest.mark.parametrize(
    ("option", "expected"),
    [(["--steps", "0"], "steps must be an integer >= 1, got 0"),
     (["--num", "0"], "num must be an integer >= 1, got 0"),
     (["--batch_size", "0"], "batch_size must be an integer >= 1, got 0")],
)
def test_sample_command_refuses_bad_sampler_settings_before_sampling(tmp_path, option, expected):
    out = tmp_path / "out"
    error, said = run_command(["sample", "--out", str(out), "--data", "calmwild.data.DigitsDataModule", "--num", "4",
                               "--steps", "2", *option])
    assert error is not None and expected in said, said
    assert not list(out.glob("*"))


@pytest.mark.parametrize("threshold", ["1.5", "0", "-0.2"])
def test_sample_command_refuses_a_ratio_threshold_outside_0_1_before_sampling(tmp_path, threshold):
    out = tmp_path / "out"
    error, said = run_command(["sample", "--out", str(out), "--data", "calmwild.data.DigitsDataModule", "--num", "4",
                               "--steps", "2", "--threshold", threshold])
    assert error is not None and f"threshold must lie in (0, 1), got {float(threshold)}" in said, said
    assert not list(out.glob("*")), "samples were generated before the bad threshold was refused"


# ===== 4. bad data is refused, naming the file ========================================================================
def _pngs(folder: Path, count: int, size: int = 8, start: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def folder_data(root: Path, **init_args) -> dict:
    args = {"root": str(root), "num_train": 4, "num_heldout": 2, "grayscale": True, "batch_size": 2, **init_args}
    return {"class_path": "calmwild.data.ImageFolderDataModule", "init_args": args}


@pytest.mark.slow
def test_image_folder_trains_when_the_files_are_good(tmp_path):
    _pngs(tmp_path / "imgs", 6)
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 1, "data": folder_data(tmp_path / "imgs")})
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty-file"])
def test_corrupt_or_truncated_image_is_refused_naming_the_file(tmp_path, damage):
    paths = _pngs(tmp_path / "imgs", 6)
    bad = paths[3]
    content = bad.read_bytes()
    bad.write_bytes({"garbage": os.urandom(200), "truncated": content[: len(content) // 2], "empty-file": b""}[damage])
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs"))
    assert f"cannot read image {bad}" in said, said[-2000:]


def test_mixed_image_sizes_without_resolution_are_refused_naming_both_files(tmp_path):
    first = _pngs(tmp_path / "imgs", 5)[0]
    odd = _pngs(tmp_path / "imgs", 1, size=10, start=5)[0]
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs"))
    assert str(first) in said and str(odd) in said and "8x8" in said and "10x10" in said and "resolution" in said


def test_empty_image_folders_are_refused_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "empty"))
    assert f"found under {tmp_path / 'empty'}" in said
    _pngs(tmp_path / "imgs", 6)
    (tmp_path / "heldout").mkdir()
    _, said = fit_error(tmp_path, data=folder_data(tmp_path / "imgs", heldout_root=str(tmp_path / "heldout"),
                                                   num_heldout=None))
    assert f"found under {tmp_path / 'heldout'}" in said


class TensorFileDataModule(InMemoryImageDataModule):
    """Test datamodule: training and held-out images from a ``torch.save``d dict of tensors."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def origin(self) -> str:
        return self.path

    def load(self):
        saved = torch.load(self.path, weights_only=True)
        return saved["train"], saved["heldout"], None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_pixels_are_refused_naming_the_source_and_the_image(tmp_path, value):
    train = torch.rand(8, 1, 8, 8) * 2 - 1
    train[5, 0, 3, 3] = value
    path = tmp_path / "images.pt"
    torch.save({"train": train, "heldout": torch.zeros(2, 1, 8, 8)}, path)
    data = {"class_path": "test_reliability.TensorFileDataModule", "init_args": {"path": str(path), "batch_size": 4}}
    _, said = fit_error(tmp_path, data=data)
    assert f"1 NaN/inf pixel values in the training images (first in image 5) from {path}" in said, said[-2000:]


# ===== 5. non-finite losses ===========================================================================================
POISON_STEP = 5


def poisoned(value: float = float("nan")) -> dict:
    checkpoint = tiny_config()["trainer"]["callbacks"][0]
    checkpoint = {**checkpoint, "init_args": {**checkpoint["init_args"], "every_n_train_steps": 2}}
    poison = {"class_path": "test_reliability.PoisonBatch", "init_args": {"step": POISON_STEP, "value": value}}
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


# ===== 6. checkpoint mismatches =======================================================================================
OTHER_ARCH = {  # another architecture and image size: 16x16 images, 8 channels, one level
    "model.backbone.init_args": {"img_resolution": 16, "in_channels": 1, "model_channels": 8, "channel_mult": [1],
                                 "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "data.init_args.resolution": 16,
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """last.ckpt of a 2-step tiny run (8x8) and of a 2-step run of another architecture (16x16)."""
    work = tmp_path_factory.mktemp("ckpts")
    tiny = in_process_fit(work / "tiny", **{"trainer.max_steps": 2})
    other = in_process_fit(work / "other", **{"trainer.max_steps": 2, **OTHER_ARCH})
    return {name: Path(cli.trainer.checkpoint_callback.last_model_path) for name, cli in
            (("tiny", tiny), ("other", other))}


@pytest.mark.slow
def test_sample_with_a_checkpoint_for_another_image_size_than_the_data_fails_clearly(tmp_path, two_checkpoints):
    data = write_config(tmp_path / "data.yaml")  # its data section: 8x8 digits
    error, said = run_command(["sample", "--out", str(tmp_path / "o"), "--ckpt", str(two_checkpoints["other"]),
                               "--data", str(data), "--num", "2", "--steps", "1"])
    assert isinstance(error, ValueError)
    assert "images of shape (1, 16, 16) but the data has shape (1, 8, 8)" in said


@pytest.mark.slow
def test_swap_of_checkpoints_for_different_image_sizes_fails_clearly(tmp_path, two_checkpoints):
    error, said = run_command(["swap", "--out", str(tmp_path / "o"), "--base", str(two_checkpoints["tiny"]),
                               "--other", str(two_checkpoints["other"]), "--num", "2", "--steps", "1"])
    assert isinstance(error, ValueError) and "(1, 8, 8)" in said and "(1, 16, 16)" in said


def _damaged_checkpoints(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    files = {}
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    files["random-bytes"] = (junk, "is not a torch checkpoint")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (truncated, "is not a torch checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, plain)
    files["not-calmwild"] = (plain, "not a calmwild checkpoint")
    tampered = tmp_path / "tampered.ckpt"
    checkpoint = load_checkpoint(good)
    checkpoint["calmwild"]["unet"]["model_channels"] = 32
    torch.save(checkpoint, tampered)
    files["weights-vs-metadata"] = (tampered, "do not match the architecture in its metadata")
    return files


@pytest.mark.slow
def test_sample_refuses_damaged_or_foreign_checkpoint_files_naming_the_file(tmp_path, two_checkpoints):
    for name, (path, expected) in _damaged_checkpoints(tmp_path, two_checkpoints["tiny"]).items():
        error, said = run_command(["sample", "--out", str(tmp_path / name), "--ckpt", str(path), "--num", "2",
                                   "--steps", "1"])
        assert isinstance(error, ValueError) and str(path) in said and expected in said, (name, said)


@pytest.mark.slow
def test_fit_resume_from_a_checkpoint_of_another_architecture_fails_before_training(tmp_path, two_checkpoints):
    error, said = fit_error(tmp_path, "--ckpt_path", str(two_checkpoints["other"]))
    assert isinstance(error, ValueError)
    assert "checkpoint does not match the configured model: unet is" in said and "'model_channels': 8" in said


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random-bytes", "truncated", "not-calmwild"])
def test_fit_resume_from_a_foreign_or_damaged_file_fails_clearly(tmp_path, two_checkpoints, name):
    path, _ = _damaged_checkpoints(tmp_path, two_checkpoints["tiny"])[name]
    error, said = fit_error(tmp_path, "--ckpt_path", str(path))
    assert isinstance(error, ValueError) and str(path) in said and "calmwild checkpoint" in said, said[-1500:]


# ===== 7. no hangs without a network ==================================================================================
def test_cifar10_download_without_network_fails_fast_with_advice(tmp_path):
    """The real URL: offline it fails on the name lookup or the connection, bounded by download_timeout."""
    from calmwild.data import CIFAR10DataModule

    data = CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True, num_train=10, num_heldout=10, batch_size=2,
                             download_timeout=10.0)
    start = time.perf_counter()
    try:
        data.prepare_data()
    except ConnectionError as error:
        elapsed = time.perf_counter() - start
        message = str(error)
    else:
        pytest.skip("this machine can download CIFAR-10: the offline path cannot be exercised")
    print(f"CIFAR-10 offline download failed after {elapsed:.2f} s")
    assert elapsed < 30
    assert "could not download CIFAR-10" in message and "cifar-10-batches-py" in message and "root=" in message


def test_cifar10_download_from_a_silent_address_is_cut_by_the_timeout(tmp_path, monkeypatch):
    """A blackholed address (TEST-NET-1, RFC 5737: never routed) either fails at once (no route) or times out."""
    import calmwild.data.cifar10 as cifar10

    monkeypatch.setattr(cifar10, "CIFAR10_URL", "http://192.0.2.1/cifar-10-python.tar.gz")
    data = cifar10.CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True, download_timeout=3.0,
                                     num_train=10, num_heldout=10, batch_size=2)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="could not download CIFAR-10.*network timeout 3 s"):
        data.prepare_data()
    assert time.perf_counter() - start < 15


def test_missing_inception_weights_fail_fast_with_the_file_to_provide(tmp_path, monkeypatch):
    fid = pytest.importorskip("calmwild.fid", reason="calmwild.fid is not importable yet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no weights there
    start = time.perf_counter()
    try:
        fid.build_feature_extractor("inception")
    except Exception as error:  # InceptionWeightsUnavailable
        elapsed, message = time.perf_counter() - start, str(error)
    else:
        pytest.skip("the Inception weights could be downloaded: the offline path cannot be exercised")
    print(f"missing Inception weights refused after {elapsed:.2f} s")
    assert elapsed < 15
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "weights_path" in message
    assert str(tmp_path / "torch_home") in message


WANDB_LOGGER = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "calmwild-test"}}]


@pytest.mark.slow
@pytest.mark.parametrize("base_url", [None, "https://192.0.2.1"], ids=["default-server", "blackholed-server"])
def test_online_wandb_without_network_fails_within_seconds_with_advice(tmp_path, base_url):
    config = write_config(tmp_path / "wandb.yaml", **{"trainer.logger": WANDB_LOGGER, "trainer.max_steps": 2})
    env = subprocess_env()
    env.pop("WANDB_MODE", None)  # online, as a user's shell would be
    if base_url:
        env["WANDB_BASE_URL"] = base_url
    start = time.perf_counter()
    done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs")],
                    cwd=tmp_path, env=env, timeout=120, check=False)
    elapsed = time.perf_counter() - start
    print(f"online W&B without network refused after {elapsed:.1f} s (process start included)")
    assert done.returncode != 0 and elapsed < 15 + 10  # 15 s budget for the check, ~5-10 s to start Python here
    assert "W&B server cannot be reached" in done.stdout and "WANDB_MODE=offline" in done.stdout
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.slow
def test_online_wandb_without_network_can_fall_back_to_offline(tmp_path):
    config = write_config(tmp_path / "wandb.yaml", **{"trainer.logger": WANDB_LOGGER, "trainer.max_steps": 2})
    env = subprocess_env()
    env.pop("WANDB_MODE", None)
    done = calmwild(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs"),
                     "--wandb_offline_fallback=true"], cwd=tmp_path, env=env, timeout=180)
    assert "logging offline" in done.stdout
    assert list((tmp_path / "runs").glob("run-*/wandb/offline-run-*/run-*.wandb"))


# ===== 9. fuzz: random bounded configurations end in a short run or a clean error =======================================
FUZZ_CASES = 30
CLEAN_ERRORS = (ValueError, TypeError, FileNotFoundError, SystemExit)


def _fuzz_bands(rng, bad: float) -> list[list[float]]:
    bands = []
    for _ in range(rng.randint(1, 2)):
        low, high = sorted(10 ** rng.uniform(-3, 2.5) for _ in range(2))
        if rng.random() < bad:
            low, high = high, low  # inverted
        if rng.random() < bad:
            low = -low  # negative
        bands.append([round(low, 4), round(high, 4)])
    return bands


def _fuzz_sampler(rng, bad: float) -> dict:
    kind = rng.choice(["LogNormal", "DDPMUniform", "Gap", "Reweighted"])
    p_std = rng.uniform(0.3, 2.0) if rng.random() > bad else rng.uniform(-1.0, 0.0)
    lognormal = sampler("LogNormal", p_mean=round(rng.uniform(-3, 1), 3), p_std=round(p_std, 3))
    if kind == "LogNormal":
        return lognormal
    if kind == "DDPMUniform":
        T = rng.randint(10, 1200) if rng.random() > bad else rng.randint(-2, 1)
        return sampler("DDPMUniform", T=T, beta_start=round(10 ** rng.uniform(-5, -3), 6),
                       beta_end=round(10 ** rng.uniform(-2.5, -1), 5))
    base = lognormal if rng.random() < 0.7 else DDPM
    if kind == "Gap":
        return sampler("Gap", base=base, bands=_fuzz_bands(rng, bad))
    factor = rng.uniform(0, 1) if rng.random() > bad else rng.choice([-0.2, 1.3])
    return sampler("Reweighted", base=base, bands=_fuzz_bands(rng, bad), factors=round(factor, 3))


def fuzz_changes(case: int) -> dict:
    """A random configuration; each value is out of its range with probability ``bad`` (so about half the cases
    are valid as a whole)."""
    import random

    rng = random.Random(1000 + case)
    bad = 0.04

    def pick(good, wrong):
        return good() if rng.random() > bad else wrong()

    resolution = rng.choice([4, 8, 8])
    levels = rng.randint(1, 3 if resolution > 4 else 2)
    visited = [resolution >> level for level in range(levels)]
    num_train = pick(lambda: rng.randint(8, 120), lambda: 0)
    return {
        "trainer.max_steps": 2,
        "trainer.logger": False,
        "trainer.callbacks": [],
        "trainer.enable_checkpointing": False,
        "model.sigma_sampler": _fuzz_sampler(rng, bad),
        "model.backbone.init_args": {
            "img_resolution": pick(lambda: resolution, lambda: rng.choice([6, 12, 16])),
            "in_channels": 1,
            "model_channels": pick(lambda: 2 * rng.randint(1, 8), lambda: 2 * rng.randint(1, 8) - 1),
            "channel_mult": [pick(lambda: rng.randint(1, 3), lambda: 0) for _ in range(levels)],
            "num_blocks": pick(lambda: rng.randint(1, 2), lambda: 0),
            "attn_resolutions": pick(lambda: sorted(rng.sample(visited, rng.randint(0, 1))), lambda: [3]),
            "dropout": pick(lambda: round(rng.uniform(0, 0.5), 3), lambda: rng.choice([-0.1, 1.0])),
        },
        "model.lr": pick(lambda: round(10 ** rng.uniform(-5, -1), 8), lambda: rng.choice([0.0, -1e-3])),
        "model.lr_warmup_steps": pick(lambda: rng.randint(0, 10), lambda: -1),
        "data.init_args": {
            "num_train": num_train,
            "num_heldout": pick(lambda: rng.randint(1, 40), lambda: 0),
            "resolution": resolution,
            "batch_size": pick(lambda: rng.randint(1, max(1, min(num_train, 48))), lambda: rng.choice([0, 500])),
            "seed": rng.randint(0, 9),
        },
    }


def _last_frame(error: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"


@pytest.mark.slow
def test_fuzzed_configurations_train_or_fail_cleanly(tmp_path):
    """30 seeded random configurations (sigma sampler and its parameters or bands, U-Net sizes, data sizes, batch size,
    learning rate and warm-up, some of them out of range): each either trains 2 steps or fails with a clean error,
    one of ValueError / TypeError / FileNotFoundError / SystemExit with a message, raised by calmwild's, jsonargparse's
    or Lightning's argument handling, never from inside torch."""
    import contextlib
    import io
    from unittest import mock

    from calmwild.cli import run

    outcomes, problems = [], []
    for case in range(FUZZ_CASES):
        changes = fuzz_changes(case)
        config = write_config(tmp_path / f"fuzz{case}.yaml", **changes)
        stderr = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(stderr), mock.patch.object(sys, "argv", ["calmwild"]):
                cli = run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / f"r{case}")])
        except BaseException as error:  # noqa: BLE001 - classified below
            said = f"{error}\n{stderr.getvalue()}".strip()
            where = _last_frame(error)
            lines = said.splitlines()
            if "Errors:" in lines:  # jsonargparse's union report: the first underlying error says what is wrong
                lines = lines[lines.index("Errors:") + 1:]
            outcome = f"{type(error).__name__} at {where}: {lines[0].strip()[:150] if lines else ''}"
            clean = (
                isinstance(error, CLEAN_ERRORS)
                and len(said) > 10
                and "/torch/" not in where
                and any(part in where for part in ("/calmwild/", "/jsonargparse/", "/lightning/", "argparse.py"))
            )
            if not clean:
                problems.append(f"case {case}: {outcome}\n  config: {changes}")
        else:
            outcome = f"trained {cli.trainer.global_step} steps"
            if cli.trainer.global_step != 2:
                problems.append(f"case {case}: {outcome}")
        outcomes.append(f"case {case:2d} ({time.perf_counter() - start:4.1f} s): {outcome}")
    print("\n".join(outcomes))
    trained = sum("trained" in o for o in outcomes)
    assert 3 <= trained <= FUZZ_CASES - 3, "the fuzz should exercise both outcomes"
    assert not problems, "\n".join(problems)
