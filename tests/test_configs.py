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
