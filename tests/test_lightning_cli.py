"""Lightning's contracts through ``calmwild``: evaluation metrics drive ``ModelCheckpoint(monitor=...)`` on the step
they are computed (one process and torchrun with two), ``validate`` / ``test`` / ``predict`` on a checkpoint (a fit's
``.ckpt``, a ``.safetensors`` file, a backbone that is not calmwild's U-Net), and one-line refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import in_process_fit, subprocess_env, tiny_config, write_config

from calmwild.checkpoints import convert_checkpoint
from calmwild.cli import main, run
from calmwild.denoisers import load_denoiser
from calmwild.sampling import generate

EVERY = 3
SAMPLER = {"num_samples": 8, "sampling": {"steps": 4, "batch_size": 8}, "every_n_steps": EVERY}
EVALUATIONS = [
    {"class_path": "callbacks.PerSigmaMemorization",
     "init_args": {"every_n_steps": EVERY, "per_sigma": {"sigmas": [0.1, 1.0], "num_images": 8, "num_noises": 1}}},
    {"class_path": "callbacks.TrajectoryMemorization", "init_args": SAMPLER},
    {"class_path": "callbacks.FID", "init_args": {**SAMPLER, "fid": {"feature_extractor": "random"}}},
]
MONITOR = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
           "init_args": {"monitor": "traj_mem/rate", "mode": "min", "every_n_train_steps": EVERY,
                         "filename": "best-{step}", "save_top_k": 1}}


def _callbacks(*extra: dict) -> list[dict]:
    return [*tiny_config()["trainer"]["callbacks"], *EVALUATIONS, *extra]


def _evaluate(subcommand: str, checkpoint: Path, tmp_path: Path, *args: str, **changes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / f"{subcommand}.yaml", **{"trainer.callbacks": _callbacks(), **changes})
    cli = run([subcommand, "--config", str(config), "--ckpt_path", str(checkpoint),
               "--trainer.default_root_dir", str(tmp_path / "evals"), *args])
    (out,) = (tmp_path / "evals").glob(f"{subcommand}-*")
    return cli, out


def _eval_record(out: Path, name: str) -> dict:
    (path,) = (out / "eval" / name).glob("step_*.json")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ monitor


@pytest.mark.slow
def test_a_monitored_evaluation_metric_saves_the_checkpoint_of_its_step(tmp_path):
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 6, "trainer.callbacks": _callbacks(MONITOR)})
    monitor = next(cb for cb in cli.trainer.checkpoint_callbacks if cb.monitor == "traj_mem/rate")
    history = json.loads(next(Path(cli.trainer.default_root_dir).glob("eval/trajectory_memorization/history.json"))
                         .read_text())["history"]
    rates = {h["step"]: h["traj_mem/rate"] for h in history if h["phase"] == "train_batch_end"}
    best_step = min(rates, key=lambda step: (rates[step], step))  # ties keep the first (ModelCheckpoint's rule)
    assert Path(monitor.best_model_path).name == f"best-step={best_step}.ckpt"
    assert monitor.best_model_score == pytest.approx(rates[best_step])
    assert "traj_mem/rate" in cli.trainer.callback_metrics and "fid/value" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_early_stopping_on_an_evaluation_metric_stops_at_the_step_it_was_computed(tmp_path):
    stopper = {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
               "init_args": {"monitor": "traj_mem/rate", "mode": "min", "patience": 1}}
    evaluation = {"class_path": "callbacks.TrajectoryMemorization", "init_args": {**SAMPLER, "every_n_steps": 2}}
    callbacks = [*tiny_config()["trainer"]["callbacks"], evaluation, stopper]
    cli = in_process_fit(tmp_path, **{"trainer.max_steps": 30, "trainer.callbacks": callbacks})
    history = json.loads(next(Path(cli.trainer.default_root_dir).glob("eval/*/history.json")).read_text())["history"]
    best, expected = float("inf"), None
    for entry in history:  # patience 1: the first evaluation that does not improve on the best stops the fit
        if entry["traj_mem/rate"] < best:
            best = entry["traj_mem/rate"]
        elif expected is None:
            expected = entry["step"]
    assert expected is not None and cli.trainer.global_step == expected < 30


def test_a_monitor_that_looks_between_evaluations_is_refused(tmp_path):
    wrong = {**MONITOR, "init_args": {**MONITOR["init_args"], "every_n_train_steps": 2}}
    config = write_config(tmp_path / "c.yaml", **{"trainer.max_steps": 2, "trainer.callbacks": _callbacks(wrong)})
    with pytest.raises(ValueError, match=r"every_n_train_steps=2, but TrajectoryMemorization computes traj_mem/rate "
                                         r"every 3 steps"):
        run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert not list((tmp_path / "runs").glob("run-*"))  # refused before anything was written


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_one_run_directory_and_the_monitored_checkpoint(tmp_path):
    config = write_config(tmp_path / "c.yaml", **{"trainer.max_steps": 6, "trainer.callbacks": _callbacks(MONITOR),
                                                 "trainer.strategy": "ddp", "trainer.devices": 2})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "calmwild.cli", "fit", "--config", str(config),
                           "--trainer.default_root_dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("run-torchrun-")
    history = json.loads((run_dir / "eval" / "trajectory_memorization" / "history.json").read_text())["history"]
    assert [(h["step"], h["phase"]) for h in history] == [(3, "train_batch_end"), (6, "train_batch_end")]
    assert json.loads((run_dir / "eval" / "trajectory_memorization" / "step_0000006.json").read_text())[
        "world_size"] == 2
    rates = {h["step"]: h["traj_mem/rate"] for h in history}
    best_step = min(rates, key=lambda step: (rates[step], step))
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*")] == [f"best-step={best_step}.ckpt"]


# ---------------------------------------------------------------------------------------- validate, test, predict


@pytest.mark.slow
def test_validate_and_test_run_the_configured_evaluations_once_on_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    cli, out = _evaluate("validate", tiny_checkpoint, tmp_path / "v")
    printed = capsys.readouterr().out
    step = int(torch.load(tiny_checkpoint, weights_only=True)["global_step"])
    for name in ("per_sigma_memorization", "trajectory_memorization", "fid"):
        record = _eval_record(out, name)
        assert record["phase"] == "validate" and record["step"] == step, name
    fid = _eval_record(out, "fid")["fid"]
    assert fid["reference"] == "train" and fid["num_samples"] == 8 and fid["kid_subset_size"] == 8
    assert f"traj_mem/rate = {_eval_record(out, 'trajectory_memorization')['metrics']['traj_mem/rate']:.6g}" in printed
    assert "val/loss" in cli.trainer.callback_metrics and str(out) in printed
    # the weights evaluated are the checkpoint's EMA weights: FID and KID equal the library's on regenerated samples
    from calmwild.features import build_feature_extractor
    from calmwild.fid import compute_quality

    samples = generate(load_denoiser(tiny_checkpoint), 8, (1, 8, 8), seed=0, batch_size=8, num_steps=4)
    expected = compute_quality(samples, cli.datamodule.train_images, build_feature_extractor("random", in_channels=1))
    assert fid["fid"] == pytest.approx(expected["fid"], rel=1e-6) and fid["kid"] == pytest.approx(expected["kid"])

    _, tested = _evaluate("test", tiny_checkpoint, tmp_path / "t")
    assert _eval_record(tested, "fid")["fid"]["reference"] == "heldout"  # test scores against the held-out set
    assert _eval_record(tested, "fid")["phase"] == "test"
    assert "test/loss" in capsys.readouterr().out


@pytest.mark.slow
def test_a_safetensors_file_validates_like_its_checkpoint(tiny_checkpoint, tmp_path):
    weights = convert_checkpoint(tiny_checkpoint, tmp_path / "tiny.safetensors")
    _, from_ckpt = _evaluate("validate", tiny_checkpoint, tmp_path / "a")
    _, from_weights = _evaluate("validate", weights, tmp_path / "b")
    for name in ("per_sigma_memorization", "trajectory_memorization", "fid"):
        assert _eval_record(from_weights, name)["metrics"] == _eval_record(from_ckpt, name)["metrics"], name


@pytest.mark.slow
def test_predict_writes_the_samples_of_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    _, out = _evaluate("predict", tiny_checkpoint, tmp_path)
    written = torch.load(out / "samples.pt", weights_only=True)
    assert written["index"].tolist() == list(range(64))
    expected = generate(load_denoiser(tiny_checkpoint), 64, (1, 8, 8), seed=0, batch_size=64)
    torch.testing.assert_close(written["samples"], expected, rtol=1e-5, atol=1e-5)
    summary = json.loads((out / "samples.json").read_text())
    assert summary["num_samples"] == 64 and summary["sampling"]["steps"] == 18
    from PIL import Image

    assert min(Image.open(out / "samples.png").size) >= 8 * 48  # 8 x 8 grid of enlarged 8 x 8 digits
    assert "64 samples" in capsys.readouterr().out


@pytest.mark.slow
def test_a_backbone_that_is_not_calmwild_unet_fits_and_validates_through_class_path(tmp_path):
    backbone = {"class_path": "tiny.ConvBackbone", "init_args": {"img_resolution": 8, "in_channels": 1, "channels": 4}}
    cli = in_process_fit(tmp_path / "fit", **{"trainer.max_steps": 2, "model.backbone": backbone})
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert type(cli.model.net.backbone).__name__ == "ConvBackbone"
    validated, out = _evaluate("validate", checkpoint, tmp_path / "v", **{"model.backbone": backbone})
    assert type(validated.model.net.backbone).__name__ == "ConvBackbone"
    assert _eval_record(out, "trajectory_memorization")["step"] == 2


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_an_evaluation_without_a_checkpoint_is_one_line(subcommand, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(SystemExit) as info:
        main([subcommand, "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and f"calmwild {subcommand} needs --ckpt_path" in err
    with pytest.raises(SystemExit):
        main([subcommand, "--config", str(config), "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert "missing.ckpt: no such checkpoint file" in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/*/*"))


@pytest.mark.slow
def test_an_imported_edm_network_is_validated_like_any_checkpoint(tmp_path):
    """An NVlabs/edm pickle (written in EDM's record format, no EDM code) imported, then validated on the digits: the
    per-sigma memorization callback evaluates the imported network (the library's computation on it agrees)."""
    from edm_reference import write_edm_pickle
    from test_interop_edm import snapshot

    from calmwild.interop.edm import import_edm_network
    from calmwild.memorization.per_sigma import per_sigma_memorization
    from calmwild.settings import PerSigmaSettings

    write_edm_pickle(tmp_path / "net.pkl", snapshot(in_channels=1))
    import_edm_network(tmp_path / "net.pkl", tmp_path / "edm.ckpt")
    cli, out = _evaluate("validate", tmp_path / "edm.ckpt", tmp_path / "v")
    assert cli.model.net.backbone.config["variant"] == "edm"  # the checkpoint decided the network, not the config
    record = _eval_record(out, "per_sigma_memorization")["per_sigma_memorization"]
    items = PerSigmaSettings(**EVALUATIONS[0]["init_args"]["per_sigma"])
    expected = per_sigma_memorization(load_denoiser(tmp_path / "edm.ckpt"), cli.datamodule.heldout_images[:8],
                                      cli.datamodule.train_images, items.sigmas, items.num_noises, items.seed)
    assert record["rate"] == pytest.approx([float(r) for r in expected.rate])
    from calmwild.features import build_feature_extractor
    from calmwild.fid import compute_quality

    samples = generate(load_denoiser(tmp_path / "edm.ckpt"), 8, (1, 8, 8), seed=0, batch_size=8, num_steps=4)
    quality = compute_quality(samples, cli.datamodule.train_images, build_feature_extractor("random", in_channels=1))
    assert _eval_record(out, "fid")["fid"]["fid"] == pytest.approx(quality["fid"], rel=1e-6)


def test_metric_columns_sort_numbers_as_numbers():
    from calmwild.lightning_cli import metric_column_key

    names = ["mem/sigma_12.9", "mem/sigma_3.26", "mem/peak_rate", "mem/sigma_0.002", "mem/sigma_80", "epoch"]
    assert sorted(names, key=metric_column_key) == ["epoch", "mem/peak_rate", "mem/sigma_0.002", "mem/sigma_3.26",
                                                    "mem/sigma_12.9", "mem/sigma_80"]


def test_the_next_command_after_a_fit(tmp_path):
    from calmwild.lightning_cli import next_command

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "toy.yaml").write_text("{}")
    run_dir = tmp_path / "runs" / "toy" / "run-1"
    assert next_command(None, run_dir) is None
    assert next_command(configs / "toy.yaml", run_dir).startswith(f"calmwild analyze --data {configs / 'toy.yaml'}")
    (configs / "toy_gap.yaml").write_text("{}")
    assert next_command(configs / "toy.yaml", run_dir).startswith(f"calmwild fit --config {configs / 'toy_gap.yaml'}")
    gap_run = tmp_path / "runs" / "toy_gap" / "run-2"
    assert next_command(configs / "toy_gap.yaml", gap_run).startswith(f"calmwild fit --config {configs / 'toy.yaml'}")
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert next_command(configs / "toy_gap.yaml", gap_run).startswith(f"calmwild compare {run_dir} {gap_run}")
