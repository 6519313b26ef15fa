"""EDM's deterministic / stochastic samplers for the probability-flow ODE (paper eq. 4; Karras et al. 2022, Alg. 2).

dx/dt = (x - D(x; t)) / t is integrated from t_0 = sigma_max down to t_N = 0 on EDM's rho schedule
t_i = edm_sigma_steps(N)[i] (i < N), t_N = 0, starting from x_0 = t_0 * noise. Heun's method corrects every step
except the last one (to t = 0, where the ODE is singular and Euler's step gives x_N = D(x_{N-1}; t_{N-1})), so
Heun with N steps costs 2N - 1 denoiser evaluations (35 for EDM's 18). Optional "churn" adds fresh noise before a
step: t_hat = (1 + gamma) t_i with gamma = min(S_churn / N, sqrt(2) - 1) for t_i in [S_min, S_max], and
x_hat = x_i + sqrt(t_hat^2 - t_i^2) * S_noise * eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from calmwild.checks import check_count
from calmwild.denoisers import Denoiser
from calmwild.schedule import edm_sigma_steps

SOLVERS = ("heun", "euler")


class SamplerOutput(NamedTuple):
    """Result of :func:`edm_sampler` / :func:`generate`.

    samples:             x_N, shape of the noise, in the noise's dtype (``generate``: CPU float32)
    sigmas:              float64 [N + 1], t_0 .. t_{N-1} and the final 0
    trajectory_states:   [N + 1, B, ...] on CPU, the state x_i at each t_i (x_N = samples), or None
    trajectory_denoised: [N, B, ...] on CPU, the denoised estimate D(x_hat_i; t_hat_i) of step i (t_hat_i = t_i
                         without churn), or None
    """

    samples: torch.Tensor
    sigmas: torch.Tensor
    trajectory_states: torch.Tensor | None
    trajectory_denoised: torch.Tensor | None


Generators = torch.Generator | Sequence[torch.Generator] | None


def _standard_normal(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) noise shaped like ``like``. A sequence of generators gives one per row (row j from generator j),
    so the draw of a row does not depend on which other rows share its batch."""
    if generator is None or isinstance(generator, torch.Generator):
        device = like.device if generator is None else generator.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]} rows (need one per row)")
    rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype) for g in generator]
    return torch.stack(rows).to(like.device)


def edm_sampler(
    denoiser: Denoiser,
    noise: torch.Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    record: bool = False,
    generator: Generators = None,
    state_dtype: torch.dtype = torch.float64,
    start_step: int = 0,
    stop_step: int | None = None,
    start_state: torch.Tensor | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> SamplerOutput:
    """Integrate the probability-flow ODE from ``noise`` (standard normal, [B, ...]) with EDM's Algorithm 2.

    The ODE state is accumulated in ``state_dtype`` (float64 by default; float32 allowed) while the denoiser is
    called with inputs in ``noise.dtype`` and a per-row sigma tensor [B] of that dtype, on ``noise.device``.
    ``solver`` is "heun" (2nd order, 2N - 1 evaluations) or "euler" (1st order, N evaluations). Churn noise
    (``s_churn > 0``) comes from ``generator`` (one generator, or one per row; None: the global RNG).
    ``record=True`` also returns the states and per-step denoised estimates (on CPU, in ``noise.dtype``).

    Part of the integration: steps ``start_step`` .. ``stop_step - 1`` (0-based; default all N) from
    ``start_state``, the state at t_{start_step} (default t_0 * noise, which needs ``start_step`` 0). The result's
    ``samples`` is then the state at t_{stop_step}, kept in ``state_dtype`` so that running [0, k) and then [k, N)
    from it gives the full run's result exactly (without churn). Recorded trajectories cover the steps run.
    ``on_step(done, total)`` is called after each step with the steps run so far and the steps to run (progress).
    """
    num_steps = check_count(num_steps, "num_steps")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise TypeError(f"noise must be a floating-point tensor [B, ...], got {getattr(noise, 'dtype', type(noise))}")
    if not state_dtype.is_floating_point:
        raise TypeError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got s_churn={s_churn}, s_noise={s_noise}")

    stop_step = num_steps if stop_step is None else stop_step
    if not (isinstance(start_step, int) and isinstance(stop_step, int) and 0 <= start_step <= stop_step <= num_steps):
        raise ValueError(f"need 0 <= start_step <= stop_step <= num_steps={num_steps}, got start_step={start_step}, "
                         f"stop_step={stop_step}")
    if start_state is None and start_step != 0:
        raise ValueError(f"start_step={start_step} continues a run: pass the state at that step as start_state")
    if start_state is not None and start_state.shape != noise.shape:
        raise ValueError(f"start_state has shape {tuple(start_state.shape)}, the noise {tuple(noise.shape)}")

    steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    sigmas = torch.cat([steps, torch.zeros(1, dtype=torch.float64)])
    t = sigmas.tolist()
    call_dtype, batch = noise.dtype, noise.shape[0]
    gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((batch,), sigma, dtype=call_dtype, device=noise.device)
        return denoiser(x.to(call_dtype), sig).to(state_dtype)

    x = noise.to(state_dtype) * t[0] if start_state is None else start_state.to(noise.device, state_dtype)
    states = [x.to("cpu", call_dtype)] if record else None
    denoised_steps = [] if record else None
    for i in range(start_step, stop_step):
        t_cur, t_next = t[i], t[i + 1]
        gamma = gamma_max if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur * (1.0 + gamma)
        if gamma > 0:
            eps = _standard_normal(noise, generator).to(state_dtype)
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * eps
        d_hat = denoise(x, t_hat)
        slope = (x - d_hat) / t_hat
        x_next = x + (t_next - t_hat) * slope
        if solver == "heun" and t_next > 0:
            slope_next = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * 0.5 * (slope + slope_next)
        x = x_next
        if record:
            states.append(x.to("cpu", call_dtype))
            denoised_steps.append(d_hat.to("cpu", call_dtype))
        if on_step is not None:
            on_step(i + 1 - start_step, stop_step - start_step)

    return SamplerOutput(
        samples=x.to(call_dtype) if stop_step == num_steps else x,
        sigmas=sigmas,
        trajectory_states=torch.stack(states) if record else None,
        trajectory_denoised=(torch.stack(denoised_steps) if denoised_steps else torch.empty((0, *noise.shape)))
        if record else None,
    )


def sample_indices(denoiser: Denoiser, indices: Sequence[int], image_shape: Sequence[int], seed: int = 0,
                   device: torch.device | str = "cpu", **sampler_kwargs) -> SamplerOutput:
    """One batch of :func:`edm_sampler` for the images numbered ``indices`` (any set, e.g. one DDP rank's share):
    image i starts from :func:`noise_for_indices` noise (seed + i) and draws its churn noise from the same per-image
    generator, so it equals image i of :func:`generate` with the same seed."""
    generators = _image_generators(indices, seed)
    noise = _noise_from(generators, image_shape).to(device)
    return edm_sampler(denoiser, noise, generator=generators, **sampler_kwargs)


def _image_generators(indices: Sequence[int], seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed) + int(i)) for i in indices]


def noise_for_indices(indices: Sequence[int], image_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Standard normal noise [len(indices), *image_shape] (CPU float32) where image i is drawn from a CPU
    ``torch.Generator`` seeded with ``seed + i``, so an image's noise does not depend on its batch."""
    return _noise_from(_image_generators(indices, seed), image_shape)


def _noise_from(generators: list[torch.Generator], image_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in image_shape)
    if not generators:
        return torch.empty((0, *shape))
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} img [{elapsed}<{remaining}]"


def generate(
    denoiser: Denoiser,
    num: int,
    image_shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool | str = True,
    record: bool = False,
    **sampler_kwargs,
) -> torch.Tensor | SamplerOutput:
    """``num`` samples [num, C, H, W] (CPU float32) from ``denoiser`` with :func:`edm_sampler`, in batches.

    Image i starts from :func:`noise_for_indices` noise (seed + i) and, with churn, draws its churn noise from the
    same per-image generator, so every sample is independent of ``batch_size`` and of the other images. Sampling
    runs on ``device`` (the denoiser must accept inputs there). Returns the samples tensor, or with
    ``record=True`` a :class:`SamplerOutput` whose trajectories are concatenated over batches (dim 1).
    ``progress``: a bar (labelled with the string, if one is given) that advances with every ODE step.
    """
    num, batch_size = check_count(num, "num"), check_count(batch_size, "batch_size")
    shape = tuple(image_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    if "generator" in sampler_kwargs:
        raise ValueError("generate seeds its own per-image generators; pass `seed` instead of `generator`")

    outputs = []
    label = progress if isinstance(progress, str) else "sampling"
    with tqdm(total=num, desc=label, disable=not progress, bar_format=PROGRESS_FORMAT) as bar:
        for start in range(0, num, batch_size):
            indices = range(start, min(start + batch_size, num))

            def advance(done: int, total: int, first: int = start, n: int = len(indices)) -> None:
                bar.update(first + n * done / total - bar.n)  # after the batch's last step: exactly first + n

            outputs.append(sample_indices(denoiser, indices, shape, seed, device, record=record, on_step=advance,
                                          **sampler_kwargs))

    samples = torch.cat([out.samples.to("cpu", torch.float32) for out in outputs])
    if not record:
        return samples
    return SamplerOutput(
        samples=samples,
        sigmas=outputs[0].sigmas,
        trajectory_states=torch.cat([out.trajectory_states for out in outputs], dim=1),
        trajectory_denoised=torch.cat([out.trajectory_denoised for out in outputs], dim=1),
    )
