"""Rejecting memorized samples early: stop a trajectory at step n once its early score (:mod:`calmwild.memorization.
early`) passes a threshold calibrated on held-out trajectories, and regenerate from a new seed.

Calibration: C trajectories from seeds disjoint from the sampling seeds are run to the end and labelled by the ratio
test. With m of them memorized and s_(1) <= ... <= s_(m) their scores at step n, a trajectory is rejected when its
score is >= tau = s_(k), k = floor(f (m + 1)) for the stated false-negative rate f (a split-conformal rule): for a
new memorized trajectory exchangeable with the calibration ones, P(score < tau) <= k / (m + 1) <= f, on average over
calibration sets (a guarantee in expectation, not for every calibration set; ties at tau are rejected). It needs
k >= 1, i.e. m >= 1/f - 1 memorized calibration trajectories (19 for f = 0.05). The calibration set's in-sample
false-negative and false-positive rates are reported beside it; the accepted samples' own ratio test is the
out-of-sample check.
Without memorized calibration trajectories nothing is rejected (and the report says so); when all of them are
memorized the filter refuses to run, since it would reject every sample.

Cost: a rejected trajectory spends :func:`~calmwild.memorization.early.evaluations_through` (n) evaluations, an
accepted one the whole run; image i of the filtered stream starts from noise seed + i like
:func:`calmwild.sampling.generate`, and rejected images are replaced by the next unused indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from calmwild.checks import check_count
from calmwild.denoisers import Denoiser
from calmwild.memorization.early import (
    ScoredTrajectories,
    check_deterministic,
    detection_curves,
    evaluations_through,
    step_scores,
)
from calmwild.sampling import edm_sampler, noise_for_indices
from calmwild.settings import EarlyRejectionSettings, SamplingSettings
from calmwild.stats import auroc_interval


class Calibration(NamedTuple):
    """The rejection rule: reject at ``step`` when ``score`` >= ``threshold`` (inf: never), and its in-sample figures
    on the calibration trajectories (``summary``)."""

    score: str
    step: int
    threshold: float
    summary: dict[str, Any]


def calibrate(scored: ScoredTrajectories, settings: EarlyRejectionSettings, solver: str) -> Calibration:
    """The threshold of the module docstring for ``settings.score`` at ``settings.step`` (or the default step)."""
    num_steps = int(scored.sigmas.numel())
    memorized = scored.memorized.bool()
    num, num_memorized = int(memorized.numel()), int(memorized.sum())
    summary: dict[str, Any] = {"num_trajectories": num, "num_memorized": num_memorized}
    step = settings.step
    if step is not None and step > num_steps:
        raise ValueError(f"early_rejection.step={step} exceeds the sampler's {num_steps} steps")
    if num_memorized == num:
        raise ValueError(f"all {num} calibration trajectories are memorized: the filter would reject every sample "
                         "(this model memorizes; sample another checkpoint)")
    if num_memorized == 0:
        step = step or 1
        summary["note"] = f"none of the {num} calibration trajectories is memorized: nothing is rejected"
        return Calibration(settings.score, step, math.inf, {**summary, "step": step, "threshold": math.inf})
    if step is None:
        curve = detection_curves(scored, solver, settings.level)["scores"][settings.score]
        reached = curve["earliest"]
        step = reached["step"] if reached else 1 + max(range(num_steps), key=lambda k: curve["auroc"][k])
        summary["step_choice"] = (f"earliest step with AUROC >= {settings.level}" if reached else
                                  f"AUROC never reaches {settings.level}: the step of the largest AUROC")
    values = scored.scores[settings.score][:, step - 1]
    positives = torch.sort(values[memorized]).values
    rank = math.floor(settings.false_negative_rate * (num_memorized + 1))
    if rank < 1:
        need = math.ceil(1 / settings.false_negative_rate - 1)
        raise ValueError(f"{num_memorized} memorized calibration trajectories cannot certify a false-negative rate of "
                         f"{settings.false_negative_rate}: need at least {need}; raise early_rejection.calibration_num")
    threshold = float(positives[rank - 1])
    rejected = values >= threshold
    negatives = ~memorized
    summary.update({
        "step": step, "sigma": float(scored.sigmas[step - 1]), "threshold": threshold,
        "auroc": auroc_interval(values, memorized).as_dict(),
        "expected_false_negative_rate_bound": rank / (num_memorized + 1),
        "false_negative_rate": float((~rejected[memorized]).double().mean()),
        "false_positive_rate": float(rejected[negatives].double().mean()),
        "precision": float(memorized[rejected].double().mean()) if bool(rejected.any()) else None,
        "evaluations_at_stop": evaluations_through(step, num_steps, solver),
        "total_evaluations": evaluations_through(num_steps, num_steps, solver),
    })
    return Calibration(settings.score, step, threshold, summary)


class FilteredSamples(NamedTuple):
    """Result of :func:`generate_rejecting`: the accepted samples (CPU float32) and their image indices, the
    rejected indices, and the denoiser evaluations spent."""

    samples: torch.Tensor
    accepted: list[int]
    rejected: list[int]
    evaluations: int


def generate_rejecting(denoiser: Denoiser, train: torch.Tensor, num: int, image_shape: Sequence[int],
                       sampling: SamplingSettings, calibration: Calibration, max_attempts: int | None = None,
                       device: torch.device | str = "cpu", progress: bool = True) -> FilteredSamples:
    """Up to ``num`` samples, each trajectory stopped after step ``calibration.step`` when its score passes the
    threshold and replaced by the next image index, until ``num`` are accepted or ``max_attempts`` (default
    10 ``num``) trajectories have started."""
    check_deterministic(sampling)
    num = check_count(num, "num")
    max_attempts = check_count(max_attempts if max_attempts is not None else 10 * num, "max_attempts")
    steps, step = sampling.steps, calibration.step
    total, head_cost = evaluations_through(steps, steps, sampling.solver), evaluations_through(step, steps,
                                                                                               sampling.solver)
    kept: list[torch.Tensor] = []
    accepted: list[int] = []
    rejected: list[int] = []
    evaluations, next_index = 0, 0
    with tqdm(total=num, unit="img", desc="sampling (rejecting early)", disable=not progress) as bar:
        while len(accepted) < num and next_index < max_attempts:
            indices = list(range(next_index, next_index + min(sampling.batch_size, num - len(accepted),
                                                              max_attempts - next_index)))
            next_index += len(indices)
            noise = noise_for_indices(indices, image_shape, sampling.seed).to(device)
            run = {"num_steps": steps, "solver": sampling.solver}
            head = edm_sampler(denoiser, noise, record=True, stop_step=step, **run)
            eps = head.trajectory_states[0] / float(head.sigmas[0])
            value = step_scores(head.trajectory_states[step - 1], head.trajectory_denoised[step - 1],
                                float(head.sigmas[step - 1]), train, eps, device)[calibration.score]
            keep = value < calibration.threshold
            evaluations += head_cost * len(indices)
            rejected += [i for i, k in zip(indices, keep.tolist()) if not k]
            if bool(keep.any()):
                rows = keep.to(noise.device)
                tail = edm_sampler(denoiser, noise[rows], start_step=step, start_state=head.samples[rows], **run)
                kept.append(tail.samples.to("cpu", torch.float32))
                accepted += [i for i, k in zip(indices, keep.tolist()) if k]
                evaluations += (total - head_cost) * int(keep.sum())
            bar.update(int(keep.sum()))
    samples = torch.cat(kept) if kept else torch.empty((0, *image_shape))
    return FilteredSamples(samples, accepted, rejected, evaluations)


def sample_rejecting_early(denoiser: Denoiser, train: torch.Tensor, num: int, image_shape: Sequence[int],
                           sampling: SamplingSettings, settings: EarlyRejectionSettings,
                           threshold: float, device: torch.device | str = "cpu",
                           progress: bool = True) -> tuple[FilteredSamples, dict[str, Any]]:
    """Calibrates on ``settings.calibration_num`` trajectories (:func:`calibrate`), then draws ``num`` samples with
    :func:`generate_rejecting`; returns them and the report: the rule and its calibration figures, how many were
    rejected, and the evaluations spent against plain generation of ``num`` samples and against generating as many
    samples as the filter started. ``threshold`` is the ratio test's, which labels the calibration trajectories."""
    from calmwild.memorization.early import score_trajectories

    max_attempts = settings.max_attempts or 10 * num
    sampled = (sampling.seed, sampling.seed + max_attempts)
    calibrated = (settings.calibration_seed, settings.calibration_seed + settings.calibration_num)
    if sampled[0] < calibrated[1] and calibrated[0] < sampled[1]:
        raise ValueError(f"calibration noise seeds [{calibrated[0]}, {calibrated[1]}) overlap the sampling seeds "
                         f"[{sampled[0]}, {sampled[1]}): set early_rejection.calibration_seed away from them")
    calibration_sampling = SamplingSettings(**{**sampling.to_dict(), "seed": settings.calibration_seed})
    scored = score_trajectories(denoiser, train, image_shape, range(settings.calibration_num), calibration_sampling,
                                threshold, device, progress)
    rule = calibrate(scored, settings, sampling.solver)
    filtered = generate_rejecting(denoiser, train, num, image_shape, sampling, rule, max_attempts, device, progress)
    total = evaluations_through(sampling.steps, sampling.steps, sampling.solver)
    attempted = len(filtered.accepted) + len(filtered.rejected)
    report = {
        "settings": settings.to_dict(),
        "rule": {"score": rule.score, "step": rule.step, "threshold": rule.threshold},
        "calibration": rule.summary,
        "num_requested": num, "num_accepted": len(filtered.accepted), "num_attempted": attempted,
        "num_rejected": len(filtered.rejected), "rejected_indices": filtered.rejected,
        "evaluations": {
            "filtered_generation": filtered.evaluations,
            "calibration": settings.calibration_num * total,
            "plain_generation_of_num": num * total,
            "plain_generation_of_attempted": attempted * total,
            "saved_against_attempted": 1.0 - filtered.evaluations / (attempted * total),
        },
    }
    if len(filtered.accepted) < num:
        report["shortfall"] = (f"only {len(filtered.accepted)} of {num} samples accepted within max_attempts="
                               f"{max_attempts} trajectories")
    return filtered, report
