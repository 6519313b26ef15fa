"""calmwild.memorization.early: the evaluation count against a counting denoiser, each score against a direct
float64 computation, and the detector on a mixture of empirical (memorizing) and Gaussian (generalizing)
trajectories, which it must separate."""

import math

import pytest
import torch

from calmwild.denoisers import EmpiricalDenoiser, GaussianDenoiser
from calmwild.memorization.early import (
    SCORES,
    ScoredTrajectories,
    check_seeds,
    detection_curves,
    evaluations_through,
    plot_detection_curves,
    score_trajectories,
    step_scores,
)
from calmwild.sampling import edm_sampler
from calmwild.settings import SamplingSettings

SHAPE = (1, 4, 4)




@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_evaluations_through_counts_the_sampler_calls(train_4x4, count_rows, solver):
    for stop in range(0, 7):
        counter = count_rows(EmpiricalDenoiser(train_4x4))
        edm_sampler(counter, torch.randn(3, *SHAPE), num_steps=6, solver=solver, stop_step=stop)
        assert counter.rows == 3 * evaluations_through(stop, 6, solver)
    assert evaluations_through(18, 18, "heun") == 35
    with pytest.raises(ValueError, match="step"):
        evaluations_through(7, 6, "heun")


def test_step_scores_match_a_direct_computation(train_4x4):
    g = torch.Generator().manual_seed(1)
    state, sigma = torch.randn(5, *SHAPE, generator=g) * 0.7, 0.7
    eps = torch.randn(5, *SHAPE, generator=g)
    denoised = EmpiricalDenoiser(train_4x4)(state, torch.full((5,), sigma))
    got = step_scores(state, denoised, sigma, train_4x4, eps)
    x, d, y = state.reshape(5, -1).double(), denoised.reshape(5, -1).double(), train_4x4.reshape(40, -1).double()
    e = eps.reshape(5, -1).double()
    dims = x.shape[1]
    deviation = [abs(math.log(float((x[i] - d[i]).norm()) / (sigma * math.sqrt(dims)))) for i in range(5)]
    suppression = [1 - float(torch.dot(x[i] - d[i], e[i])) / (sigma * float(torch.dot(e[i], e[i]))) for i in range(5)]
    dist = torch.cdist(d, y).sort(dim=1).values
    weights = torch.softmax(-torch.cdist(x, y).square() / (2 * sigma**2), dim=1)
    torch.testing.assert_close(got["schedule_deviation"], torch.tensor(deviation, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["noise_suppression"], torch.tensor(suppression, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["estimate_distance"], -dist[:, 0] / math.sqrt(dims), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["estimate_ratio"], -dist[:, 0] / dist[:, 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["posterior_concentration"], weights.max(dim=1).values, rtol=1e-4, atol=1e-6)
    assert set(got) == set(SCORES) and all(v.dtype == torch.float64 and v.shape == (5,) for v in got.values())


def test_noise_suppression_follows_the_exact_gaussian_flow(train_4x4):
    """Data N(0, s^2 I): the exact flow gives 1 - t t_0 / (sqrt(s^2 + t^2) sqrt(s^2 + t_0^2)) at every level t of
    the schedule, up to Heun's error (second order: 4.9e-3 at 40 steps, 1.2e-3 at 80, 2.8e-4 at 160)."""
    s = 0.5
    gaussian = GaussianDenoiser(torch.zeros(16, dtype=torch.float64), s**2 * torch.eye(16, dtype=torch.float64))
    scored = score_trajectories(gaussian, train_4x4, SHAPE, range(6), SamplingSettings(steps=80, batch_size=8))
    t, t0 = scored.sigmas, float(scored.sigmas[0])
    exact = 1 - t * t0 / ((s**2 + t**2).sqrt() * math.sqrt(s**2 + t0**2))
    torch.testing.assert_close(scored.scores["noise_suppression"], exact.expand(6, -1), rtol=0, atol=2e-3)


def _concat(a: ScoredTrajectories, b: ScoredTrajectories) -> ScoredTrajectories:
    return ScoredTrajectories({k: torch.cat([a.scores[k], b.scores[k]]) for k in a.scores},
                              torch.cat([a.memorized, b.memorized]), torch.cat([a.ratio, b.ratio]), a.sigmas,
                              torch.cat([a.samples, b.samples]))


@pytest.fixture(scope="module")
def mixture(train_4x4):
    """12 trajectories of the empirical denoiser (it reproduces training images) and 12 of the Gaussian fitted to
    the same images (it does not), 8 Heun steps; sampling seeds 0 and 500."""
    sampling = SamplingSettings(steps=8, batch_size=16)
    empirical = score_trajectories(EmpiricalDenoiser(train_4x4), train_4x4, SHAPE, range(12), sampling)
    gaussian = score_trajectories(GaussianDenoiser.fit(train_4x4), train_4x4, SHAPE, range(12),
                                  SamplingSettings(steps=8, batch_size=16, seed=500))
    return empirical, gaussian


def test_the_detector_separates_empirical_from_gaussian_trajectories(mixture):
    empirical, gaussian = mixture
    assert bool(empirical.memorized.all()) and not bool(gaussian.memorized.any())  # the premise of the test
    both = _concat(empirical, gaussian)
    assert both.scores["estimate_ratio"].shape == (24, 8) and both.sigmas.shape == (8,)
    report = detection_curves(both, "heun", zone=(0.05, 2.0), groups=torch.tensor([0] * 12 + [500] * 12))
    assert report["num_memorized"] == 12 and report["num_trajectories"] == 24
    assert report["total_evaluations"] == 15 and report["evaluations"] == [2, 4, 6, 8, 10, 12, 14, 15]
    for name in ("estimate_distance", "estimate_ratio"):  # the two scores of the denoised estimate separate them
        entry = report["scores"][name]
        assert max(entry["auroc"]) > 0.99, name
        assert all(lo <= a <= hi for lo, a, hi in zip(entry["low"], entry["auroc"], entry["high"]))
        point = entry["earliest"]
        assert point is not None and entry["auroc"][point["step"] - 1] >= 0.9
        assert all(a < 0.9 for a in entry["auroc"][: point["step"] - 1])  # it is the first such step
        assert point["fraction_saved"] == pytest.approx(1 - point["evaluations"] / 15)
        assert point["sigma"] == pytest.approx(float(both.sigmas[point["step"] - 1]))
        assert point["zone"] in ("before the zone", "inside the zone", "after the zone")
        reliable = entry["earliest_reliable"]
        assert reliable is None or reliable["step"] >= point["step"]
        assert set(entry["by_group"]) == {"0", "500"} and set(entry["by_group"].values()) == {"undefined"}
    assert report["best"] in ("estimate_distance", "estimate_ratio")
    assert report["scores"]["posterior_concentration"]["earliest"] is None  # here the weakest: it peaks at 0.88
    # the estimates' scores at the last step judge (nearly) the final sample; the posterior of any state at
    # sigma 0.002 is one-hot, so its max weight is 1 for every trajectory there and cannot separate them
    assert report["scores"]["estimate_ratio"]["auroc"][-1] > 0.99
    assert report["scores"]["posterior_concentration"]["auroc"][-1] == 0.5


def test_one_class_leaves_the_auroc_undefined(mixture):
    empirical, _ = mixture
    report = detection_curves(empirical, "heun")
    assert "scores" not in report and "12 of 12" in report["undefined"]
    assert report["memorized_rate"]["estimate"] == 1.0 and report["memorized_rate"]["low"] < 1.0


def test_the_plot_draws_one_line_per_score_and_the_zone(mixture):
    report = detection_curves(_concat(*mixture), "heun", zone=(0.1, 1.0))
    fig = plot_detection_curves(report, "mixture")
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert [label for label in labels if label in SCORES] == list(SCORES)
    assert any(patch.get_label() == "danger zone" for patch in ax.patches)


def test_seed_blocks_must_not_overlap_and_churn_is_refused(train_4x4):
    assert check_seeds([0, 100], 100) == [0, 100]
    with pytest.raises(ValueError, match="share noise"):
        check_seeds([0, 50], 100)
    with pytest.raises(ValueError, match="s_churn"):
        score_trajectories(EmpiricalDenoiser(train_4x4), train_4x4, SHAPE, range(2), SamplingSettings(s_churn=1.0))
