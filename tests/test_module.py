import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from calmwild.data import DigitsDataModule
from calmwild.denoisers import load_denoiser
from calmwild.module import DiffusionModule, step_seed
from calmwild.sigma import Gap, LogNormal

@pytest.fixture
def tiny_module(tiny_unet):
    """``tiny_module(**kwargs)``: a DiffusionModule around conftest's tiny U-Net (without attention)."""

    def make(**kwargs) -> DiffusionModule:
        kwargs.setdefault("lr", 2e-3)
        return DiffusionModule(tiny_unet(attn_resolutions=()), **kwargs)

    return make


def tiny_trainer(tmp_path, max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        **kwargs,
    )


def digits(num_train=64, batch_size=32) -> DigitsDataModule:
    return DigitsDataModule(num_train=num_train, num_heldout=64, resolution=8, batch_size=batch_size)


def fixed_probe_loss(module: DiffusionModule, images: torch.Tensor) -> float:
    """EDM-weighted loss of the live network at fixed sigmas and noise (an independent yardstick of fit)."""
    gen = torch.Generator().manual_seed(123)
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0]).repeat_interleave(images.shape[0])
    x0 = images.repeat(5, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        module.net.eval()
        d = module.net(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return float((weight * ((d - x0) ** 2).mean(dim=(1, 2, 3))).mean())


def test_loss_decreases_on_a_tiny_subset(tmp_path, tiny_module):
    data = digits()
    data.setup("fit")
    module = tiny_module()
    before = fixed_probe_loss(module, data.train_images[:32])
    tiny_trainer(tmp_path, max_steps=300).fit(module, datamodule=data)
    after = fixed_probe_loss(module, data.train_images[:32])
    assert after < 0.6 * before, (before, after)


def test_ema_update_matches_edm_half_life_formula(tiny_module):
    module = tiny_module(ema_halflife_images=1000.0, ema_rampup_ratio=None)
    start = copy.deepcopy(module.net_ema.state_dict())
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.update_ema(global_batch=100, images_seen=5000)
    beta = 0.5 ** (100 / 1000.0)
    for name, p in module.net.named_parameters():
        expected = beta * start[name] + (1 - beta) * p
        assert torch.allclose(module.net_ema.state_dict()[name], expected, atol=1e-6), name


def test_ema_ramp_up_after_the_first_batch_follows_edm(tiny_module):
    # After the first batch (64 images seen) the ramped half-life is 0.05 * 64 images, so beta = 0.5 ** 20.
    module = tiny_module(ema_halflife_images=1e6, ema_rampup_ratio=0.05)
    start = [p.detach().clone() for p in module.net_ema.parameters()]
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.5)
    module.update_ema(global_batch=64)
    beta = 0.5 ** (64 / (0.05 * 64))
    for p_ema, p0, p in zip(module.net_ema.parameters(), start, module.net.parameters()):
        assert torch.allclose(p_ema, beta * p0 + (1 - beta) * p, atol=1e-7)


def test_step_seeds_differ_by_step_and_rank():
    seeds = {step_seed(0, s, r) for s in range(100) for r in range(4)}
    assert len(seeds) == 400


def test_nan_loss_raises_at_the_step(tmp_path, tiny_module):
    data = digits()
    module = tiny_module()
    with torch.no_grad():
        next(module.net.parameters()).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at global step 0"):
        tiny_trainer(tmp_path, max_steps=5).fit(module, datamodule=data)


def test_nan_loss_can_be_skipped(tmp_path, tiny_module):
    data = digits()
    module = tiny_module(nan_policy="skip")
    with torch.no_grad():
        next(module.net.parameters()).fill_(math.nan)
    tiny_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)
    assert module.skipped_steps >= 3


def test_gap_sampler_never_trains_inside_the_band(tmp_path, monkeypatch, tiny_module):
    data = digits()
    module = tiny_module(sigma_sampler=Gap(LogNormal(), bands=[[0.2, 1.0]]))
    seen = []
    original = module.net.forward

    def spy(x, sigma, labels=None):
        if module.net.training:
            seen.append(sigma.detach().clone())
        return original(x, sigma, labels)

    monkeypatch.setattr(module.net, "forward", spy)
    tiny_trainer(tmp_path, max_steps=20).fit(module, datamodule=data)
    sig = torch.cat(seen)
    assert sig.numel() == 20 * 32
    assert not torch.any((sig >= 0.2) & (sig <= 1.0))


def test_checkpoint_round_trip_gives_the_ema_denoiser(tmp_path, tiny_module):
    data = digits()
    module = tiny_module()
    trainer = tiny_trainer(tmp_path, max_steps=10)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_denoiser(path)
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.full((4,), 0.7)
    assert torch.allclose(loaded(x, sigma), module.ema_denoiser()(x, sigma), atol=1e-6)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["calmwild"]["image_shape"] == [1, 8, 8]
    assert any(k.startswith("net.") for k in ckpt["state_dict"]) and any(
        k.startswith("net_ema.") for k in ckpt["state_dict"]
    )


def test_constructor_errors(tiny_module, tiny_unet):
    with pytest.raises(ValueError, match="lr must be positive"):
        tiny_module(lr=0.0)
    with pytest.raises(ValueError, match="needs sample_class"):
        DiffusionModule(tiny_unet(attn_resolutions=(), num_classes=2))
    with pytest.raises(ValueError, match="sample_class 3"):
        DiffusionModule(tiny_unet(attn_resolutions=(), num_classes=2), sample_class=3)


def test_sample_shape_and_range(tiny_module):
    module = tiny_module()
    out = module.sample(3, seed=1, num_steps=4)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_logged_sigma_quantiles_are_those_of_the_global_batch(monkeypatch):
    """Every rank draws the whole global batch (then keeps its slice); what training_step hands to the sigma logging
    is the global batch's sigmas, on every rank (the trial saw rank 0's slice logged)."""
    from types import SimpleNamespace

    from calmwild.module import DiffusionModule
    from calmwild.unet import UNet

    module = DiffusionModule(UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=[1],
                                  attn_resolutions=[], dropout=0.0))
    logged = []
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "_log_sigma_histogram", lambda sigma: logged.append(sigma))

    def step(world: int, rank: int, local: int):
        strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor * world)  # every rank finite
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=0, strategy=strategy)
        local_draw, _, _ = module._draw_noise(torch.zeros(local, 1, 8, 8))
        module.training_step([torch.zeros(local, 1, 8, 8)], 0)
        return local_draw.sigma

    single = step(1, 0, 4)
    halves = [step(2, 0, 2), step(2, 1, 2)]
    module._trainer = None
    assert torch.equal(torch.cat(halves), single)  # the ranks' slices make up the single process's batch
    assert len(logged) == 3 and all(torch.equal(sigma, logged[0]) for sigma in logged) and logged[0].numel() == 4
