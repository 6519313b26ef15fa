"""The study's verdicts: every criterion in one place, written before any number of the study was seen.

Each claim is judged by a pure function of the measured numbers and returns a :class:`Verdict`: ``reproduced``,
``not reproduced`` or ``inconclusive``, with the evidence in numbers. The three outcomes are decided by intervals,
never by a point estimate alone:

- reproduced: the interval of the claimed effect lies entirely on the claimed side of its threshold;
- not reproduced: the interval rules the claimed effect out (it lies entirely on the other side), or the data show
  the opposite;
- inconclusive: the interval straddles the threshold (too few seeds or samples to tell).

Intervals (95%, :mod:`calmwild.stats`): a rate over the seeds of an arm is Student's t interval of the per-seed
rates; a difference between two arms is Welch's interval of the per-seed rates (independent trainings); a difference
between two swaps drawn from the same noises is the t interval of the per-noise paired differences; an AUROC has
DeLong's interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from calmwild import stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)

# ---------------------------------------------------------------------------------------------------- constants
REGIME_BAND = (0.4, 0.9)  # N*: the baseline memorizes between 40% and 90% of its samples (issue 11)
REGIME_TARGET = 0.65  # ... and among such sizes, the one closest to the middle of that band
GAP_RELATIVE_CUT = 0.5  # the gap must cut the baseline's memorization by at least half (paper: 78.8% -> 0.7%)
NEGLIGIBLE_RATE = 0.05  # a difference of memorization rates below 5 points is negligible
ZONE_CONCENTRATION = 2.0  # per-sigma memorization inside the zone at least twice the mean outside it
RISK_WEAK_AUROC = 0.6  # a risk score whose AUROC cannot exceed 0.6 does not predict which images are memorized
REMARK_FACTOR = 2.0  # "compare well": each Theorem 4.2 threshold within a factor 2 of its curve crossing

CRITERIA: dict[str, str] = {
    "gap_mitigates": (
        f"The danger-zone gap cuts the baseline's trajectory memorization at N* by at least "
        f"{GAP_RELATIVE_CUT:.0%} of the baseline rate. Reproduced: mean cut >= {GAP_RELATIVE_CUT:.0%} and the 95% "
        f"Welch interval of (baseline - gap) over seeds above 0. Not reproduced: that interval's upper end below "
        f"{GAP_RELATIVE_CUT:.0%} of the baseline rate (a cut that large is ruled out). Otherwise inconclusive."),
    "gap_beats_placebo": (
        "The danger-zone gap lowers memorization more than a placebo gap removing the same training mass outside the "
        "zone, below it and above it (a side with less mass than the gap removes all it has, and is named). "
        "Reproduced: for every placebo, the 95% Welch interval of (placebo - gap) over seeds above 0. Not reproduced: "
        f"for some placebo that interval's upper end below {NEGLIGIBLE_RATE:.2f} (an advantage of "
        f"{NEGLIGIBLE_RATE:.0%} points or more is ruled out). Otherwise inconclusive."),
    "gap_quality": (
        "The gap's sample quality is not worse than the baseline's by more than the seed-to-seed spread (the "
        "pooled standard deviation of the Frechet distance over seeds, both arms). Reproduced: mean Frechet "
        "distance of the gap - baseline <= that spread. Not reproduced: the 95% Welch interval of the difference "
        "entirely above the spread. Otherwise inconclusive."),
    "zone_concentration": (
        "Per-sigma memorization of the N* baseline concentrates in the danger zone computed from the data before "
        "training: the peak of the seed-mean curve lies inside the zone, and over the whole sigma grid the mean rate "
        f"at the levels inside the zone exceeds {ZONE_CONCENTRATION:g} x the mean outside. Per seed "
        f"R = mean inside - {ZONE_CONCENTRATION:g} x mean outside. Reproduced: peak inside and the 95% t interval of "
        "R over seeds above 0. Not reproduced: that interval's upper end <= 0, or every seed's peak outside the "
        "zone. Otherwise inconclusive."),
    "swap_steps": (
        "Table 1 with the paper's step bands (large 1-6, medium 7-13, small 14-18 of EDM's 18 steps): swapping the "
        "medium band moves trajectory memorization more than swapping the large or the small band, in both "
        "directions (memorizing model with the generalizing one inside the band, and the reverse). Change = the "
        "drop (first direction) or rise (second) of the rate against no swap, on the same noises. Reproduced: in "
        "both directions the medium change exceeds each other band's, every 95% paired interval of the difference "
        f"above 0, and the medium change's own interval above {NEGLIGIBLE_RATE:.2f}. Not reproduced: another band's "
        "change exceeds the medium one's with the paired interval below 0 in some direction, or the medium change's "
        f"interval lies below {NEGLIGIBLE_RATE:.2f} in some direction. Otherwise inconclusive."),
    "swap_zone": (
        "The same test with bands placed by the data: below the danger zone, the zone, above it. Reproduced / not "
        "reproduced / inconclusive exactly as for the step bands, with the zone in the role of the medium band."),
    "risk": (
        "A training image's risk score from the data alone (seed 002: isolated images are memorized) predicts which "
        "images the N* baseline over-reproduces (reproduced more often than the uniform share M / N of its M "
        "memorized samples, pooled over seeds). Reproduced: DeLong 95% interval of the primary score's AUROC above "
        f"0.5. Not reproduced: its upper end below {RISK_WEAK_AUROC}. Otherwise inconclusive (also when every or no "
        "image is over-reproduced)."),
    "remark_4_3": (
        "Remark 4.3: Theorem 4.2's thresholds compare well with the max-weight curve. The median sigma_lo "
        "(w >= 1 - eps below it) and the median sigma_hi (w <= eps above it) each lie within a factor "
        f"{REMARK_FACTOR:g} of the sigma where the expected max weight crosses 1 - eps and eps. Reproduced: both "
        "within. Not reproduced: either outside. Inconclusive: the curve does not reach a level on the grid."),
}


@dataclass
class Verdict:
    """A claim's verdict with its evidence (a sentence of numbers) and the numbers themselves."""

    claim: str
    status: str
    evidence: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in VERDICTS:
            raise ValueError(f"status must be one of {VERDICTS}, got {self.status!r}")
        if self.claim not in CRITERIA:
            raise ValueError(f"unknown claim {self.claim!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.claim, "status": self.status, "evidence": self.evidence, "criterion": CRITERIA[self.claim],
                "numbers": self.numbers}


def pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def interval_text(iv: stats.Interval, as_percent: bool = True) -> str:
    if as_percent:
        return f"{pct(iv.estimate)} [{pct(iv.low)}, {pct(iv.high)}]"
    return f"{iv.estimate:.3g} [{iv.low:.3g}, {iv.high:.3g}]"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------- regime
def choose_regime(rates: Mapping[int, float]) -> dict[str, Any]:
    """N*: among the training-set sizes whose baseline rate lies in :data:`REGIME_BAND`, the one whose rate is
    closest to :data:`REGIME_TARGET` (ties: the larger N). Without one in the band, ``n_star`` is None and
    ``bracket`` names the neighbouring sizes whose rates enclose the target (the next size to try is their
    geometric mean), or None when the rates never cross it."""
    if not rates:
        raise ValueError("choose_regime needs at least one (size, rate)")
    low, high = REGIME_BAND
    inside = {n: r for n, r in rates.items() if low <= r <= high}
    if inside:
        n_star = min(inside, key=lambda n: (round(abs(inside[n] - REGIME_TARGET), 9), -n))
        return {"n_star": n_star, "rate": inside[n_star], "bracket": None}
    sizes = sorted(rates)
    bracket = next(((a, b) for a, b in zip(sizes, sizes[1:])
                    if (rates[a] - REGIME_TARGET) * (rates[b] - REGIME_TARGET) < 0), None)
    return {"n_star": None, "rate": None, "bracket": bracket}


# ---------------------------------------------------------------------------------------------------- arms
def gap_mitigates(baseline: Sequence[float], gap: Sequence[float]) -> Verdict:
    """Per-seed trajectory memorization rates of the baseline and the danger-zone gap at N*."""
    diff = stats.difference_interval(baseline, gap)
    base_mean = _mean(baseline)
    cut = diff.estimate / base_mean if base_mean > 0 else None
    needed = GAP_RELATIVE_CUT * base_mean
    if base_mean > 0 and cut >= GAP_RELATIVE_CUT and diff.low > 0:
        status = REPRODUCED
    elif base_mean == 0 or diff.high < needed:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    if base_mean == 0:
        evidence = f"the baseline memorizes nothing ({len(baseline)} seeds): nothing to mitigate"
    else:
        evidence = (f"baseline {pct(base_mean)}, gap {pct(_mean(gap))} (means over {len(baseline)} and {len(gap)} "
                    f"seeds); baseline - gap {interval_text(diff)}, a cut of {pct(cut)} of the baseline "
                    f"(needed: {pct(needed)} points, i.e. {GAP_RELATIVE_CUT:.0%})")
    return Verdict("gap_mitigates", status, evidence,
                   {"difference": diff.as_dict(), "relative_cut": cut, "needed_difference": needed})


def gap_beats_placebo(gap: Sequence[float], placebos: Mapping[str, Sequence[float]],
                      capped: Mapping[str, bool] | None = None) -> Verdict:
    """Per-seed rates of the gap and of each placebo arm (``capped``: the placebos that removed less mass)."""
    if not placebos:
        raise ValueError("gap_beats_placebo needs at least one placebo arm")
    capped = capped or {}
    diffs = {name: stats.difference_interval(rates, gap) for name, rates in placebos.items()}
    if all(d.low > 0 for d in diffs.values()):
        status = REPRODUCED
    elif any(d.high < NEGLIGIBLE_RATE for d in diffs.values()):
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    parts = [f"{name}{' (capped: less mass than the gap)' if capped.get(name) else ''} {pct(_mean(placebos[name]))}, "
             f"placebo - gap {interval_text(d)}" for name, d in diffs.items()]
    evidence = f"gap {pct(_mean(gap))}; " + "; ".join(parts)
    return Verdict("gap_beats_placebo", status, evidence,
                   {"differences": {name: d.as_dict() for name, d in diffs.items()}, "capped": dict(capped)})


def pooled_spread(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt of the mean of the two samples' variances (ddof 1): the seed-to-seed standard deviation of a figure."""
    def var(x: Sequence[float]) -> float:
        m = _mean(x)
        return sum((v - m) ** 2 for v in x) / (len(x) - 1)
    return math.sqrt((var(a) + var(b)) / 2)


def gap_quality(baseline: Sequence[float], gap: Sequence[float], what: str = "Frechet distance") -> Verdict:
    """Per-seed quality figures (lower is better) of the baseline and the gap."""
    diff = stats.difference_interval(gap, baseline)
    spread = pooled_spread(baseline, gap)
    if diff.estimate <= spread:
        status = REPRODUCED
    elif diff.low > spread:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    evidence = (f"{what}: baseline {_mean(baseline):.4g}, gap {_mean(gap):.4g}; gap - baseline "
                f"{interval_text(diff, False)} against a seed-to-seed spread of {spread:.3g}")
    return Verdict("gap_quality", status, evidence, {"difference": diff.as_dict(), "spread": spread})


# ---------------------------------------------------------------------------------------------------- per sigma
def _in_zone(sigma: float, zone: tuple[float, float]) -> bool:
    return zone[0] <= sigma <= zone[1]


def zone_concentration(sigmas: Sequence[float], curves: Sequence[Sequence[float]],
                       zone: tuple[float, float]) -> Verdict:
    """``curves``: one per-sigma memorization curve per seed of the N* baseline, over ``sigmas``; ``zone``: the
    danger zone (low, high) in sigma."""
    inside = [k for k, s in enumerate(sigmas) if _in_zone(s, zone)]
    outside = [k for k in range(len(sigmas)) if k not in inside]
    mean_curve = [_mean([c[k] for c in curves]) for k in range(len(sigmas))]
    if not inside or not outside:
        return Verdict("zone_concentration", INCONCLUSIVE,
                       f"{len(inside)} of {len(sigmas)} grid levels lie in the zone {_band_text(zone)}: no comparison",
                       {"inside_levels": len(inside)})
    contrast = [_mean([c[k] for k in inside]) - ZONE_CONCENTRATION * _mean([c[k] for k in outside]) for c in curves]
    interval = stats.mean_interval(contrast)
    peak = max(range(len(sigmas)), key=lambda k: mean_curve[k])
    peak_inside = mean_curve[peak] > 0 and _in_zone(sigmas[peak], zone)
    seed_peaks = [sigmas[max(range(len(sigmas)), key=lambda k: c[k])] if max(c) > 0 else None for c in curves]
    all_outside = all(s is None or not _in_zone(s, zone) for s in seed_peaks)
    if peak_inside and interval.low > 0:
        status = REPRODUCED
    elif interval.high <= 0 or all_outside:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    mean_in = _mean([mean_curve[k] for k in inside])
    mean_out = _mean([mean_curve[k] for k in outside])
    evidence = (f"seed-mean curve peaks at {pct(mean_curve[peak])} at sigma {sigmas[peak]:.3g} "
                f"({'inside' if peak_inside else 'outside'} the zone {_band_text(zone)}); mean rate inside "
                f"{pct(mean_in)} over {len(inside)} levels, outside {pct(mean_out)} over {len(outside)}; "
                f"R = inside - {ZONE_CONCENTRATION:g} x outside {interval_text(interval)} over {len(curves)} seeds; "
                f"per-seed peaks at sigma " + ", ".join("none" if s is None else f"{s:.3g}" for s in seed_peaks))
    return Verdict("zone_concentration", status, evidence,
                   {"peak_sigma": sigmas[peak], "peak_rate": mean_curve[peak], "peak_inside": peak_inside,
                    "mean_inside": mean_in, "mean_outside": mean_out, "contrast": interval.as_dict(),
                    "seed_peak_sigmas": seed_peaks})


def _band_text(band: Sequence[float]) -> str:
    return f"[{band[0]:.3g}, {band[1]:.3g}]"


# ---------------------------------------------------------------------------------------------------- swap
def swap_changes(none: Sequence[bool], swapped: Sequence[bool], rises: bool) -> list[float]:
    """Per-noise change of the memorized indicator when the band is swapped: +1 where the swap moved that sample
    in the expected direction (``rises``: not memorized -> memorized; else memorized -> not), -1 the other way."""
    if len(none) != len(swapped):
        raise ValueError(f"paired swaps need the same noises: {len(none)} and {len(swapped)} samples")
    sign = 1.0 if rises else -1.0
    return [sign * (float(s) - float(n)) for n, s in zip(none, swapped)]


def swap_verdict(claim: str, focus: str, directions: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """``directions``: per direction, ``rises`` (whether swapping in the other model should raise memorization) and
    ``memorized``: band name -> the per-noise memorized indicators (``none`` for no swap, same noises everywhere).
    ``focus`` is the band claimed to matter most (``medium`` or ``zone``)."""
    numbers: dict[str, Any] = {}
    wins, losses, own_small, own_large = [], [], [], []
    parts = []
    for direction, entry in directions.items():
        memorized = entry["memorized"]
        changes = {band: swap_changes(memorized["none"], flags, entry["rises"])
                   for band, flags in memorized.items() if band != "none"}
        own = stats.mean_interval(changes[focus])
        numbers[direction] = {"change": {band: stats.mean_interval(c).as_dict() for band, c in changes.items()},
                              "focus_minus": {}}
        own_large.append(own.low > NEGLIGIBLE_RATE)
        own_small.append(own.high < NEGLIGIBLE_RATE)
        text = [f"{direction}: {focus} {interval_text(own)}"]
        for band, c in changes.items():
            if band == focus:
                continue
            diff = stats.mean_interval([a - b for a, b in zip(changes[focus], c)])
            numbers[direction]["focus_minus"][band] = diff.as_dict()
            wins.append(diff.low > 0)
            losses.append(diff.high < 0)
            text.append(f"{band} {pct(_mean(c))} ({focus} - {band} {interval_text(diff)})")
        parts.append(", ".join(text))
    if all(wins) and all(own_large):
        status = REPRODUCED
    elif any(losses) or any(own_small):
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    return Verdict(claim, status, "change of memorization -- " + "; ".join(parts), numbers)


# ---------------------------------------------------------------------------------------------------- risk, remark
def risk_verdict(auroc: stats.Interval | None, num_positive: int, num_images: int, score: str) -> Verdict:
    """The primary score's AUROC for "over-reproduced" with DeLong's interval (None when undefined)."""
    if auroc is None:
        return Verdict("risk", INCONCLUSIVE, f"{num_positive} of {num_images} images over-reproduced: the AUROC needs "
                       "both classes", {"num_positive": num_positive})
    if auroc.low > 0.5:
        status = REPRODUCED
    elif auroc.high < RISK_WEAK_AUROC:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    evidence = (f"{score}: AUROC {interval_text(auroc, False)} for the {num_positive} of {num_images} training images "
                "reproduced more often than the uniform share")
    return Verdict("risk", status, evidence, {"auroc": auroc.as_dict(), "num_positive": num_positive})


def remark_verdict(remark: Mapping[str, Any]) -> Verdict:
    """``remark``: the ``remark_4_3`` section of a geometry report (:func:`calmwild.geometry.weights.remark_4_3`)."""
    ratios = remark["ratio"]
    curve, threshold = remark["curve_sigma"], remark["threshold_sigma"]
    if any(value is None for value in ratios.values()):
        status = INCONCLUSIVE
    elif all(1 / REMARK_FACTOR <= value <= REMARK_FACTOR for value in ratios.values()):
        status = REPRODUCED
    else:
        status = NOT_REPRODUCED

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3g}"

    levels = remark["levels"]
    evidence = "; ".join(f"max weight falls through {levels[key]:g} at sigma {fmt(curve[key])}, median threshold "
                         f"{fmt(threshold[key])} (ratio {fmt(ratios[key])})" for key in ("high_weight", "low_weight"))
    return Verdict("remark_4_3", status, evidence + f"; {remark['num_points']} training points", dict(remark))
