"""Every config in configs/ parses and instantiates (model, data, trainer, callbacks) without touching data files."""

from pathlib import Path

import pytest

from calmwild.lightning_cli import lightning_main
from calmwild.schedule import ddpm_sigmas
from calmwild.sigma import DangerZoneGap, DDPMUniform, Gap, LogNormal
from calmwild.unet import count_parameters

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def instantiate(config: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    return lightning_main(["--config", str(config), "--trainer.logger=false"], run=False)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_instantiates(config, monkeypatch):
    cli = instantiate(config, monkeypatch)
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert "ModelCheckpoint" in names and "TrajectoryMemorization" in names and "PerSigmaMemorization" in names
    assert cli.model.image_shape[1] == cli.model.image_shape[2]


def test_celeba_gap_removes_timesteps_100_to_350(monkeypatch):
    cli = instantiate(CONFIGS[[c.stem for c in CONFIGS].index("celeba_gap100_350")], monkeypatch)
    sampler = cli.model.sigma_sampler
    assert isinstance(sampler, Gap) and isinstance(sampler.base, DDPMUniform)
    sig = ddpm_sigmas()
    (low, high), = sampler.bands.sigma
    assert low == pytest.approx(float(sig[99])) and high == pytest.approx(float(sig[349]))
    assert sampler.kept_mass == pytest.approx(0.749)


def test_paper_configs_use_the_paper_networks(monkeypatch):
    stems = [c.stem for c in CONFIGS]
    cifar = instantiate(CONFIGS[stems.index("cifar10_cars2k_gap")], monkeypatch)
    assert 54e6 < count_parameters(cifar.model.net) < 58e6  # EDM DDPM++ (55.7M)
    assert isinstance(cifar.model.sigma_sampler, DangerZoneGap)
    assert isinstance(cifar.model.sigma_sampler.base, LogNormal)
    celeba = instantiate(CONFIGS[stems.index("celeba_baseline")], monkeypatch)
    assert 3.5e6 < count_parameters(celeba.model.net) < 4.6e6  # Bonnaire et al.'s DDPM U-Net (4.06M)
    dummy = instantiate(CONFIGS[stems.index("cifar10_cars2k_dummy")], monkeypatch)
    assert dummy.model.hparams.sample_class == 0 and dummy.model.net.backbone.config["num_classes"] == 2


def test_cars_runs_score_fid_and_kid_against_the_5k_training_cars(monkeypatch):
    for stem in ("cifar10_cars2k_baseline", "cifar10_cars2k_dummy", "cifar10_cars2k_gap"):
        cli = instantiate(CONFIGS[[c.stem for c in CONFIGS].index(stem)], monkeypatch)
        (fid,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FID"]
        reference = fid.reference_data
        assert fid.fid.reference == "train" and reference.num_train == 5000 and reference.classes == ["automobile"]
        assert fid.metric_prefixes == ("fid/", "kid/")


@pytest.mark.parametrize("stem", ["cifar10_cars2k_gap", "celeba_gap100_350"])
def test_the_wandb_workspace_of_a_paper_config(stem, tmp_path):
    import json

    from calmwild.cli import run

    config = CONFIGS[[c.stem for c in CONFIGS].index(stem)]
    spec = run(["wandb-workspace", str(config), "--entity", "someone", "--out", str(tmp_path / "spec.json")])
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["entity"] == "someone" and spec["project"] == "calmwild" and spec["displayName"] == f"calmwild {stem}"
    sections = {s["name"]: s for s in spec["spec"]["section"]["panelBankConfig"]["sections"]}
    assert {"memorization against iterations", "per-sigma memorization", "sample quality", "samples"} <= set(sections)
    text = json.dumps(spec)
    for key in ("traj_mem/rate", "mem/peak_rate", "mem/curve_heatmap", "fid/value", "kid/value",
                "samples/nearest_pairs", "trainer/global_step"):
        assert f'"{key}"' in text, key
    lines = [p for s in sections.values() for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert all(p["config"]["xAxis"] == "trainer/global_step" for p in lines)
    if stem.startswith("cifar10"):  # the cars configs also run PerSigmaMSE
        assert '"mse/curve_heatmap"' in text and "per-sigma MSE" in sections


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "digits_gap"])
def test_the_shipped_default_configs_fit_without_warnings_and_write_readable_files(name, tmp_path):
    """A short fit of each shipped CPU config in a fresh process (the user's view: no pytest warning filters): no
    framework warning, no advertisement; under a 022 umask every file it writes is readable by others (0o644)."""
    import os
    import stat

    from tiny import calmwild, only_run_dir, subprocess_env

    root = Path(__file__).resolve().parents[1] / "configs"
    env = subprocess_env(OMP_NUM_THREADS="2")
    previous = os.umask(0o022)
    try:
        done = calmwild(["fit", "--config", str(root / f"{name}.yaml"), "--trainer.max_steps", "4",
                         "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar",
                         "false"], cwd=tmp_path, env=env, timeout=600)
    finally:
        os.umask(previous)
    said = done.stdout
    for noise in ("Warning", "warn(", "litlogger", "💡", "No seed found"):
        assert noise not in said, f"{noise!r} in the output of {name}.yaml:\n{said[-3000:]}"
    assert "trajectory memorization" in said and "next: calmwild" in said
    run_dir = only_run_dir(tmp_path / "runs")
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}, [
        (p.relative_to(run_dir), oct(stat.S_IMODE(p.stat().st_mode))) for p in files
        if stat.S_IMODE(p.stat().st_mode) != 0o644]
