"""Denoisers against independent computations: brute-force softmax, Bayes' rule for Gaussians, saved networks."""

import math

import pytest
import torch

from calmwild.denoisers import (
    SWAP_PRESETS,
    EmpiricalDenoiser,
    GaussianDenoiser,
    NetworkDenoiser,
    SwapDenoiser,
    check_compatible,
    load_denoiser,
    swap_bands_from_steps,
)
from calmwild.schedule import edm_sigma_steps


def brute_force_posterior_mean(x: torch.Tensor, train: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3 in float64 with explicit (x - y)^2 sums and a full-matrix softmax."""
    xf = x.reshape(x.shape[0], -1).double()
    yf = train.reshape(train.shape[0], -1).double()
    d2 = ((xf[:, None, :] - yf[None, :, :]) ** 2).sum(dim=-1)
    w = torch.softmax(-d2 / (2.0 * sigma.double()[:, None] ** 2), dim=1)
    return (w @ yf).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- empirical


def test_empirical_matches_brute_force_softmax_with_streaming_chunks(gen):
    g = gen(0)
    train = torch.rand(37, 2, 3, 3, generator=g) * 2 - 1
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0, 0.1, 2.0])
    x = train[torch.arange(8) * 4] + sigma[:, None, None, None] * torch.randn(8, 2, 3, 3, generator=g)
    den = EmpiricalDenoiser(train, chunk_size=5)  # 37 = 7 full chunks + 2: exercises the streaming softmax
    out = den(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), brute_force_posterior_mean(x, train, sigma), rtol=0, atol=2e-5)
    # a python float sigma is broadcast to every row
    torch.testing.assert_close(den(x, 0.7).double(), brute_force_posterior_mean(x, train, torch.full((8,), 0.7)),
                               rtol=0, atol=2e-5)


def test_empirical_limits_nearest_image_and_mean(gen):
    g = gen(1)
    train = torch.rand(25, 1, 4, 4, generator=g) * 2 - 1
    x = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    den = EmpiricalDenoiser(train, chunk_size=7)
    nearest = ((x.reshape(6, 1, -1) - train.reshape(1, 25, -1)) ** 2).sum(-1).argmin(dim=1)
    torch.testing.assert_close(den(x, torch.full((6,), 1e-3)), train[nearest], rtol=0, atol=1e-6)
    torch.testing.assert_close(den(x, torch.full((6,), 1e4)), train.mean(0).expand(6, -1, -1, -1), rtol=0, atol=1e-5)
    # in between, the distance to the nearest image grows and the distance to the mean shrinks as sigma grows
    sigmas = [0.05, 0.3, 1.0, 3.0]
    to_nearest = [float((den(x, s) - train[nearest]).norm()) for s in sigmas]
    to_mean = [float((den(x, s) - train.mean(0)).norm()) for s in sigmas]
    assert to_nearest == sorted(to_nearest) and to_mean == sorted(to_mean, reverse=True)


def test_empirical_device_dtype_and_shape_checks():
    train = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    den = EmpiricalDenoiser(train).to("cpu")
    assert den.image_shape == (1, 2, 2)
    assert den(torch.ones(3, 1, 2, 2), torch.ones(3)).dtype == torch.float32  # query dtype is kept
    with pytest.raises(ValueError, match=r"\[B, 1, 2, 2\].*\(3, 1, 3, 3\)"):
        den(torch.ones(3, 1, 3, 3), torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        den(torch.ones(3, 1, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="chunk_size"):
        EmpiricalDenoiser(train, chunk_size=0)
    with pytest.raises(TypeError, match="floating-point"):
        EmpiricalDenoiser(torch.zeros(4, 1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- gaussian


def _random_cov(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_gaussian_equals_bayes_posterior_mean(gen):
    """For x0 ~ N(mu, S), x = x0 + sigma n: E[x0 | x] = (S^-1 + I/sigma^2)^-1 (S^-1 mu + x / sigma^2) (Bayes'
    rule in precision form, solved directly), which eq. 7 must reproduce."""
    g = gen(2)
    d, b = 12, 7
    mean = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    cov = _random_cov(d, g) + 0.05 * torch.eye(d, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0], dtype=torch.float64)
    x = torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64) * 3
    precision = torch.linalg.inv(cov)
    eye = torch.eye(d, dtype=torch.float64)
    lhs = precision.expand(b, d, d) + eye / sigma[:, None, None] ** 2
    rhs = (precision @ mean.reshape(d))[None, :] + x.reshape(b, d) / sigma[:, None] ** 2
    expected = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1).reshape(x.shape)
    den = GaussianDenoiser(mean, cov)
    assert den.image_shape == (3, 2, 2)
    torch.testing.assert_close(den(x, sigma), expected, rtol=1e-9, atol=1e-9)


def test_gaussian_rank_deficient_cov_and_fit(gen):
    g = gen(3)
    d = 10
    cov = _random_cov(d, g, rank=3)  # PSD with 7 zero eigenvalues (tiny negative ones after rounding)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(5, 1, 2, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0, 9.0], dtype=torch.float64)
    # direct form mu + S (S + sigma^2 I)^-1 (x - mu), one linear solve per row
    eye = torch.eye(d, dtype=torch.float64)
    solved = torch.linalg.solve(cov + sigma[:, None, None] ** 2 * eye, (x.reshape(5, d) - mean).unsqueeze(-1))
    expected = mean + (cov @ solved).squeeze(-1)
    torch.testing.assert_close(GaussianDenoiser(mean, cov)(x, sigma).reshape(5, d), expected, rtol=1e-9, atol=1e-9)

    images = torch.randn(50, 1, 2, 5, generator=g, dtype=torch.float64)
    fitted = GaussianDenoiser.fit(images)
    flat = images.reshape(50, d)
    reference = GaussianDenoiser(flat.mean(0).reshape(1, 2, 5), torch.cov(flat.T, correction=0))
    torch.testing.assert_close(fitted(x, sigma), reference(x, sigma), rtol=1e-10, atol=1e-10)
    assert fitted.image_shape == (1, 2, 5)


def test_gaussian_validation():
    eye = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[4, 4\].*\(3, 3\)"):
        GaussianDenoiser(torch.zeros(4), torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianDenoiser(torch.zeros(4), eye + torch.triu(torch.ones(4, 4), diagonal=1))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianDenoiser(torch.zeros(4), torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.1])))
    with pytest.raises(ValueError, match="at least 2 images"):
        GaussianDenoiser.fit(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="dimension 4"):
        GaussianDenoiser(torch.zeros(4), eye)(torch.zeros(2, 1, 3, 3), torch.ones(2))


def test_empirical_approaches_gaussian_as_sigma_grows(gen):
    """Theorem 4.11: the empirical denoiser tends to the Gaussian one with the same mean and covariance."""
    g = gen(4)
    d, n = 8, 2000
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    chol = torch.linalg.cholesky(_random_cov(d, g) + 0.1 * torch.eye(d, dtype=torch.float64))
    samples = (mean + torch.randn(n, d, generator=g, dtype=torch.float64) @ chol.T).reshape(n, 2, 2, 2)
    emp, gauss = EmpiricalDenoiser(samples), GaussianDenoiser.fit(samples)
    base = samples[:64]
    noise = torch.randn(64, 2, 2, 2, generator=g, dtype=torch.float64)
    rel = []
    for sigma in (1.0, 4.0, 16.0, 64.0):
        x = base + sigma * noise
        dg = gauss(x, torch.full((64,), sigma, dtype=torch.float64))
        de = emp(x, torch.full((64,), sigma, dtype=torch.float64))
        rel.append(float((de - dg).norm() / (dg - gauss.mean.reshape(2, 2, 2)).norm()))
    # measured: 0.085, 0.034, 0.0088, 0.0022 (about 1/sigma: sampling noise in the third moments)
    assert all(a > 1.5 * b for a, b in zip(rel, rel[1:])), rel
    assert rel[-1] < 0.01, rel


# ---------------------------------------------------------------------------------------------- swap bands


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swap_presets_cover_the_papers_steps(dtype):
    """Presets are 1-based inclusive step ranges: large 1-6, medium 7-13 (the paper's), small 14-18."""
    schedule = edm_sigma_steps(18).to(dtype)
    covered = {}
    for name in SWAP_PRESETS:
        swap = SwapDenoiser(lambda x, s: x, lambda x, s: x, name)
        covered[name] = [i + 1 for i in range(18) if bool(swap.in_bands(schedule[i : i + 1]))]
    assert covered == {"large": list(range(1, 7)), "medium": list(range(7, 14)), "small": list(range(14, 19))}
    # in the paper's rounded sigmas (App. E.7): medium runs from 8.40 to 0.30
    medium = swap_bands_from_steps(SWAP_PRESETS["medium"])[0]
    assert medium[0] < 0.30 < 8.40 < medium[1] and 0.14 < medium[0] and medium[1] < 12.91


def test_swap_bands_edges_and_errors():
    sched = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert swap_bands_from_steps([(2, 3)], sched) == [(math.sqrt(2.0), math.sqrt(32.0))]
    assert swap_bands_from_steps([(1, 1), (4, 4)], sched) == [(math.sqrt(32.0), math.inf), (0.0, math.sqrt(2.0))]
    with pytest.raises(ValueError, match=r"1 <= first <= last <= 4"):
        swap_bands_from_steps([(0, 2)], sched)
    with pytest.raises(ValueError, match="decreasing"):
        swap_bands_from_steps([(1, 2)], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"unknown swap preset 'huge'.*large.*medium.*small"):
        SwapDenoiser(lambda x, s: x, lambda x, s: x, "huge")
    with pytest.raises(ValueError, match="0 <= low <= high"):
        SwapDenoiser(lambda x, s: x, lambda x, s: x, [(2.0, 1.0)])


class RecordingDenoiser:
    """Returns a constant image and remembers the sigmas of every call."""

    def __init__(self, value: float, image_shape=None):
        self.value, self.image_shape, self.calls = value, image_shape, []

    def __call__(self, x, sigma):
        self.calls.append(sigma.tolist())
        return torch.full_like(x, self.value)


def test_swap_routes_rows_per_sample():
    base, other = RecordingDenoiser(0.0), RecordingDenoiser(1.0)
    swap = SwapDenoiser(base, other, [(0.5, 1.0), (5.0, 6.0)])
    sigma = torch.tensor([0.4, 0.5, 0.75, 1.0, 1.01, 5.5, 7.0])
    out = swap(torch.zeros(7, 1, 2, 2), sigma)
    assert out[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 0, 1, 0]
    assert base.calls == [pytest.approx([0.4, 1.01, 7.0])]
    assert other.calls == [pytest.approx([0.5, 0.75, 1.0, 5.5])]
    swap(torch.zeros(2, 1, 2, 2), torch.tensor([2.0, 3.0]))  # no row in a band: `other` is not called
    assert len(other.calls) == 1 and len(base.calls) == 2


def test_check_compatible_refuses_mismatched_shapes():
    a = EmpiricalDenoiser(torch.zeros(3, 1, 4, 4))
    b = EmpiricalDenoiser(torch.zeros(3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(3, 4, 4\)"):
        check_compatible(a, b)
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(3, 4, 4\)"):
        SwapDenoiser(a, b, "medium")
    check_compatible(a, EmpiricalDenoiser(torch.ones(5, 1, 4, 4)))
    check_compatible(a, lambda x, s: x)  # no image_shape: nothing to check


# ---------------------------------------------------------------------------------------------- networks
NET = dict(in_channels=2, model_channels=8)  # the tiny network of conftest with two image channels


def _save_checkpoint(path, live, ema, meta_overrides=None, sample_class=None):
    state = {f"net.{k}": v for k, v in live.state_dict().items()}
    state.update({f"net_ema.{k}": v for k, v in ema.state_dict().items()})
    config = dict(ema.backbone.config)
    meta = {"format_version": 1, "unet": config, "sigma_data": 0.5, "image_shape": [2, 8, 8],
            "num_classes": int(config.get("num_classes", 0)), "sample_class": sample_class}
    meta.update(meta_overrides or {})
    torch.save({"state_dict": state, "calmwild": meta, "global_step": 7, "epoch": 1}, path)


def test_load_denoiser_restores_the_ema_network(tmp_path, gen, tiny_net):
    live, ema = tiny_net(0, **NET), tiny_net(1, **NET)
    path = tmp_path / "model.ckpt"
    _save_checkpoint(path, live, ema)
    den = load_denoiser(path)
    assert isinstance(den, NetworkDenoiser) and den.image_shape == (2, 8, 8)
    x = torch.randn(3, 2, 8, 8, generator=gen(5))
    sigma = torch.tensor([0.1, 1.0, 20.0])
    ema.eval()
    with torch.no_grad():
        expected = ema(x, sigma)
        live_out = live.eval()(x, sigma)
    torch.testing.assert_close(den(x, sigma), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(live_out, expected, atol=1e-3)  # the EMA weights, not the live ones, were loaded


def test_network_denoiser_class_label_and_mode(gen, tiny_net):
    net = tiny_net(2, **NET, num_classes=3, dropout=0.5)
    net.train()
    den = NetworkDenoiser(net, class_label=1)
    x = torch.randn(2, 2, 8, 8, generator=gen(6))
    sigma = torch.tensor([0.5, 2.0])
    out = den(x, sigma)
    assert net.training  # the caller's mode is restored
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, net(x, sigma, torch.tensor([1, 1])))
        assert not torch.allclose(out, net(x, sigma, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="class_label 3.*num_classes=3"):
        NetworkDenoiser(net, class_label=3)
    with pytest.raises(TypeError, match="EDMPrecond"):
        NetworkDenoiser(torch.nn.Linear(2, 2))


def test_bf16_precision_rounds_the_network_but_keeps_the_skip_path_in_float32(tmp_path, gen, tiny_net):
    """Under bf16 autocast the network output F changes by bf16 rounding (relative ~2^-8), while D = c_skip x +
    c_out F keeps x in float32: at sigma = 0.002, c_out = 0.002, so D moves by far less than a bf16 rounding of x
    (|x| 2^-8 ~ 1e-2) would cause. At sigma = 1 (c_out ~ 0.45) the change is of bf16 size, not zero."""
    net = tiny_net(3, **NET).eval()
    x = torch.randn(4, 2, 8, 8, generator=gen(7))
    fp32, bf16 = NetworkDenoiser(net), NetworkDenoiser(net, precision="bf16")
    small, large = torch.full((4,), 0.002), torch.full((4,), 1.0)
    assert bf16(x, small).dtype == torch.float32 and bf16(x.double(), small).dtype == torch.float64
    assert (bf16(x, small) - fp32(x, small)).abs().max() < 1e-4
    change = (bf16(x, large) - fp32(x, large)).abs().max() / fp32(x, large).abs().max()
    assert 1e-5 < change < 0.05
    with pytest.raises(ValueError, match="precision must be one of.*'fp16'"):
        NetworkDenoiser(net, precision="fp16")
    path = tmp_path / "model.ckpt"
    _save_checkpoint(path, net, net)
    assert load_denoiser(path, precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        load_denoiser(path, precision="half")


def test_load_denoiser_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_denoiser(tmp_path / "missing.ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.txt is not a torch checkpoint"):
        load_denoiser(text)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, plain)
    with pytest.raises(ValueError, match=r"plain\.ckpt is not a calmwild checkpoint.*'calmwild'"):
        load_denoiser(plain)
    future = tmp_path / "future.ckpt"
    torch.save({"state_dict": {}, "calmwild": {"format_version": 2}}, future)
    with pytest.raises(ValueError, match="format_version 2.*format_version 1"):
        load_denoiser(future)


def test_load_denoiser_refuses_mismatched_weights(tmp_path, tiny_net):
    small = tiny_net(3, **NET)
    wide = tiny_net(4, **{**NET, 'model_channels': 16})
    path = tmp_path / "mismatch.ckpt"
    _save_checkpoint(path, wide, wide, meta_overrides={"unet": dict(small.backbone.config)})
    with pytest.raises(ValueError, match=r"mismatch\.ckpt: EMA weights do not match"):
        load_denoiser(path)
    deeper = tiny_net(5, **NET, num_blocks=2)
    _save_checkpoint(path, deeper, deeper, meta_overrides={"unet": dict(small.backbone.config)})
    with pytest.raises(ValueError, match=r"unexpected"):
        load_denoiser(path)
    _save_checkpoint(path, small, small, meta_overrides={"unet": {**small.backbone.config, "model_channels": 7}})
    with pytest.raises(ValueError, match=r"mismatch\.ckpt: cannot build UNet"):
        load_denoiser(path)
