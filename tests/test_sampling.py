"""EDM samplers against the exact ODE solution for Gaussian data, memorization of the empirical denoiser,
swap routing and per-image seeding."""

import math

import pytest
import torch

from calmwild.denoisers import EmpiricalDenoiser, GaussianDenoiser, SwapDenoiser
from calmwild.sampling import SamplerOutput, edm_sampler, generate, noise_for_indices
from calmwild.schedule import edm_sigma_steps

T_MAX = 80.0


class CountingDenoiser:
    """Wraps a denoiser and records the sigma of every call (the sampler uses one sigma per call)."""

    def __init__(self, inner):
        self.inner, self.sigmas = inner, []
        self.image_shape = getattr(inner, "image_shape", None)

    def __call__(self, x, sigma):
        assert torch.all(sigma == sigma[0])
        self.sigmas.append(float(sigma[0]))
        return self.inner(x, sigma)


def exact_gaussian_flow(x_start: torch.Tensor, mu: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """Exact solution of the probability-flow ODE for data N(mu, s^2 I), started at x(T_MAX) = x_start.

    The optimal denoiser is D(x; t) = mu + s^2 / (s^2 + t^2) (x - mu), so with y = x - mu the ODE
    dx/dt = (x - D) / t reads dy/dt = y t / (s^2 + t^2), i.e. d ln y / dt = (1/2) d ln(s^2 + t^2) / dt, hence
    y(t) = y(T) sqrt(s^2 + t^2) / sqrt(s^2 + T^2).
    """
    return mu + math.sqrt(s**2 + t**2) / math.sqrt(s**2 + T_MAX**2) * (x_start - mu)


def _gaussian_problem(s: float = 0.5, batch: int = 32):
    g = torch.Generator().manual_seed(0)
    mu = 0.3 * torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
    den = GaussianDenoiser(mu, s**2 * torch.eye(16, dtype=torch.float64))
    noise = torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64)  # float64: the denoiser runs in float64
    return mu, den, noise


def _error_before_last_step(solver: str, num_steps: int, s: float = 0.5) -> float:
    """Relative error of the state at t_{N-1} = sigma_min, i.e. before the final Euler step to t = 0 (which is
    not part of either method's order of accuracy)."""
    mu, den, noise = _gaussian_problem(s)
    out = edm_sampler(den, noise, num_steps=num_steps, solver=solver, record=True)
    t_last = float(out.sigmas[num_steps - 1])
    exact = exact_gaussian_flow(T_MAX * noise, mu, s, t_last)
    return float((out.trajectory_states[num_steps - 1] - exact).norm() / (exact - mu).norm())


@pytest.mark.parametrize("solver, low, high", [("heun", 3.0, 5.0), ("euler", 1.6, 2.4)])
def test_convergence_order_on_gaussian_data(solver, low, high):
    # N = 2^k + 1 steps: doubling the number of intervals halves the step size in EDM's rho-warped time.
    # Measured (s = 0.5): heun 6.29e-2, 1.47e-2, 3.55e-3 (ratios 4.28, 4.14); euler 1.63e-1, 8.50e-2, 4.34e-2
    # (ratios 1.92, 1.96).
    errors = [_error_before_last_step(solver, n) for n in (17, 33, 65)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(low < r < high for r in ratios), (errors, ratios)


def test_heun_final_sample_matches_exact_solution():
    s = 0.5
    mu, den, noise = _gaussian_problem(s)
    exact = exact_gaussian_flow(T_MAX * noise, mu, s, 0.0)
    rel = lambda out: float((out.samples - exact).norm() / (exact - mu).norm())  # noqa: E731
    assert rel(edm_sampler(den, noise, num_steps=18)) < 0.08  # measured 0.055 with EDM's 18 steps
    assert rel(edm_sampler(den, noise, num_steps=129)) < 2e-3  # measured 8.7e-4
    # float32 state accumulation agrees with float64 to float32 accuracy on this well-conditioned problem
    f32 = edm_sampler(den, noise, num_steps=18, state_dtype=torch.float32).samples
    torch.testing.assert_close(f32, edm_sampler(den, noise, num_steps=18).samples, rtol=1e-5, atol=1e-5)


def test_empirical_denoiser_samples_reproduce_training_points(gen):
    g = gen(1)
    train = torch.rand(20, 1, 4, 4, generator=g) * 2 - 1  # d = 16
    den = EmpiricalDenoiser(train, chunk_size=8)
    samples = generate(den, 24, (1, 4, 4), seed=3, batch_size=12, progress=False)
    d = torch.cdist(samples.reshape(24, -1).double(), train.reshape(20, -1).double())
    nearest = d.min(dim=1).values
    assert float(nearest.max()) < 1e-4, nearest  # every sample is a training image
    assert d.argmin(dim=1).unique().numel() > 5  # and not always the same one


def test_evaluation_counts_and_sigmas(gen):
    train = torch.rand(10, 1, 2, 2, generator=gen(2))
    noise = torch.randn(3, 1, 2, 2, generator=gen(3))
    schedule = edm_sigma_steps(18).float().tolist()
    heun = CountingDenoiser(EmpiricalDenoiser(train))
    edm_sampler(heun, noise)
    # Euler evaluation at every t_i (18) + Heun correction at every t_{i+1} > 0 (17) = 35
    assert len(heun.sigmas) == 35
    assert heun.sigmas == [schedule[0]] + [t for t in schedule[1:] for _ in range(2)]
    euler = CountingDenoiser(EmpiricalDenoiser(train))
    edm_sampler(euler, noise, solver="euler")
    assert euler.sigmas == schedule


def test_swap_with_identical_denoisers_is_bit_identical(gen):
    train = torch.rand(15, 1, 4, 4, generator=gen(4)) * 2 - 1
    base = EmpiricalDenoiser(train)
    copy = EmpiricalDenoiser(train.clone())
    noise = torch.randn(6, 1, 4, 4, generator=gen(5))
    reference = edm_sampler(base, noise).samples
    for other in (base, copy):
        for preset in ("large", "medium", "small"):
            assert torch.equal(edm_sampler(SwapDenoiser(base, other, preset), noise).samples, reference)


@pytest.mark.parametrize(
    "preset, solver, other_calls",
    [
        # medium = 1-based steps 7..13 = t_6..t_12 (0-based); with Heun each of these sigmas is evaluated twice
        # (Euler evaluation of step i at t_i and correction of step i-1 at t_i): 7 * 2 = 14 of the 35 calls.
        ("medium", "heun", 14),
        # large = t_0..t_5: t_0 is evaluated once (no step ends there), t_1..t_5 twice: 1 + 10 = 11.
        ("large", "heun", 11),
        # small = t_13..t_17: twice each (the last step to 0 has no correction, but step 16 ends at t_17): 10.
        ("small", "heun", 10),
        ("medium", "euler", 7),
    ],
)
def test_swap_routes_exactly_the_chosen_steps(preset, solver, other_calls, gen):
    train = torch.rand(10, 1, 2, 2, generator=gen(6))
    base = CountingDenoiser(EmpiricalDenoiser(train))
    other = CountingDenoiser(EmpiricalDenoiser(train))
    edm_sampler(SwapDenoiser(base, other, preset), torch.randn(4, 1, 2, 2, generator=gen(7)), solver=solver)
    total = 35 if solver == "heun" else 18
    assert len(other.sigmas) == other_calls and len(base.sigmas) == total - other_calls
    first, last = {"large": (1, 6), "medium": (7, 13), "small": (14, 18)}[preset]
    chosen = set(edm_sigma_steps(18).float().tolist()[first - 1 : last])
    assert set(other.sigmas) == chosen and not chosen & set(base.sigmas)


def test_churn_raises_sigma_inside_window_and_is_seeded(gen):
    train = torch.rand(10, 1, 2, 2, generator=gen(8))
    noise = torch.randn(4, 1, 2, 2, generator=gen(9))
    den = CountingDenoiser(EmpiricalDenoiser(train))
    kwargs = dict(num_steps=10, solver="euler", s_churn=0.5, s_min=0.05, s_max=10.0)
    first = edm_sampler(den, noise, generator=gen(10), **kwargs).samples
    gamma = min(0.5 / 10, math.sqrt(2) - 1)
    expected = [t * (1 + gamma) if 0.05 <= t <= 10.0 else t for t in edm_sigma_steps(10).tolist()]
    assert den.sigmas == pytest.approx(expected, rel=1e-6)
    assert torch.equal(edm_sampler(den, noise, generator=gen(10), **kwargs).samples, first)
    assert not torch.equal(edm_sampler(den, noise, generator=gen(11), **kwargs).samples, first)


def test_record_returns_trajectory(gen):
    train = torch.rand(10, 2, 3, 3, generator=gen(12))
    noise = torch.randn(5, 2, 3, 3, generator=gen(13))
    out = edm_sampler(EmpiricalDenoiser(train), noise, num_steps=6, record=True)
    assert isinstance(out, SamplerOutput)
    assert out.trajectory_states.shape == (7, 5, 2, 3, 3) and out.trajectory_denoised.shape == (6, 5, 2, 3, 3)
    assert out.sigmas.shape == (7,) and float(out.sigmas[-1]) == 0.0 and float(out.sigmas[0]) == pytest.approx(80.0)
    assert out.trajectory_states.device.type == "cpu" and out.trajectory_states.dtype == torch.float32
    torch.testing.assert_close(out.trajectory_states[0], noise * 80.0)
    assert torch.equal(out.trajectory_states[-1], out.samples)
    # the last step to t = 0 is Euler: x_N = D(x_{N-1}; t_{N-1}), the last recorded denoised estimate
    torch.testing.assert_close(out.trajectory_denoised[-1], out.samples)
    plain = edm_sampler(EmpiricalDenoiser(train), noise, num_steps=6)
    assert plain.trajectory_states is None and plain.trajectory_denoised is None
    assert torch.equal(plain.samples, out.samples)


def test_noise_for_indices_is_per_image_seeded(gen):
    noise = noise_for_indices([4, 0, 9], (1, 2, 2), seed=100)
    for row, i in zip(noise, [4, 0, 9]):
        assert torch.equal(row, torch.randn(1, 2, 2, generator=gen(100 + i)))


@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_generate_does_not_depend_on_batch_size(churn, gen):
    train = torch.rand(12, 1, 3, 3, generator=gen(14)) * 2 - 1
    den = GaussianDenoiser.fit(train)
    kw = dict(seed=7, progress=False, num_steps=8, s_churn=churn)
    a = generate(den, 10, (1, 3, 3), batch_size=3, **kw)
    b = generate(den, 10, (1, 3, 3), batch_size=7, **kw)
    assert a.shape == (10, 1, 3, 3) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the first 4 images do not depend on how many images follow
    torch.testing.assert_close(generate(den, 4, (1, 3, 3), batch_size=4, **kw), a[:4], rtol=0, atol=1e-6)
    assert not torch.allclose(generate(den, 10, (1, 3, 3), batch_size=5, **{**kw, "seed": 8}), a)
    out = generate(den, 10, (1, 3, 3), batch_size=4, record=True, **kw)
    assert out.trajectory_states.shape == (9, 10, 1, 3, 3) and out.trajectory_denoised.shape == (8, 10, 1, 3, 3)
    torch.testing.assert_close(out.samples, a, rtol=0, atol=1e-6)


def test_sampler_errors(gen):
    den = GaussianDenoiser(torch.zeros(4), torch.eye(4))
    noise = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        edm_sampler(den, noise, num_steps=0)
    with pytest.raises(ValueError, match=r"unknown solver 'rk4'.*'heun', 'euler'"):
        edm_sampler(den, noise, solver="rk4")
    with pytest.raises(ValueError, match="s_churn"):
        edm_sampler(den, noise, s_churn=-1.0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        edm_sampler(den, torch.zeros(3, 1, 2, 2), s_churn=1.0, generator=[gen(0), gen(1)])
    with pytest.raises(ValueError, match="num must be an integer >= 1, got 0"):
        generate(den, 0, (1, 2, 2), progress=False)
    with pytest.raises(ValueError, match=r"image_shape must be three positive ints.*\(2, 2\)"):
        generate(den, 1, (2, 2), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate(den, 1, (1, 2, 2), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate(den, 1, (1, 2, 2), progress=False, generator=gen(0))


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_a_run_split_at_any_step_equals_the_whole_run(solver):
    """Steps [0, k) then [k, N) from the returned state reproduce the full integration bit for bit, and the two
    recorded halves are the full run's trajectory cut at k."""
    train = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    denoiser = EmpiricalDenoiser(train)
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    whole = edm_sampler(denoiser, noise, num_steps=9, solver=solver, record=True)
    for k in (0, 4, 9):
        head = edm_sampler(denoiser, noise, num_steps=9, solver=solver, record=True, stop_step=k)
        tail = edm_sampler(denoiser, noise, num_steps=9, solver=solver, record=True, start_step=k,
                           start_state=head.samples)
        assert torch.equal(tail.samples, whole.samples)
        assert torch.equal(torch.cat([head.trajectory_states, tail.trajectory_states[1:]]), whole.trajectory_states)
        assert torch.equal(torch.cat([head.trajectory_denoised, tail.trajectory_denoised]),
                           whole.trajectory_denoised)
    with pytest.raises(ValueError, match="start_state"):
        edm_sampler(denoiser, noise, num_steps=9, start_step=3)
    with pytest.raises(ValueError, match="stop_step"):
        edm_sampler(denoiser, noise, num_steps=9, stop_step=10)
