"""Early detection of memorization along the sampling trajectory: scores computed from the first steps of the
probability-flow ODE (paper eq. 4) that predict whether the *final* sample will be memorized (d1/d2 < 1/3, Section 3).

Seed 004 reports that memorized generations come from an over-estimation of one training image early in denoising:
the initial randomness is suppressed quickly, the trajectory collapses toward its training image, and the deviation
of the intermediate states from the theoretical denoising schedule tracks memorization. The paper places where
memorization forms: the medium noise levels of the danger zone (Section 4, Def. 4.6). This module measures, step by
step, how well each candidate score separates the trajectories that end memorized from those that do not.

Steps: EDM's N-step schedule t_0 > ... > t_{N-1} > t_N = 0 (:mod:`calmwild.sampling`); step n = 1..N integrates
from t_{n-1} to t_n and starts with the evaluation D(x_{n-1}; t_{n-1}). The score "at step n" uses only x_{n-1}
and that estimate, so it is known once steps 1..n-1 and the first evaluation of step n have run. Stopping a
trajectory there -- with the filter of :mod:`calmwild.memorization.early_filter`, after step n is completed -- costs
:func:`evaluations_through` (n) of the run's :func:`evaluations_through` (N) evaluations.

Scores (higher = more memorization-like; d the number of pixels), each computed per trajectory at step n with
x = x_{n-1}, t = t_{n-1}, D = D(x; t):

- ``schedule_deviation`` = |log r|, r = ||x - D|| / (t sqrt(d)): the effective noise level of the state against its
  scheduled one. On the theoretical schedule x = y + t eps with eps ~ N(0, I), so x - D has norm about t sqrt(d)
  and r is about 1 (seed 004's deviation from the denoising schedule).
- ``noise_suppression`` = 1 - <x - D, eps> / (t ||eps||^2), eps = x_0 / t_0 the trajectory's starting noise: how
  much of its initial randomness the state no longer carries (seed 004: memorization suppresses the initial
  randomness early and replaces it with the memorized image). For centred Gaussian data N(0, s^2 I) the exact flow
  gives <x - D, eps> / (t ||eps||^2) = t t_0 / (sqrt(s^2 + t^2) sqrt(s^2 + t_0^2)), the same for every trajectory.
- ``estimate_distance`` = -d1(D) / sqrt(d): the (negated) root-mean-square pixel distance of the denoised estimate
  to its nearest training image: the trajectory's contraction toward one training image.
- ``estimate_ratio`` = -d1(D) / d2(D): the ratio test (Section 3) applied to the estimate instead of the final
  sample.
- ``posterior_concentration`` = max_i w_i(x, t), the largest weight of the empirical posterior (eqs. 2-3) at the
  actual state: Def. 4.1's quantity along the path taken instead of at noised training images.

Each score's AUROC for the final label is reported at every step with DeLong's interval
(:func:`calmwild.stats.auroc_interval`), with the earliest step where it reaches the level (0.9 by default) and the
earliest where its interval's lower end does. The directions above are fixed before any curve is seen: an AUROC
well below 0.5 means the opposite direction predicts, and is reported as it is, not flipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from calmwild.checks import check_count, check_open_unit, check_threshold
from calmwild.denoisers import Denoiser
from calmwild.memorization.ratio import RATIO_THRESHOLD, ratio_test
from calmwild.posterior import posterior_summary
from calmwild.sampling import edm_sampler, noise_for_indices
from calmwild.settings import RELIABLE_AUROC, SCORES, SamplingSettings
from calmwild.stats import auroc_interval, wilson_interval



def evaluations_through(step: int, num_steps: int, solver: str) -> int:
    """Denoiser evaluations once steps 1..``step`` (1-based) of an N-step run are complete: Euler spends one per
    step; Heun two, except on the last step (to t = 0), which is an Euler step -- so a whole Heun run costs 2N - 1."""
    if not 0 <= step <= num_steps:
        raise ValueError(f"step must lie in [0, {num_steps}], got {step}")
    if solver == "euler":
        return step
    return 2 * step - (1 if step == num_steps else 0)


def check_deterministic(sampling: SamplingSettings) -> None:
    if sampling.s_churn != 0:
        raise ValueError(f"early detection follows the deterministic ODE: sampling.s_churn must be 0, got "
                         f"{sampling.s_churn}")


def step_scores(state: torch.Tensor, denoised: torch.Tensor, sigma: float, train: torch.Tensor,
                initial_noise: torch.Tensor, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The scores of the module docstring (:data:`SCORES`) for a batch of states x [B, ...] at level ``sigma`` with
    their denoised estimates D(x; sigma) and the trajectories' starting noise eps = x_0 / t_0, against the training
    images; each [B] float64 on CPU."""
    train = train.to(device) if device is not None else train
    x = state.reshape(state.shape[0], -1).double().cpu()
    d_hat = denoised.reshape(denoised.shape[0], -1).double().cpu()
    eps = initial_noise.reshape(initial_noise.shape[0], -1).double().cpu()
    dims = x.shape[1]
    residual = (x - d_hat).norm(dim=1) / (sigma * math.sqrt(dims))
    retained = ((x - d_hat) * eps).sum(dim=1) / (sigma * eps.square().sum(dim=1))
    tests = ratio_test(denoised.float(), train.float(), device=device)
    weight = posterior_summary(state.float(), train.float(), float(sigma), want_mean=False).max_weight
    return {
        "schedule_deviation": residual.clamp_min(1e-300).log().abs(),
        "noise_suppression": 1.0 - retained,
        "estimate_distance": -tests.d1.double().cpu() / math.sqrt(dims),
        "estimate_ratio": -tests.ratio.double().cpu(),
        "posterior_concentration": weight.double().cpu(),
    }


class ScoredTrajectories(NamedTuple):
    """Trajectories reduced to what early detection needs.

    scores: score name -> [B, N] float64, column n - 1 the score at step n;  memorized: [B] bool, the final sample's
    ratio test;  ratio: [B] its d1/d2;  sigmas: [N] float64, t_0 .. t_{N-1} (the level each step starts from);
    samples: [B, C, H, W] the final samples (CPU float32)."""

    scores: dict[str, torch.Tensor]
    memorized: torch.Tensor
    ratio: torch.Tensor
    sigmas: torch.Tensor
    samples: torch.Tensor


def score_trajectories(denoiser: Denoiser, train: torch.Tensor, image_shape: Sequence[int], indices: Sequence[int],
                       sampling: SamplingSettings, threshold: float = RATIO_THRESHOLD,
                       device: torch.device | str = "cpu", progress: bool = False) -> ScoredTrajectories:
    """Runs the EDM ODE for the images numbered ``indices`` (image i from noise seed ``sampling.seed`` + i, as
    :func:`calmwild.sampling.generate`), recording every step, and scores each step (:func:`step_scores`); labels
    each trajectory by the ratio test of its final sample."""
    check_deterministic(sampling)
    check_threshold(threshold)
    indices = list(indices)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in SCORES}
    samples, sigmas = [], None
    with tqdm(total=len(indices), unit="traj", desc="scoring trajectories", disable=not progress) as bar:
        for start in range(0, len(indices), sampling.batch_size):
            batch = indices[start:start + sampling.batch_size]
            noise = noise_for_indices(batch, image_shape, sampling.seed).to(device)
            out = edm_sampler(denoiser, noise, num_steps=sampling.steps, solver=sampling.solver, record=True)
            sigmas = out.sigmas[:-1]
            eps = out.trajectory_states[0] / float(sigmas[0])
            per_step = [step_scores(out.trajectory_states[k], out.trajectory_denoised[k], float(sigmas[k]), train,
                                    eps, device) for k in range(sampling.steps)]
            for name in SCORES:
                scores[name].append(torch.stack([s[name] for s in per_step], dim=1))
            samples.append(out.samples.to("cpu", torch.float32))
            bar.update(len(batch))
    if not indices:
        raise ValueError("no trajectories to score")
    final = torch.cat(samples)
    tests = ratio_test(final, train, threshold, device=device)
    return ScoredTrajectories({name: torch.cat(parts) for name, parts in scores.items()}, tests.memorized.cpu(),
                              tests.ratio.cpu(), sigmas, final)


def _stop_point(step: int, sigmas: Sequence[float], num_steps: int, solver: str) -> dict[str, Any]:
    total = evaluations_through(num_steps, num_steps, solver)
    spent = evaluations_through(step, num_steps, solver)
    return {"step": step, "sigma": float(sigmas[step - 1]), "evaluations": spent,
            "fraction_saved": 1.0 - spent / total}


def _zone_position(sigma: float, band: tuple[float, float] | None) -> str | None:
    if band is None:
        return None
    low, high = band
    return "before the zone" if sigma > high else "after the zone" if sigma < low else "inside the zone"


def detection_curves(scored: ScoredTrajectories, solver: str, level: float = RELIABLE_AUROC,
                     zone: tuple[float, float] | None = None, groups: torch.Tensor | None = None,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Per score, the AUROC of its value at each step for the final label, with DeLong's interval; the earliest step
    where the AUROC reaches ``level`` (``earliest``) and where its interval's lower end does (``earliest_reliable``),
    each with its sigma, the evaluations spent by then and the fraction of the run that stopping there saves; where
    that sigma lies relative to the danger zone ``zone`` = (low, high); and with ``groups`` (a seed per trajectory)
    the earliest steps within each group. ``best`` names the score that is reliable first (ties: higher AUROC).
    Without both memorized and non-memorized trajectories the AUROC is undefined and only the counts are given."""
    level = check_open_unit(level, "level")
    memorized = scored.memorized.bool()
    num, num_memorized = int(memorized.numel()), int(memorized.sum())
    num_steps = int(scored.sigmas.numel())
    sigmas = [float(s) for s in scored.sigmas]
    rate = wilson_interval(num_memorized, num, confidence)
    report: dict[str, Any] = {
        "num_trajectories": num, "num_memorized": num_memorized, "memorized_rate": rate.as_dict(),
        "level": level, "confidence": confidence, "solver": solver, "num_steps": num_steps,
        "total_evaluations": evaluations_through(num_steps, num_steps, solver),
        "steps": list(range(1, num_steps + 1)), "sigmas": sigmas,
        "evaluations": [evaluations_through(n, num_steps, solver) for n in range(1, num_steps + 1)],
        "danger_zone": None if zone is None else list(zone),
    }
    if num_memorized in (0, num):
        report["undefined"] = (f"{num_memorized} of {num} trajectories are memorized: the AUROC needs both classes "
                               "(use a model between the regimes)")
        return report
    curves: dict[str, Any] = {}
    for name in SCORES:
        intervals = [auroc_interval(scored.scores[name][:, k], memorized, confidence) for k in range(num_steps)]
        entry: dict[str, Any] = {"auroc": [iv.estimate for iv in intervals], "low": [iv.low for iv in intervals],
                                 "high": [iv.high for iv in intervals]}
        for key, values in (("earliest", entry["auroc"]), ("earliest_reliable", entry["low"])):
            step = next((k + 1 for k, v in enumerate(values) if v >= level), None)
            point = None if step is None else _stop_point(step, sigmas, num_steps, solver)
            if point is not None:
                point["auroc"] = entry["auroc"][step - 1]
                point["zone"] = _zone_position(point["sigma"], zone)
            entry[key] = point
        if groups is not None:
            entry["by_group"] = _earliest_by_group(scored.scores[name], memorized, groups, level)
        curves[name] = entry
    report["scores"] = curves
    report["best"] = min(SCORES, key=lambda name: _rank_key(curves[name]))
    return report


def _rank_key(entry: dict[str, Any]) -> tuple[float, float]:
    reliable = entry["earliest_reliable"]
    return (math.inf, -max(entry["auroc"])) if reliable is None else (reliable["step"], -reliable["auroc"])


def _earliest_by_group(scores: torch.Tensor, memorized: torch.Tensor, groups: torch.Tensor,
                       level: float) -> dict[str, Any]:
    """Within each group (one sampling seed), the earliest step whose AUROC reaches ``level`` (None if never;
    "undefined" when the group has one class only)."""
    out: dict[str, Any] = {}
    for group in torch.unique(groups).tolist():
        rows = groups == group
        labels = memorized[rows]
        if int(labels.sum()) in (0, int(labels.numel())):
            out[str(group)] = "undefined"
            continue
        areas = [auroc_interval(scores[rows, k], labels).estimate for k in range(scores.shape[1])]
        out[str(group)] = next((k + 1 for k, v in enumerate(areas) if v >= level), None)
    return out


def plot_detection_curves(report: dict[str, Any], title: str):
    """AUROC against sigma (log axis, decreasing as sampling runs), one line per score with its DeLong band, the
    level as a dashed line and the danger zone shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    sigmas = np.asarray(report["sigmas"])
    for i, name in enumerate(SCORES):
        entry = report.get("scores", {}).get(name)
        if entry is None:
            continue
        ax.plot(sigmas, entry["auroc"], marker="o", ms=3, color=f"C{i}", label=name)
        ax.fill_between(sigmas, entry["low"], entry["high"], color=f"C{i}", alpha=0.15)
    ax.axhline(report["level"], ls="--", color="k", lw=1, label=f"level {report['level']}")
    ax.axhline(0.5, ls=":", color="gray", lw=1)
    if report.get("danger_zone"):
        low, high = report["danger_zone"]
        ax.axvspan(max(low, sigmas.min()), min(high, sigmas.max()), color="red", alpha=0.08, label="danger zone")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("sigma at the start of the step (sampling runs left to right)")
    ax.set_ylabel("AUROC for the final sample being memorized")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    rate = report["memorized_rate"]
    ax.set_title(f"{title}: {report['num_memorized']} of {report['num_trajectories']} memorized "
                 f"({100 * rate['estimate']:.0f}% [{100 * rate['low']:.0f}, {100 * rate['high']:.0f}])", fontsize=9)
    return fig


def check_seeds(seeds: Sequence[int], num: int) -> list[int]:
    """Sampling seeds whose image blocks [seed, seed + num) do not overlap (image i of a block uses noise seed + i)."""
    num = check_count(num, "num")
    seeds = [check_count(s, "seed", 0) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    ordered = sorted(seeds)
    for a, b in zip(ordered, ordered[1:]):
        if b - a < num:
            raise ValueError(f"seeds {a} and {b} are closer than num={num}: their trajectories would share noise")
    return seeds
