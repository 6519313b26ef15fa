import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from calmwild.unet import PositionalEmbedding, UNet, count_parameters, num_groups

TINY = dict(img_resolution=16, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
            attn_resolutions=(8,), dropout=0.0)
SMALL_RGB = dict(img_resolution=32, in_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_blocks=1,
                 attn_resolutions=(16,), dropout=0.1)
CIFAR = dict(img_resolution=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
             attn_resolutions=(16,), dropout=0.13)


def _perturbed(net: UNet, seed: int = 0, scale: float = 0.05) -> UNet:
    """Add noise to every weight, so that zero/near-zero initialised layers do not hide the behaviour under test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def _inputs(cfg: dict, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"], generator=gen)
    return x, torch.randn(batch, generator=gen)


@pytest.mark.parametrize(
    "cfg",
    [TINY, SMALL_RGB, {**TINY, "out_channels": 2}, {**TINY, "channel_mult": (1,), "attn_resolutions": ()},
     {**SMALL_RGB, "attn_resolutions": (32, 8), "num_classes": 3}],
    ids=["gray16", "rgb32", "out2", "one_level", "rgb32_cond"],
)
def test_output_shape(cfg):
    torch.manual_seed(0)
    net = UNet(**cfg).eval()
    x, c = _inputs(cfg, batch=3)
    labels = torch.tensor([0, 2, 1]) if cfg.get("num_classes", 0) else None
    out = net(x, c, labels)
    out_channels = cfg.get("out_channels") or cfg["in_channels"]
    assert out.shape == (3, out_channels, cfg["img_resolution"], cfg["img_resolution"])
    assert out.dtype == torch.float32


def test_cifar_config_matches_edm_ddpmpp_size():
    # EDM reports 55.7M parameters for DDPM++ on CIFAR-10 (Karras et al. 2022); Gu et al. report 35.1M with 2 blocks.
    torch.manual_seed(0)
    n = count_parameters(UNet(**CIFAR))
    assert 54e6 < n < 58e6
    assert n == pytest.approx(55.7e6, rel=0.01)
    assert count_parameters(UNet(**{**CIFAR, "num_blocks": 2})) == pytest.approx(35.1e6, rel=0.01)
    # the defaults are the CIFAR-10 configuration
    assert UNet().config == UNet(**CIFAR).config


def test_count_parameters_matches_hand_count_and_rejects_non_modules():
    lin = torch.nn.Linear(5, 3)  # 5*3 weights + 3 biases
    assert count_parameters(lin) == 18
    with pytest.raises(TypeError, match="Module"):
        count_parameters([torch.zeros(3)])


def test_output_layer_starts_at_zero():
    net = UNet(**TINY).eval()
    x, c = _inputs(TINY, batch=2)
    assert torch.count_nonzero(net(x, c)) == 0


def test_group_count_is_largest_divisor_up_to_32():
    for channels in range(1, 300):
        g = num_groups(channels)
        assert channels % g == 0 and g <= 32
        assert all(channels % d for d in range(g + 1, min(32, channels) + 1))
    assert num_groups(256) == 32 and num_groups(16) == 16 and num_groups(48) == 24


def test_positional_embedding_endpoints():
    emb = PositionalEmbedding(8)
    out = emb(torch.tensor([0.0, 2.0]))
    assert torch.equal(out[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # frequencies run from 1 down to 1/10000 inclusive: first feature is cos(2), last sin(2e-4)
    assert out[1, 0].item() == pytest.approx(torch.cos(torch.tensor(2.0)).item(), abs=1e-6)
    assert out[1, -1].item() == pytest.approx(2e-4, rel=1e-4)


def test_class_conditioning_changes_output():
    torch.manual_seed(0)
    net = _perturbed(UNet(**{**TINY, "num_classes": 4})).eval()
    x, c = _inputs(TINY, batch=2)
    x, c = x[:1].expand(2, -1, -1, -1), c[:1].expand(2)  # the same input twice
    same = net(x, c, torch.tensor([1, 1]))
    assert torch.allclose(same[0], same[1], atol=1e-6)
    diff = net(x, c, torch.tensor([1, 3]))
    assert (diff[0] - diff[1]).abs().max() > 1e-3


def test_noise_label_changes_output():
    torch.manual_seed(0)
    net = _perturbed(UNet(**TINY)).eval()
    x, _ = _inputs(TINY, batch=1)
    a, b = net(x, torch.tensor([0.1])), net(x, torch.tensor([-0.5]))
    assert (a - b).abs().max() > 1e-3
    # a scalar noise label is shared by the batch
    assert torch.allclose(net(x, torch.tensor(0.1)), a, atol=1e-6)


def test_samples_do_not_interact_across_the_batch():
    torch.manual_seed(0)
    net = _perturbed(UNet(**TINY)).eval()
    x, c = _inputs(TINY, batch=4)
    batched = net(x, c)
    single = torch.cat([net(x[i : i + 1], c[i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_class_label_errors():
    cond = UNet(**{**TINY, "num_classes": 3})
    uncond = UNet(**TINY)
    x, c = _inputs(TINY, batch=2)
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, c)
    with pytest.raises(ValueError, match="num_classes=0"):
        uncond(x, c, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cond(x, c, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        cond(x, c, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        cond(x, c, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(img_resolution=18, channel_mult=(1, 2, 2)), "divisible by 2\\*\\*2"),
        (dict(attn_resolutions=(4,)), r"attn_resolutions \[4\]"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(model_channels=0), "model_channels"),
        (dict(model_channels=15), "even"),
        (dict(num_blocks=2.5), "num_blocks"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(num_classes=-1), "num_classes"),
        (dict(in_channels=True), "in_channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(channel_mult_emb=0), "channel_mult_emb"),
    ],
)
def test_constructor_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, **overrides})


def test_constructor_rejects_non_sequence_multipliers():
    with pytest.raises(TypeError, match="channel_mult"):
        UNet(**{**TINY, "channel_mult": 2})


def test_forward_rejects_bad_shapes():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        net(torch.zeros(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="noise_labels"):
        net(torch.zeros(2, 1, 16, 16), torch.zeros(3))


def test_config_round_trip_through_json():
    torch.manual_seed(0)
    net = _perturbed(UNet(**{**SMALL_RGB, "num_classes": 2})).eval()
    cfg = json.loads(json.dumps(net.config))
    assert cfg["channel_mult"] == [1, 2, 2] and cfg["out_channels"] == 3
    rebuilt = UNet(**cfg)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    rebuilt.eval()
    x, c = _inputs(SMALL_RGB, batch=2)
    labels = torch.tensor([0, 1])
    assert torch.equal(net(x, c, labels), rebuilt(x, c, labels))


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    net = _perturbed(UNet(**TINY)).eval()
    x, c = _inputs(TINY, batch=2)
    ref = net(x, c)
    net_cl = net.to(memory_format=torch.channels_last)
    out = net_cl(x.contiguous(memory_format=torch.channels_last), c)
    assert torch.allclose(out, ref, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, c)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits; the error must be small relative to the output scale
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    net = _perturbed(UNet(**{**TINY, "dropout": 0.5}))
    x, c = _inputs(TINY, batch=2)
    net.eval()
    assert torch.equal(net(x, c), net(x, c))
    net.train()
    assert not torch.equal(net(x, c), net(x, c))


def test_tiny_training_step_is_fast():
    torch.manual_seed(0)
    cfg = dict(img_resolution=16, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(8,), dropout=0.1)
    net = UNet(**cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, c = _inputs(cfg, batch=32)
    target = torch.randn_like(x)
    before = [p.detach().clone() for p in net.parameters()]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = (net(x, c) - target).square().mean()
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up (allocator, kernels)
    start = time.perf_counter()
    loss = step()
    elapsed = time.perf_counter() - start
    print(f"tiny UNet forward+backward+Adam step (batch 32, CPU): {elapsed * 1e3:.1f} ms")
    assert elapsed < 5.0
    assert torch.isfinite(torch.tensor(loss))
    changed = sum(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert changed == len(before)  # every parameter receives a gradient (none is dead)


def test_edm_variant_uses_songunets_group_rule_and_shifts_before_the_norm():
    from calmwild.unet import ResBlock

    assert [num_groups(c, "edm") for c in (16, 32, 96, 128, 256)] == [4, 8, 24, 32, 32]
    with pytest.raises(ValueError, match="C = 70"):
        num_groups(70, "edm")
    torch.manual_seed(0)
    block = ResBlock(8, 8, emb_channels=4, dropout=0.0, variant="edm").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
        h = block.conv0(F.silu(block.norm0(x)))
        h = block.norm1(h + block.emb_proj(emb)[:, :, None, None])  # GN(h + A e), SongUNet's order
        expected = (block.conv1(F.silu(h)) + x) / math.sqrt(2)
        torch.testing.assert_close(block(x, emb), expected)
        assert block.norm0.num_groups == 2  # min(32, 8 // 4)
    with pytest.raises(ValueError, match="variant must be one of"):
        UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), variant="songunet")
