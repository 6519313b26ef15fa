"""scripts/study/criteria.py: every criterion on synthetic inputs where it must pass, where it must fail, and where
the data cannot tell."""

import pytest

from calmwild import stats
from study import criteria as c
from study.criteria import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


def test_every_claim_has_a_criterion_and_verdicts_refuse_unknown_claims():
    assert set(c.CRITERIA) == {"gap_mitigates", "gap_beats_placebo", "gap_quality", "zone_concentration",
                               "swap_steps", "swap_zone", "risk", "remark_4_3"}
    with pytest.raises(ValueError, match="status"):
        c.Verdict("risk", "partly", "")
    with pytest.raises(ValueError, match="unknown claim"):
        c.Verdict("nothing", REPRODUCED, "")


def test_regime_choice_prefers_the_rate_nearest_the_middle_of_the_band_and_brackets_otherwise():
    assert c.choose_regime({16: 0.97, 32: 0.82, 64: 0.55, 128: 0.0})["n_star"] == 64  # |0.55-0.65| < |0.82-0.65|
    assert c.choose_regime({16: 0.97, 32: 0.82, 64: 0.45, 128: 0.0})["n_star"] == 32
    assert c.choose_regime({16: 0.95, 32: 0.7, 45: 0.6})["n_star"] == 45  # equal distance: the larger N
    out = c.choose_regime({16: 0.97, 32: 0.95, 64: 0.1, 128: 0.0})
    assert out["n_star"] is None and out["bracket"] == (32, 64)
    assert c.choose_regime({16: 0.1, 32: 0.0})["bracket"] is None


def test_gap_mitigates():
    assert c.gap_mitigates([0.80, 0.78, 0.82], [0.10, 0.12, 0.08]).status == REPRODUCED
    assert c.gap_mitigates([0.80, 0.78, 0.82], [0.78, 0.80, 0.79]).status == NOT_REPRODUCED  # no cut at all
    assert c.gap_mitigates([0.80, 0.78, 0.82], [0.60, 0.62, 0.58]).status == NOT_REPRODUCED  # a cut, far below half
    assert c.gap_mitigates([0.9, 0.5, 0.7], [0.1, 0.6, 0.2]).status == INCONCLUSIVE  # seeds disagree
    assert c.gap_mitigates([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]).status == NOT_REPRODUCED  # nothing to mitigate


def test_gap_beats_placebo():
    gap = [0.10, 0.12, 0.08]
    assert c.gap_beats_placebo(gap, {"below": [0.7, 0.72, 0.68], "above": [0.6, 0.65, 0.62]}).status == REPRODUCED
    verdict = c.gap_beats_placebo(gap, {"below": [0.7, 0.72, 0.68], "above": [0.11, 0.09, 0.10]},
                                  capped={"above": True})
    assert verdict.status == NOT_REPRODUCED and "capped" in verdict.evidence
    assert c.gap_beats_placebo(gap, {"below": [0.7, 0.1, 0.4]}).status == INCONCLUSIVE


def test_gap_quality_uses_the_seed_spread_as_the_tolerance():
    assert c.gap_quality([10.0, 11.0, 12.0], [11.0, 11.5, 12.0]).status == REPRODUCED  # 0.5 worse, spread 0.79
    assert c.gap_quality([10.0, 10.1, 9.9], [14.0, 14.1, 13.9]).status == NOT_REPRODUCED
    assert c.gap_quality([10.0, 11.0, 12.0], [11.0, 16.0, 15.0]).status == INCONCLUSIVE  # 3 worse, spread 2


SIGMAS = [0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0]
ZONE = (0.4, 1.5)


def test_zone_concentration():
    peaked = [[0, 0, 0.05, 0.6, 0.5, 0.1, 0, 0], [0, 0, 0.1, 0.5, 0.6, 0.05, 0, 0], [0, 0, 0.0, 0.55, 0.45, 0.1, 0, 0]]
    verdict = c.zone_concentration(SIGMAS, peaked, ZONE)
    assert verdict.status == REPRODUCED and verdict.numbers["peak_inside"]
    small_sigma = [[0.9, 0.6, 0.3, 0.1, 0, 0, 0, 0], [0.8, 0.7, 0.2, 0.1, 0, 0, 0, 0], [0.9, 0.5, 0.3, 0.0, 0, 0, 0, 0]]
    assert c.zone_concentration(SIGMAS, small_sigma, ZONE).status == NOT_REPRODUCED
    assert c.zone_concentration(SIGMAS, [[0.0] * 8] * 3, ZONE).status == NOT_REPRODUCED  # nothing memorized
    mixed = [[0, 0, 0.1, 0.6, 0.5, 0.1, 0, 0], [0.3, 0.2, 0.25, 0.1, 0.05, 0, 0, 0], [0, 0, 0.1, 0.3, 0.2, 0.1, 0, 0]]
    assert c.zone_concentration(SIGMAS, mixed, ZONE).status == INCONCLUSIVE
    assert c.zone_concentration(SIGMAS, peaked, (0.02, 0.03)).status == INCONCLUSIVE  # no level inside the zone


def _swap(rates: dict, n: int = 200, rises: bool = False) -> dict:
    """Per-noise indicators: sample i is memorized under a band when i < rate * n (nested, so paired)."""
    return {"rises": rises, "memorized": {band: [i < round(r * n) for i in range(n)] for band, r in rates.items()}}


def test_swap_verdict_needs_the_focus_band_to_win_in_both_directions():
    good = {"down": _swap({"none": 0.9, "large": 0.88, "medium": 0.1, "small": 0.85}),
            "up": _swap({"none": 0.0, "large": 0.02, "medium": 0.8, "small": 0.05}, rises=True)}
    assert c.swap_verdict("swap_steps", "medium", good).status == REPRODUCED
    small_wins = {"down": _swap({"none": 0.9, "large": 0.88, "medium": 0.6, "small": 0.1}),
                  "up": _swap({"none": 0.0, "large": 0.02, "medium": 0.8, "small": 0.05}, rises=True)}
    assert c.swap_verdict("swap_steps", "medium", small_wins).status == NOT_REPRODUCED
    nothing_moves = {"down": _swap({"none": 0.9, "below": 0.9, "zone": 0.9, "above": 0.9}),
                     "up": _swap({"none": 0.0, "below": 0.0, "zone": 0.0, "above": 0.0}, rises=True)}
    assert c.swap_verdict("swap_zone", "zone", nothing_moves).status == NOT_REPRODUCED
    close = {"down": _swap({"none": 0.9, "below": 0.8, "zone": 0.75, "above": 0.85}, n=40),
             "up": _swap({"none": 0.0, "below": 0.1, "zone": 0.15, "above": 0.05}, n=40, rises=True)}
    assert c.swap_verdict("swap_zone", "zone", close).status == INCONCLUSIVE
    with pytest.raises(ValueError, match="same noises"):
        c.swap_changes([True, False], [True], rises=True)


def test_risk_and_remark_verdicts():
    assert c.risk_verdict(stats.Interval(0.8, 0.65, 0.95, 40), 12, 40, "s").status == REPRODUCED
    assert c.risk_verdict(stats.Interval(0.45, 0.3, 0.58, 40), 12, 40, "s").status == NOT_REPRODUCED
    assert c.risk_verdict(stats.Interval(0.6, 0.4, 0.8, 40), 12, 40, "s").status == INCONCLUSIVE
    assert c.risk_verdict(None, 0, 40, "s").status == INCONCLUSIVE
    remark = {"levels": {"high_weight": 0.95, "low_weight": 0.05}, "num_points": 20,
              "curve_sigma": {"high_weight": 0.8, "low_weight": 17.0},
              "threshold_sigma": {"high_weight": 0.5, "low_weight": 30.0}}
    assert c.remark_verdict({**remark, "ratio": {"high_weight": 0.625, "low_weight": 1.76}}).status == REPRODUCED
    assert c.remark_verdict({**remark, "ratio": {"high_weight": 0.625, "low_weight": 2.8}}).status == NOT_REPRODUCED
    assert c.remark_verdict({**remark, "ratio": {"high_weight": None, "low_weight": 1.0}}).status == INCONCLUSIVE
