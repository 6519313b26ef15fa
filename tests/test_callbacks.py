"""callbacks/: sharding and gathering (simulated ranks), the shared sample cache, and end-to-end fits through the CLI
with all five evaluation callbacks -- single process with CSV + offline W&B loggers, and 2-process CPU DDP
checked against a single-process computation on the same EMA weights."""

import csv
import json
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

import callbacks.per_sigma as per_sigma_callbacks
from callbacks import FID, PerSigmaMemorization, PerSigmaMSE, SampleGrid, TrajectoryMemorization
from calmwild.evaluation import shard_bounds
from calmwild.settings import FIDSettings, PerSigmaSettings, SamplingSettings
from callbacks.sharding import SampleCache, gather_rows

ROOT = Path(__file__).resolve().parents[1]
SIGMAS = [20.0, 1.0, 0.05]
EVERY = 3
SAMPLES = 15  # odd, like the 33 per-sigma items: DDP shards differ in length, padding is exercised
PER_SIGMA_ITEMS = {"sigmas": SIGMAS, "num_images": 11, "num_noises": 3, "batch_size": 8}
PER_SIGMA = {"per_sigma": PER_SIGMA_ITEMS, "every_n_steps": EVERY}
SAMPLER = {"num_samples": SAMPLES, "sampling": {"steps": 4, "batch_size": 8}, "every_n_steps": EVERY}
NAMES = ("per_sigma_mse", "per_sigma_memorization", "trajectory_memorization", "fid", "sample_grid")


# ------------------------------------------------------------------------------------------------ unit tests


def test_shards_are_contiguous_and_cover_every_item_once():
    for total in (0, 1, 7, 16, 17):
        for world in (1, 2, 3, 5):
            bounds = [shard_bounds(total, r, world) for r in range(world)]
            assert [i for a, b in bounds for i in range(a, b)] == list(range(total))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        shard_bounds(4, 2, 2)


class _ThreadRank:
    """Stands in for a LightningModule on one rank of a world simulated by threads: all_gather waits until every
    rank has sent its tensor and returns them stacked in rank order (what torch.distributed does)."""

    device = torch.device("cpu")

    def __init__(self, rank, slots, barrier):
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def all_gather(self, padded):
        self.slots[self.rank] = padded.clone()
        self.barrier.wait(timeout=10)
        return torch.stack(self.slots)


def _simulate(world, total, rows):
    """gather_rows on ``world`` simulated ranks, rank r sending rows[shard r]; returns each rank's result and the
    padded tensors sent."""
    slots, barrier, results = [None] * world, threading.Barrier(world), [None] * world

    def rank_main(rank):
        a, b = shard_bounds(total, rank, world)
        results[rank] = gather_rows(_ThreadRank(rank, slots, barrier), rows[a:b], total, world)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    return results, slots


def test_gather_rows_pads_and_drops_padding_in_rank_order():
    total, world = 7, 3  # shards of 2, 2, 3 rows
    data = torch.arange(total * 2, dtype=torch.float64).reshape(total, 2)
    results, sent = _simulate(world, total, data)
    assert all(s.shape == (3, 2) for s in sent)  # padded to ceil(7 / 3)
    assert all(torch.equal(r, data) and r.dtype == torch.float64 for r in results)
    flags = torch.arange(total) % 3 == 0
    results, _ = _simulate(world, total, flags)
    assert all(torch.equal(r, flags) and r.dtype == torch.bool for r in results)
    assert torch.equal(gather_rows(None, data, total, 1), data)


def test_sample_cache_serves_covered_slices_and_forgets_old_points():
    cache, calls = SampleCache(), []

    class Run:  # any weak-referenceable object stands for a trainer
        pass

    def make(start, stop):
        def run():
            calls.append((start, stop))
            return torch.arange(start, stop, dtype=torch.float32)
        return run

    trainer = Run()
    assert cache.get(trainer, (10, "end"), (0, 4, "heun"), 0, 8, make(0, 8)).tolist() == list(range(8))
    assert cache.get(trainer, (10, "end"), (0, 4, "heun"), 2, 5, make(2, 5)).tolist() == [2, 3, 4]
    cache.get(trainer, (10, "end"), (1, 4, "heun"), 0, 4, make(0, 4))  # other seed: new samples
    cache.get(trainer, (20, "end"), (0, 4, "heun"), 0, 8, make(0, 8))  # new point: new samples
    assert calls == [(0, 8), (0, 4), (0, 8)]


def test_arguments_are_validated_and_state_keys_are_unique():
    with pytest.raises(ValueError, match="every_n_steps"):
        PerSigmaMSE(every_n_steps=0)
    with pytest.raises(ValueError, match="threshold"):
        PerSigmaMemorization(threshold=1.5)
    with pytest.raises(ValueError, match="feature_extractor"):
        FID(fid=FIDSettings(feature_extractor="vgg"))
    with pytest.raises(ValueError, match="num_samples"):
        FID(num_samples=1)
    with pytest.raises(ValueError, match="solver"):
        SampleGrid(sampling=SamplingSettings(solver="rk4"))
    with pytest.raises(ValueError, match="distinct"):
        PerSigmaMSE(per_sigma=PerSigmaSettings(sigmas=[1.0, 1.0001]))
    callbacks = (PerSigmaMSE(), PerSigmaMSE(PerSigmaSettings(num_images=8)), PerSigmaMSE(name="other"),
                 PerSigmaMemorization(), TrajectoryMemorization(), FID(), SampleGrid())
    keys = {cb.state_key for cb in callbacks}
    assert len(keys) == 7
    cb = TrajectoryMemorization()
    cb.load_state_dict({"last_step": 30, "history": [{"step": 30, "traj_mem/rate": 0.5}]})
    assert cb.state_dict() == {"last_step": 30, "history": [{"step": 30, "traj_mem/rate": 0.5}], "curve_rows": {}}


def test_per_sigma_callbacks_share_one_held_out_pass_only_with_partners_due_on_the_same_items():
    from types import SimpleNamespace

    from callbacks.base import PHASE_BATCH_END, PHASE_TRAIN_END

    items = PerSigmaSettings(sigmas=SIGMAS, num_images=11)
    mse = PerSigmaMSE(items, every_n_steps=3)
    mem = PerSigmaMemorization(PerSigmaSettings(sigmas=SIGMAS, num_images=11, batch_size=5), every_n_steps=6)
    strict = PerSigmaMemorization(items, threshold=0.2, every_n_steps=3, name="strict")
    other_items = PerSigmaMemorization(PerSigmaSettings(sigmas=SIGMAS, num_images=12), every_n_steps=3, name="other")
    trainer = SimpleNamespace(callbacks=[mse, mem, strict, other_items], global_step=6, sanity_checking=False)
    assert mse._partners(trainer, PHASE_BATCH_END) == [mem]  # batching is not an item; one threshold per pass
    assert strict._partners(trainer, PHASE_BATCH_END) == [mse]
    trainer.global_step = 3
    assert mse._partners(trainer, PHASE_BATCH_END) == [strict]  # mem is not due at step 3
    mem.last_step = strict.last_step = 3
    assert mse._partners(trainer, PHASE_TRAIN_END) == []  # step 3 was evaluated already


def test_fid_fails_at_setup_when_inception_weights_are_missing(tmp_path):
    from types import SimpleNamespace

    images = torch.zeros(4, 1, 8, 8)
    fid = FID(fid=FIDSettings(weights_path=str(tmp_path / "missing.pth")))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_images=images, heldout_images=images),
                              callbacks=[fid], checkpoint_callbacks=[], world_size=1)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fid.setup(trainer, SimpleNamespace(image_shape=(1, 8, 8)), "fit")
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        TrajectoryMemorization(num_samples=3).setup(SimpleNamespace(**{**vars(trainer), "world_size": 4}), None, "fit")


# ------------------------------------------------------------------------------------------------ end to end


def _config(path: Path, max_steps: int, loggers: list[dict]) -> Path:
    """A tiny fit on the embedded digits with all five callbacks; checkpoints at every evaluated step."""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": EVERY, "save_top_k": -1}},
        {"class_path": "callbacks.PerSigmaMSE", "init_args": PER_SIGMA},
        {"class_path": "callbacks.PerSigmaMemorization", "init_args": PER_SIGMA},
        {"class_path": "callbacks.TrajectoryMemorization", "init_args": SAMPLER},
        {"class_path": "callbacks.FID", "init_args": {**SAMPLER, "fid": {"feature_extractor": "random"}}},
        {"class_path": "callbacks.SampleGrid", "init_args": {**SAMPLER, "num_samples": 7}},
    ]
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 0, "logger": loggers, "callbacks": callbacks},
        "model": {"backbone": {"class_path": "calmwild.unet.UNet", "init_args": {
                      "img_resolution": 8, "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
                      "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
                  "lr": 2e-3, "ema_halflife_images": 2000, "sampler_steps": 4},
        "data": {"class_path": "calmwild.data.DigitsDataModule",
                 "init_args": {"num_train": 64, "num_heldout": 48, "resolution": 8, "batch_size": 16}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _run_dir(root: Path) -> Path:
    (run_dir,) = root.glob("run-*")
    return run_dir


def _eval_json(run_dir: Path, name: str, step: int) -> dict:
    return json.loads((run_dir / "eval" / name / f"step_{step:07d}.json").read_text())


def _expected_keys() -> dict[str, set[str]]:
    sig = [f"sigma_{s:.3g}" for s in SIGMAS]
    return {
        "per_sigma_mse": {f"mse/{split}/{s}" for split in ("train", "heldout", "gap") for s in sig},
        "per_sigma_memorization": {f"mem/{s}" for s in sig} | {"mem/peak_rate", "mem/peak_sigma"},
        "trajectory_memorization": {"traj_mem/rate", "traj_mem/stderr", "traj_mem/num_samples"},
        "fid": {"fid/value", "fid/num_samples", "kid/value", "kid/std", "kid/num_samples", "kid/subset_size"},
        "sample_grid": set(),
    }


HEATMAPS = {"per_sigma_mse": {"mse_curve_heatmap.png"}, "per_sigma_memorization": {"mem_curve_heatmap.png"}}


def _check_files(run_dir: Path, steps: list[int], phases: list[str], heatmaps: bool = True) -> None:
    for name, keys in _expected_keys().items():
        folder = run_dir / "eval" / name
        expected = {"history.json"} | {f"step_{s:07d}.{ext}" for s in steps for ext in ("json", "png")}
        expected |= HEATMAPS.get(name, set()) if heatmaps else set()
        assert {p.name for p in folder.iterdir()} == expected, name
        history = json.loads((folder / "history.json").read_text())["history"]
        assert [h["step"] for h in history] == steps and [h["phase"] for h in history] == phases
        for step in steps:
            record = _eval_json(run_dir, name, step)
            assert set(record["metrics"]) == keys and record["step"] == step


def _wandb_records(run_dir: Path) -> list:
    """The records of the offline run: the .wandb file is a LevelDB-style log (7-byte ':W&B' header, 32 KiB blocks of
    records with a 7-byte header crc32/length/type) of ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(records: list) -> list[dict[str, str]]:
    """The history rows of the records: key -> JSON value."""
    return [{item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


@pytest.mark.slow
def test_single_process_fit_logs_to_csv_and_wandb(tmp_path, monkeypatch):
    import wandb

    from calmwild.cli import run

    from calmwild.module import DiffusionModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    sample_calls, original_sample = [], DiffusionModule.sample

    def counted_sample(self, num, seed=0, **kwargs):
        sample_calls.append((self.global_step, num, seed))
        return original_sample(self, num, seed=seed, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample", counted_sample)
    per_sigma_calls, evaluate_per_sigma = [], per_sigma_callbacks.evaluate_per_sigma

    def counted_per_sigma(*args, mse, memorization, **kwargs):
        per_sigma_calls.append((mse, memorization))
        return evaluate_per_sigma(*args, mse=mse, memorization=memorization, **kwargs)

    monkeypatch.setattr(per_sigma_callbacks, "evaluate_per_sigma", counted_per_sigma)
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
               {"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "calmwild-test", "offline": True}}]
    config = _config(tmp_path / "fit.yaml", max_steps=7, loggers=loggers)
    run(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'runs'}"])
    wandb.finish()  # the WandbLogger leaves its run open; finishing flushes the offline log
    run_dir = _run_dir(tmp_path / "runs")
    steps, phases = [3, 6, 7], ["train_batch_end", "train_batch_end", "train_end"]
    _check_files(run_dir, steps, phases)
    # TrajectoryMemorization, FID and SampleGrid (a prefix of the same samples) share one sampling per evaluation
    assert sample_calls == [(step, SAMPLES, 0) for step in steps]
    assert per_sigma_calls == [(True, True)] * len(steps)  # one held-out pass per step serves both per-sigma callbacks
    assert list((run_dir / "fid_cache").glob("train-*.pt"))
    fid = _eval_json(run_dir, "fid", 7)["fid"]
    assert fid["num_samples"] == SAMPLES and "RandomConvFeatures" in fid["feature_extractor"]
    grid = _eval_json(run_dir, "sample_grid", 7)["samples"]
    assert len(grid["nearest_index"]) == 7 and grid["num_memorized"] == sum(grid["memorized"])

    # the CSV logger holds every key at every evaluated step
    with open(run_dir / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for name, keys in _expected_keys().items():
        for key in keys:
            logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
            assert sorted(logged) == steps, key
            expected = _eval_json(run_dir, name, 7)["metrics"][key]  # NaN is written as null
            assert math.isnan(logged[7]) if expected is None else logged[7] == pytest.approx(expected), key

    # the offline W&B run holds the same scalars against trainer/global_step, the curves and the image grid
    records = _wandb_records(run_dir)
    history = _wandb_history(records)
    for keys in _expected_keys().values():
        for key in keys:
            got = sorted(int(float(r["trainer/global_step"])) for r in history if key in r)
            assert got == steps, key
    media = {"mse/curve_table", "mem/curve_table", "mse/curve_heatmap", "mem/curve_heatmap", "samples/nearest_pairs",
             *(f"{name}/plot" for name in ("per_sigma_mse", "per_sigma_memorization", "trajectory_memorization",
                                           "fid"))}
    for key in media:  # every table and image at every evaluated step
        got = sorted(int(float(r["trainer/global_step"])) for r in history if f"{key}/_type" in r)
        assert got == steps, key
    last_table = [r for r in history if "mem/curve_table/_type" in r][-1]
    assert json.loads(last_table["mem/curve_table/_type"]) == "table-file"
    assert json.loads(last_table["mem/curve_table/nrows"]) == len(steps) * len(SIGMAS)  # sigma x step, all steps
    (wandb_run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert wandb_run.run_group == "digits-N64" and list(wandb_run.tags) == ["digits", "N=64", "LogNormal", "band=none"]

    # resuming from last.ckpt (the final step 7, written after the end-of-training evaluation) keeps the schedule and
    # the history held in the callback state
    resume = _config(tmp_path / "resume.yaml", max_steps=10, loggers=loggers[:1])  # same callbacks, CSV only
    run(["fit", "--config", str(resume), f"--trainer.default_root_dir={tmp_path / 'runs'}", "--ckpt_path=last"])
    for name in NAMES:
        history = json.loads((run_dir / "eval" / name / "history.json").read_text())["history"]
        assert [(h["step"], h["phase"]) for h in history] == [
            (3, "train_batch_end"), (6, "train_batch_end"), (7, "train_end"), (9, "train_batch_end"),
            (10, "train_end")], name
    with open(run_dir / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(r["step"]) for r in rows if r.get("traj_mem/rate")) == [3, 6, 7, 9, 10]


def _library_results(run_dir: Path, step: int, datamodule) -> dict:
    """Single-process results on the EMA weights of the checkpoint written at ``step`` (the weights the
    callbacks evaluated at that step: both run before the module's EMA update of the step)."""
    from calmwild.denoisers import load_denoiser
    from calmwild.features import build_feature_extractor
    from calmwild.fid import compute_quality
    from calmwild.memorization.per_sigma import per_sigma_memorization, per_sigma_mse
    from calmwild.memorization.ratio import trajectory_memorization
    from calmwild.sampling import generate

    (ckpt,) = run_dir.rglob(f"*step={step}.ckpt")
    denoiser = load_denoiser(ckpt)
    train, heldout = datamodule.train_images, datamodule.heldout_images
    args = (PER_SIGMA_ITEMS["num_noises"], 0, PER_SIGMA_ITEMS["batch_size"])
    samples = generate(denoiser, SAMPLES, (1, 8, 8), seed=0, batch_size=SAMPLES, progress=False, num_steps=4)
    return {
        "train": per_sigma_mse(denoiser, train[:11], SIGMAS, *args),
        "heldout": per_sigma_mse(denoiser, heldout[:11], SIGMAS, *args),
        "mem": per_sigma_memorization(denoiser, heldout[:11], train, SIGMAS, *args),
        "traj": trajectory_memorization(samples, train),
        "fid": compute_quality(samples, train, build_feature_extractor("random", in_channels=1)),
    }


# Lightning's stock CLI on the same YAML (the callbacks need nothing of calmwild's CLI): the DDP launcher re-runs this
# script for rank 1. calmwild's own CLI under DDP and torchrun is tested in test_ddp.py and test_lightning_cli.py.
DDP_SCRIPT = """
from lightning.pytorch.cli import LightningCLI
from calmwild.data import InMemoryImageDataModule
from calmwild.module import DiffusionModule

LightningCLI(DiffusionModule, InMemoryImageDataModule, subclass_mode_data=True, auto_configure_optimizers=False)
"""


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_computation(tmp_path):
    from calmwild.data import DigitsDataModule

    run_dir = tmp_path / "run"
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""}}]
    config = _config(tmp_path / "fit.yaml", max_steps=3, loggers=loggers)
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, str(script), "fit", "--config", str(config), f"--trainer.default_root_dir={run_dir}",
               "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one set of files, written by rank 0; the heatmaps the last evaluation deferred are drawn when training ends
    _check_files(run_dir, [3], ["train_batch_end"])
    assert _eval_json(run_dir, "per_sigma_mse", 3)["world_size"] == 2

    datamodule = DigitsDataModule(num_train=64, num_heldout=48, resolution=8, batch_size=16)
    datamodule.setup("fit")
    expected = _library_results(run_dir, 3, datamodule)
    # Sharding changes only which process computes an item (and so the batch it is in); per-image results of
    # float32 convolutions may differ in the last bits between batch compositions: relative tolerance 1e-5 on MSEs,
    # identical memorization flags.
    mse = _eval_json(run_dir, "per_sigma_mse", 3)["per_sigma_mse"]
    for split in ("train", "heldout"):
        assert mse[split]["num_items"] == 33
        assert mse[split]["mse_per_pixel"] == pytest.approx(expected[split].mse.tolist(), rel=1e-5)
    mem = _eval_json(run_dir, "per_sigma_memorization", 3)["per_sigma_memorization"]
    assert mem["rate"] == expected["mem"].rate.tolist() and mem["num_items"] == 33
    traj = _eval_json(run_dir, "trajectory_memorization", 3)["trajectory_memorization"]
    assert traj["num_samples"] == SAMPLES and traj["rate"] == expected["traj"].rate
    fid = _eval_json(run_dir, "fid", 3)["fid"]
    assert fid["num_samples"] == SAMPLES and fid["fid"] == pytest.approx(expected["fid"]["fid"], rel=1e-5)
    assert fid["kid"] == pytest.approx(expected["fid"]["kid"], rel=1e-5, abs=1e-9)  # gathered over two ranks
    grid = _eval_json(run_dir, "sample_grid", 3)["samples"]
    assert grid["nearest_index"] == expected["traj"].result.nearest_index[:7].tolist()
    assert grid["ratio"] == pytest.approx(expected["traj"].result.ratio[:7].tolist(), rel=1e-4)
