"""calmwild.geometry.zone: the danger zone against hand-computed crossings, and the one gap-band rule."""

import pytest
import torch

from calmwild.geometry import (
    CROSSING_MIN_MARGIN,
    danger_zone,
    gap_band,
)
from calmwild.schedule import sigma_to_timestep


def test_danger_zone_interpolates_in_log_sigma():
    sigmas = [100.0, 10.0, 1.0, 0.1]  # any order
    weight = [0.0, 0.3, 0.9, 1.0]
    cover = [1.0, 0.8, 0.2, 0.0]
    zone = danger_zone(sigmas, weight, cover)
    # weight: 0.9 -> 0.3 over log10 sigma 0 -> 1 crosses 0.5 at 2/3; coverage 0.2 -> 0.8 crosses at 1/2
    assert zone.band == pytest.approx((10**0.5, 10 ** (2 / 3)))
    assert zone.coverage_crossing_sigma == pytest.approx(10**0.5)
    assert zone.weight_crossing_sigma == pytest.approx(10 ** (2 / 3))
    # weight - coverage: 0.7 -> -0.5 crosses 0 at 7/12; level 0.9 - 0.6 * 7/12 = 0.55
    assert zone.crossing_sigma == pytest.approx(10 ** (7 / 12))
    assert zone.crossing_level == pytest.approx(0.55)
    assert zone.max_joint_level == pytest.approx(0.55)
    report = zone.to_dict()
    assert report["empty"] is False
    assert report["timesteps"] == pytest.approx([float(sigma_to_timestep(s)) for s in zone.band])
    assert report["crossing"]["timestep"] == pytest.approx(float(sigma_to_timestep(10 ** (7 / 12))))

    empty = danger_zone(sigmas, weight, cover, weight_level=0.6, coverage_level=0.6)
    assert empty.band is None and empty.intervals == [] and empty.to_dict()["empty"] is True
    assert empty.to_dict()["sigma"] is None
    assert empty.crossing_sigma == pytest.approx(10 ** (7 / 12)) and empty.max_joint_level == pytest.approx(0.55)

    with pytest.raises(ValueError, match="same length"):
        danger_zone([1.0, 2.0], [0.5], [0.5, 0.6])
    with pytest.raises(ValueError, match="weight_level"):
        danger_zone([1.0, 2.0], [0.5, 0.4], [0.5, 0.6], weight_level=0.0)


def _zone(weight, coverage):
    sig = torch.tensor([0.01, 0.1, 1.0, 10.0])
    return danger_zone(sig, torch.tensor(weight), torch.tensor(coverage))


def test_gap_band_widens_the_zone_by_the_margin_in_sigma():
    zone = _zone([1.0, 0.9, 0.2, 0.0], [0.0, 0.6, 0.9, 1.0])
    low, high = zone.band
    assert gap_band(zone) == (low, high)
    assert gap_band(zone, margin=2.0) == pytest.approx((low / 2.0, high * 2.0), rel=1e-12)
    assert gap_band(zone.to_dict(), margin=2.0) == gap_band(zone, margin=2.0)  # geometry.json's form, same rule


def test_gap_band_of_an_empty_zone_is_an_error_or_the_crossing_band():
    zone = _zone([1.0, 0.45, 0.1, 0.0], [0.0, 0.1, 0.45, 1.0])  # the curves cross below both levels
    assert zone.band is None and zone.crossing_sigma is not None
    c = zone.crossing_sigma
    with pytest.raises(ValueError, match=r"empty at weight_level=0\.5 and coverage_level=0\.5.*if_empty=crossing"):
        gap_band(zone)
    assert gap_band(zone, if_empty="crossing") == pytest.approx((c / CROSSING_MIN_MARGIN, c * CROSSING_MIN_MARGIN))
    assert gap_band(zone, margin=3.0, if_empty="crossing") == pytest.approx((c / 3.0, c * 3.0))
    with pytest.raises(ValueError, match="margin must be >= 1"):
        gap_band(zone, margin=0.9)
    with pytest.raises(ValueError, match="if_empty must be one of"):
        gap_band(zone, if_empty="skip")
