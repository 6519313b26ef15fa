"""calmwild.placebo: placebo bands carry the gap's mass, checked against scipy's log-normal (an independent CDF) and
against counting DDPM timesteps; a side with too little mass takes all it has and says so."""

import math

import pytest
from scipy import stats

from calmwild.placebo import placebo_bands
from calmwild.schedule import ddpm_sigmas
from calmwild.sigma import DDPMUniform, LogNormal


def _lognormal_mass(low: float, high: float, p_mean: float = -1.2, p_std: float = 1.2) -> float:
    dist = stats.lognorm(s=p_std, scale=math.exp(p_mean))
    return float(dist.cdf(high) - dist.cdf(low))


def test_log_normal_placebos_are_adjacent_and_carry_the_gaps_mass():
    band = (0.2, 0.35)  # near the median of EDM's p(sigma): both sides hold more than the band's mass
    target = _lognormal_mass(*band)
    bands = placebo_bands(LogNormal(), band)
    assert set(bands) == {"below", "above"}
    below, above = bands["below"], bands["above"]
    assert below.band[1] == pytest.approx(band[0]) and above.band[0] == pytest.approx(band[1])
    for placebo in (below, above):
        assert not placebo.capped and placebo.target == pytest.approx(target, rel=1e-9)
        assert _lognormal_mass(*placebo.band) == pytest.approx(target, rel=1e-6)
        assert placebo.mass == pytest.approx(target, rel=1e-6)


def test_a_side_with_less_mass_than_the_gap_takes_all_it_has():
    band = (0.53, 1.91)  # a digits danger zone: 25.7% of the mass, 6.2% above it
    bands = placebo_bands(LogNormal(), band)
    above = bands["above"]
    assert above.capped and above.band[0] == pytest.approx(1.91)
    assert above.mass == pytest.approx(1 - stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf(1.91), rel=1e-6)
    assert not bands["below"].capped
    assert above.to_dict()["capped"] is True and above.to_dict()["sigma"] == list(above.band)


def test_ddpm_placebos_count_timesteps():
    sigmas = ddpm_sigmas(1000)
    band = (float(sigmas[99]), float(sigmas[349]))  # DDPM timesteps 100..350: 251 atoms
    bands = placebo_bands(DDPMUniform(), band)
    below, above = bands["below"], bands["above"]
    inside = lambda b: int(((sigmas >= b[0]) & (sigmas <= b[1])).sum())  # noqa: E731
    assert inside(band) == 251
    assert below.capped and inside(below.band) == 99 and below.band == (float(sigmas[0]), float(sigmas[98]))
    assert not above.capped and inside(above.band) == 251 and above.band[0] == float(sigmas[350])
    assert above.mass == pytest.approx(0.251) and below.mass == pytest.approx(0.099)


def test_bad_bands_are_refused():
    with pytest.raises(ValueError, match="0 < low <= high"):
        placebo_bands(LogNormal(), (0.0, 1.0))
    with pytest.raises(ValueError, match="0 < low <= high"):
        placebo_bands(LogNormal(), (2.0, 1.0))
