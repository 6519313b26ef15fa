"""The danger zone (paper Section 4.2.3, App. E.4): the band of noise levels where the max posterior weight and the
shell coverage are both high, and THE rule that turns a danger zone into the band a gap removes from training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calmwild.checks import check_choice, check_sigmas
from calmwild.schedule import sigma_to_timestep, timestep_to_sigma

CROSSING_MIN_MARGIN = 1.5  # an empty zone falls back to at least [c / 1.5, c * 1.5] around the crossing c
IF_EMPTY = ("error", "crossing")
# Section 5, grayscale CelebA: the danger zone read off Fig. 5 and the gap trained around it, in DDPM timesteps.
PAPER_ZONE_TIMESTEPS = (125, 325)
PAPER_GAP_TIMESTEPS = (100, 350)


def level_crossings(u: np.ndarray, values: np.ndarray, level: float) -> list[tuple[float, int]]:
    """Points where the piecewise-linear curve (u, values) crosses ``level``: (u*, direction) with direction +1 when
    the curve goes from below to at-or-above the level with increasing u, -1 for the reverse."""
    out = []
    above = values >= level
    for k in range(len(u) - 1):
        if above[k] != above[k + 1]:
            frac = (level - values[k]) / (values[k + 1] - values[k])
            out.append((float(u[k] + frac * (u[k + 1] - u[k])), 1 if above[k + 1] else -1))
    return out


@dataclass
class DangerZone:
    """Result of :func:`danger_zone` (sigmas in the EDM convention, timesteps of the DDPM linear schedule)."""

    band: tuple[float, float] | None
    intervals: list[tuple[float, float]]
    crossing_sigma: float | None
    crossing_level: float | None
    weight_crossing_sigma: float | None
    coverage_crossing_sigma: float | None
    max_joint_level: float
    weight_level: float
    coverage_level: float
    ddpm: dict[str, float] = field(default_factory=dict)

    def _timestep(self, sigma: float | None) -> float | None:
        return None if sigma is None else float(sigma_to_timestep(sigma, **self.ddpm))

    def to_dict(self) -> dict[str, Any]:
        return {
            "empty": self.band is None,
            "sigma": None if self.band is None else list(self.band),
            "timesteps": None if self.band is None else [self._timestep(s) for s in self.band],
            "intervals": [list(iv) for iv in self.intervals],
            "crossing": {
                "sigma": self.crossing_sigma,
                "timestep": self._timestep(self.crossing_sigma),
                "level": self.crossing_level,
            },
            "weight_crossing_sigma": self.weight_crossing_sigma,
            "coverage_crossing_sigma": self.coverage_crossing_sigma,
            "max_joint_level": self.max_joint_level,
            "weight_level": self.weight_level,
            "coverage_level": self.coverage_level,
            "ddpm": dict(self.ddpm),
        }


def danger_zone(
    sigmas: Sequence[float] | torch.Tensor,
    max_weight: Sequence[float] | torch.Tensor,
    coverage: Sequence[float] | torch.Tensor,
    weight_level: float = 0.5,
    coverage_level: float = 0.5,
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> DangerZone:
    """The danger zone (Section 4.2, App. E.4): the sigma band where max posterior weight >= ``weight_level`` AND
    coverage >= ``coverage_level``, with both curves interpolated linearly in log sigma between grid points.

    Defaults 0.5 / 0.5: "high" read as "majority" for both quantities -- the nearest training image carries more
    than half of the posterior mass (the empirical denoiser's output is dominated by one image), and more than half
    of the noised test distribution lies in the supervised shells. With two sharp monotone transitions the band is
    non-empty exactly when the curves intersect above 0.5, matching the paper's reading of its Fig. 3 / Fig. 8 (a
    narrow interval containing the intersection point). The levels are arguments, as the paper gives no numbers.

    Returns the widest interval as ``band`` (all of them in ``intervals``; noisy curves can split one), or
    ``band = None`` when no sigma meets both levels -- no band is invented; then ``crossing_sigma`` (where the two
    curves intersect, weight falling below coverage; the highest such crossing) and ``max_joint_level``
    (max over sigma of min(weight, coverage), the level both reach together) describe what was reached.
    ``weight_crossing_sigma``: the largest sigma where the weight falls through its level;
    ``coverage_crossing_sigma``: the smallest sigma where the coverage rises through its level (None if never).
    DDPM timesteps (``T``, ``beta_*``) come from :func:`calmwild.schedule.sigma_to_timestep` (clamped to [1, T]).
    """
    sig = check_sigmas(sigmas).numpy()
    w = np.asarray(torch.as_tensor(max_weight, dtype=torch.float64).cpu().reshape(-1), dtype=np.float64)
    c = np.asarray(torch.as_tensor(coverage, dtype=torch.float64).cpu().reshape(-1), dtype=np.float64)
    if not (sig.shape == w.shape == c.shape) or sig.size < 2:
        raise ValueError(
            f"sigmas, max_weight and coverage must be 1-D of the same length >= 2, got {sig.size}, {w.size}, {c.size}"
        )
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(c))):
        raise ValueError("max_weight and coverage must be finite")
    for name, level in (("weight_level", weight_level), ("coverage_level", coverage_level)):
        if not 0.0 < level <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {level}")
    order = np.argsort(sig)
    if np.any(np.diff(sig[order]) == 0):
        raise ValueError(f"sigmas must be distinct, got {sig.tolist()}")
    u, w, c = np.log(sig[order]), w[order], c[order]

    w_cross, c_cross = level_crossings(u, w, weight_level), level_crossings(u, c, coverage_level)
    breaks = np.unique(np.concatenate([u, [p for p, _ in w_cross], [p for p, _ in c_cross]]))
    mids = 0.5 * (breaks[:-1] + breaks[1:])
    good = (np.interp(mids, u, w) >= weight_level) & (np.interp(mids, u, c) >= coverage_level)
    intervals: list[tuple[float, float]] = []
    for k in np.flatnonzero(good):
        if intervals and math.isclose(intervals[-1][1], breaks[k], rel_tol=0, abs_tol=1e-12):
            intervals[-1] = (intervals[-1][0], float(breaks[k + 1]))
        else:
            intervals.append((float(breaks[k]), float(breaks[k + 1])))
    band = max(intervals, key=lambda iv: iv[1] - iv[0]) if intervals else None

    diff_cross = level_crossings(u, w - c, 0.0)
    falling = [p for p, direction in diff_cross if direction < 0] or [p for p, _ in diff_cross]
    crossing_u = max(falling, key=lambda p: float(np.interp(p, u, w))) if falling else None
    joint_u = np.concatenate([u, [p for p, _ in diff_cross]])
    joint = np.minimum(np.interp(joint_u, u, w), np.interp(joint_u, u, c))
    weight_down = [p for p, direction in w_cross if direction < 0]
    coverage_up = [p for p, direction in c_cross if direction > 0]

    def sigma_of(value: float | None) -> float | None:
        return None if value is None else float(math.exp(value))

    return DangerZone(
        band=None if band is None else (sigma_of(band[0]), sigma_of(band[1])),
        intervals=[(sigma_of(a), sigma_of(b)) for a, b in intervals],
        crossing_sigma=sigma_of(crossing_u),
        crossing_level=None if crossing_u is None else float(np.interp(crossing_u, u, w)),
        weight_crossing_sigma=sigma_of(max(weight_down)) if weight_down else None,
        coverage_crossing_sigma=sigma_of(min(coverage_up)) if coverage_up else None,
        max_joint_level=float(joint.max()),
        weight_level=float(weight_level),
        coverage_level=float(coverage_level),
        ddpm={"T": int(T), "beta_start": float(beta_start), "beta_end": float(beta_end)},
    )


def paper_buffer_margin(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """The paper's buffer around a danger zone as one :func:`gap_band` margin: Section 5 removes DDPM timesteps
    [100, 350] around the CelebA zone [125, 325]; in sigma that widens the zone by sigma_125 / sigma_100 below and
    sigma_350 / sigma_325 above (about 1.26 and 1.13 on the linear-beta schedule), and the margin is their geometric
    mean sqrt(sigma_125 sigma_350 / (sigma_100 sigma_325)), about 1.19."""
    (gap_lo, gap_hi), (zone_lo, zone_hi) = PAPER_GAP_TIMESTEPS, PAPER_ZONE_TIMESTEPS
    sigma = {t: float(timestep_to_sigma(t, T, beta_start, beta_end)) for t in (gap_lo, gap_hi, zone_lo, zone_hi)}
    return math.sqrt(sigma[zone_lo] / sigma[gap_lo] * sigma[gap_hi] / sigma[zone_hi])


def check_gap_options(margin: float, if_empty: str) -> None:
    """The options of :func:`gap_band`: a widening factor ``margin`` >= 1 and ``if_empty`` in :data:`IF_EMPTY`."""
    if not margin >= 1.0:
        raise ValueError(f"margin must be >= 1 (a widening factor in sigma), got {margin}")
    check_choice(if_empty, "if_empty", IF_EMPTY)


def gap_band(zone: DangerZone | dict[str, Any], margin: float = 1.0, if_empty: str = "error") -> tuple[float, float]:
    """THE rule from a danger zone to the sigma band a gap removes from training (paper Section 5 removes the zone
    plus some buffer): the zone [a, b] widened to [a / margin, b * margin] (``margin`` >= 1 is a factor in sigma, a
    shift in log sigma). An empty zone is an error naming the levels reached, unless ``if_empty="crossing"``: then
    the band is [c / m, c * m] around the sigma c where the two curves cross, with m = max(margin,
    :data:`CROSSING_MIN_MARGIN`). ``zone`` is a :class:`DangerZone` or its ``to_dict()`` (as in ``geometry.json``)."""
    check_gap_options(margin, if_empty)
    info = zone.to_dict() if isinstance(zone, DangerZone) else zone
    if info["sigma"] is not None:
        low, high = info["sigma"]
        return float(low) / margin, float(high) * margin
    crossing = info["crossing"]["sigma"]
    if if_empty == "crossing" and crossing is not None:
        width = max(margin, CROSSING_MIN_MARGIN)
        return float(crossing) / width, float(crossing) * width
    hint = ("the weight and coverage curves never cross on this grid" if if_empty == "crossing"
            else "lower the levels, or set if_empty=crossing")
    raise ValueError(
        f"the danger zone of this dataset is empty at weight_level={info['weight_level']} and "
        f"coverage_level={info['coverage_level']} (both curves reach {info['max_joint_level']:.3f} together at most; "
        f"the weight falls through its level at sigma {info['weight_crossing_sigma']}, the coverage rises through "
        f"its level at sigma {info['coverage_crossing_sigma']}): {hint}"
    )
