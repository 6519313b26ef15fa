"""Placebo gaps: the control of a gap experiment (paper Section 5).

A gap removes a band [a, b] of noise levels from training, and with it the probability mass
m = P(a <= sigma <= b) of the training distribution p(sigma) (eq. 1). A model trained with that gap differs from the
baseline in two ways at once: it never sees the band, and it sees every other noise level 1 / (1 - m) times as often.
A placebo gap removes the same mass m from a band *outside* the danger zone. If under-training the danger zone is what
mitigates memorization, the placebo must do less than the gap; if any gap of that mass does as well, the zone is not
the point.

:func:`placebo_bands` places one such band on each side of the gap, adjacent to it:

- below: [q(F(a-) - m), a-], the noise levels just below the gap that carry mass m;
- above: [b+, q(F(b) + m)], those just above it,

with F the base's CDF, F(a-) = P(sigma < a), q its quantile function, a- the largest level below a and b+ the
smallest above b (a and b themselves for a continuous base; the neighbouring atoms for DDPM's discrete timesteps).
A side that holds less than m takes all it has, and says so (``capped``): under EDM's log-normal p(sigma) a danger
zone near sigma = 1 leaves little mass above it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from calmwild.sigma import SigmaSampler

SIDES = ("below", "above")
_EDGE = 1e-12  # a probability step that moves a quantile onto the next atom of a discrete base, and nothing else


class PlaceboBand(NamedTuple):
    """One placebo band: ``band`` [low, high] in sigma, the base ``mass`` it removes, the ``target`` mass (the
    gap's) and whether the side held less than the target (``capped``)."""

    side: str
    band: tuple[float, float]
    mass: float
    target: float
    capped: bool

    def to_dict(self) -> dict:
        return {"side": self.side, "sigma": list(self.band), "mass": self.mass, "target_mass": self.target,
                "capped": self.capped}


def placebo_bands(base: SigmaSampler, band: tuple[float, float]) -> dict[str, PlaceboBand]:
    """The placebo bands below and above the gap ``band`` = (a, b) in sigma, each removing the gap's mass under
    ``base`` (the module docstring gives the rule). A side without any mass (a gap reaching the end of the support)
    is left out of the result."""
    low, high = (float(v) for v in band)
    if not 0 < low <= high or not math.isfinite(high):
        raise ValueError(f"band must be [low, high] with 0 < low <= high < inf, got {list(band)}")
    target = base.mass(low, high)
    if target <= 0:
        raise ValueError(f"band {list(band)} holds no mass of the base {base.describe()}")
    below_mass, above_mass = float(base.cdf_below(low)), 1.0 - float(base.cdf(high))
    out: dict[str, PlaceboBand] = {}
    if below_mass > _EDGE:
        start = max(below_mass - target, 0.0)
        edges = (_quantile(base, start + _EDGE), _quantile(base, below_mass))
        out["below"] = _placebo(base, "below", edges, target)
    if above_mass > _EDGE:
        top = float(base.cdf(high))
        end = min(top + target - _EDGE, 1.0 - _EDGE)
        edges = (_quantile(base, top + _EDGE), _quantile(base, end))
        out["above"] = _placebo(base, "above", edges, target)
    return out


def _quantile(base: SigmaSampler, u: float) -> float:
    return float(base.quantile(min(max(u, _EDGE), 1.0)))


def _placebo(base: SigmaSampler, side: str, edges: tuple[float, float], target: float) -> PlaceboBand:
    low, high = edges
    mass = base.mass(low, high)
    return PlaceboBand(side, (low, high), mass, target, capped=mass < target * (1 - 1e-6))
