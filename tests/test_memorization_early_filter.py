"""calmwild.memorization.early_filter: the calibrated threshold against its order-statistic definition, and the
rejection loop's accounting (evaluations, indices, samples) against a counting denoiser and plain generation."""

import math

import pytest
import torch

from calmwild.denoisers import EmpiricalDenoiser, GaussianDenoiser
from calmwild.memorization.early import SCORES, ScoredTrajectories, evaluations_through, score_trajectories
from calmwild.memorization.early_filter import (
    Calibration,
    calibrate,
    generate_rejecting,
    sample_rejecting_early,
)
from calmwild.sampling import generate
from calmwild.settings import EarlyRejectionSettings, SamplingSettings

SHAPE = (1, 4, 4)



def _scored(values: list[float], memorized: list[bool], steps: int = 3) -> ScoredTrajectories:
    column = torch.tensor(values, dtype=torch.float64)
    scores = {name: column[:, None].repeat(1, steps) for name in SCORES}
    return ScoredTrajectories(scores, torch.tensor(memorized), torch.zeros(len(values)),
                              torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64), torch.zeros(len(values), *SHAPE))


def test_the_threshold_is_the_conformal_order_statistic_of_the_stated_false_negative_rate():
    # memorized scores 0.1 .. 1.0 (ten of them), non-memorized 0.0 .. 0.45
    pos = [i / 10 for i in range(1, 11)]
    neg = [i / 20 for i in range(10)]
    scored = _scored(pos + neg, [True] * 10 + [False] * 10)
    rule = calibrate(scored, EarlyRejectionSettings(step=2, false_negative_rate=0.25), "heun")
    assert rule.step == 2 and rule.threshold == pytest.approx(0.2)  # s_(k), k = floor(0.25 * 11) = 2
    assert rule.summary["expected_false_negative_rate_bound"] == pytest.approx(2 / 11)
    assert rule.summary["false_negative_rate"] == pytest.approx(0.1)  # only 0.1 falls below
    assert rule.summary["false_positive_rate"] == pytest.approx(6 / 10)  # 0.20, 0.25, ..., 0.45 are >= 0.2
    assert rule.summary["evaluations_at_stop"] == 4 and rule.summary["total_evaluations"] == 5
    with pytest.raises(ValueError, match="need at least 19"):  # floor(0.05 * 11) = 0: no order statistic will do
        calibrate(scored, EarlyRejectionSettings(step=2, false_negative_rate=0.05), "heun")


def test_the_conformal_rule_misses_new_memorized_trajectories_at_most_at_the_stated_rate():
    """Scores uniform on [0, 1] for memorized trajectories: a new one falls below tau with probability tau, so the
    average of tau over R calibration sets is the miss rate, k / (m + 1) = 3 / 31 for m = 30 and f = 0.1 (sd of
    s_(k): sqrt(k (m + 1 - k) / ((m + 1)^2 (m + 2))); the mean of R lies within 4 sd / sqrt(R))."""
    gen, reps, m, k = torch.Generator().manual_seed(0), 2000, 30, 3
    taus = []
    for _ in range(reps):
        values = torch.rand(m, generator=gen, dtype=torch.float64).tolist()
        taus.append(calibrate(_scored(values + [0.5], [True] * m + [False]),
                              EarlyRejectionSettings(step=1, false_negative_rate=0.1), "heun").threshold)
    sd = math.sqrt(k * (m + 1 - k) / ((m + 1) ** 2 * (m + 2)))
    assert abs(sum(taus) / reps - k / (m + 1)) < 4 * sd / math.sqrt(reps)


def test_calibration_without_both_classes_rejects_nothing_or_refuses():
    rule = calibrate(_scored([0.1, 0.2, 0.3], [False] * 3), EarlyRejectionSettings(), "euler")
    assert rule.threshold == math.inf and "nothing is rejected" in rule.summary["note"]
    with pytest.raises(ValueError, match="reject every sample"):
        calibrate(_scored([0.1, 0.2], [True, True]), EarlyRejectionSettings(), "heun")
    with pytest.raises(ValueError, match="exceeds"):
        calibrate(_scored([0.1, 0.2], [True, False]), EarlyRejectionSettings(step=4), "heun")



@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_rejection_accounting_matches_a_counting_denoiser_and_plain_generation(train_4x4, count_rows, solver):
    sampling = SamplingSettings(steps=6, solver=solver, batch_size=5, seed=3)
    denoiser = count_rows(GaussianDenoiser.fit(train_4x4))
    probe = score_trajectories(denoiser.inner, train_4x4, SHAPE, range(40), sampling)
    step = 3
    threshold = float(probe.scores["estimate_distance"][:, step - 1].median())  # about half are rejected
    rule = Calibration("estimate_distance", step, threshold, {})
    out = generate_rejecting(denoiser, train_4x4, 8, SHAPE, sampling, rule, progress=False)
    total, head = evaluations_through(6, 6, solver), evaluations_through(step, 6, solver)
    assert len(out.accepted) == 8 and out.samples.shape == (8, *SHAPE)
    attempted = len(out.accepted) + len(out.rejected)
    assert sorted(out.accepted + out.rejected) == list(range(attempted))  # consecutive indices, none reused
    assert out.rejected, "the median threshold should reject some trajectories"
    assert out.evaluations == denoiser.rows == head * attempted + (total - head) * 8
    late = probe.scores["estimate_distance"][:, step - 1]
    assert all(late[i] >= threshold for i in out.rejected) and all(late[i] < threshold for i in out.accepted)
    plain = generate(denoiser.inner, attempted, SHAPE, seed=3, progress=False, num_steps=6, solver=solver)
    torch.testing.assert_close(out.samples, plain[out.accepted], rtol=1e-5, atol=1e-5)


def test_the_stream_stops_at_max_attempts(train_4x4):
    sampling = SamplingSettings(steps=4, batch_size=4)
    never = Calibration("estimate_ratio", 2, -math.inf, {})  # rejects everything
    out = generate_rejecting(EmpiricalDenoiser(train_4x4), train_4x4, 3, SHAPE, sampling, never, max_attempts=7,
                             progress=False)
    assert out.accepted == [] and out.rejected == list(range(7)) and out.samples.shape == (0, *SHAPE)
    assert out.evaluations == 7 * evaluations_through(2, 4, "heun")


def test_sample_rejecting_early_reports_the_rule_and_the_cost(train_4x4):
    sampling = SamplingSettings(steps=5, batch_size=8)
    settings = EarlyRejectionSettings(score="posterior_concentration", calibration_num=12, calibration_seed=5000)
    with pytest.raises(ValueError, match="all 12 calibration trajectories are memorized"):
        sample_rejecting_early(EmpiricalDenoiser(train_4x4), train_4x4, 4, SHAPE, sampling, settings, 1 / 3,
                               progress=False)
    filtered, report = sample_rejecting_early(GaussianDenoiser.fit(train_4x4), train_4x4, 4, SHAPE, sampling, settings,
                                              1 / 3, progress=False)
    # the Gaussian memorizes nothing: no rule can be calibrated, nothing is rejected, the cost is plain generation's
    assert report["calibration"]["num_memorized"] == 0 and "nothing is rejected" in report["calibration"]["note"]
    assert report["num_accepted"] == report["num_attempted"] == 4 and report["num_rejected"] == 0
    assert filtered.samples.shape == (4, *SHAPE) and "shortfall" not in report
    assert report["evaluations"]["filtered_generation"] == report["evaluations"]["plain_generation_of_num"] == 4 * 9
    assert report["evaluations"]["calibration"] == 12 * 9
    with pytest.raises(ValueError, match="overlap"):
        sample_rejecting_early(EmpiricalDenoiser(train_4x4), train_4x4, 4, SHAPE, sampling,
                               EarlyRejectionSettings(calibration_seed=10), 1 / 3, progress=False)
