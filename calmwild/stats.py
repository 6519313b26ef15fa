"""Intervals for the rates and means calmwild reports: every rate comes with an interval and its sample count.

- :func:`wilson_interval`: a binomial proportion k / n (one model's memorization rate over n samples), Wilson's score
  interval (E. B. Wilson 1927), which stays inside [0, 1] and behaves at k = 0 or k = n where the normal
  approximation collapses to a point.
- :func:`mean_interval`: the mean of a few independent values (one rate per training seed), Student's t interval;
  :func:`rate_mean_interval` the same for rates, clipped to [0, 1].
- :func:`difference_interval`: the difference of two such means (Welch's t interval with the Welch-Satterthwaite
  degrees of freedom), for "the intervention lowers the rate": the interval of the difference, not two intervals.

Rank statistics: :func:`midranks` (ties as mean ranks), :func:`auroc` (exact, the Mann-Whitney U statistic),
:func:`auroc_interval` (DeLong et al. 1988), :func:`spearman`, and the null standard deviations of both for a score
that knows nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calmwild.checks import check_count


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided ``confidence`` interval [low, high] and the sample count behind it."""

    estimate: float
    low: float
    high: float
    count: int
    confidence: float = 0.95

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "count": self.count,
                "confidence": self.confidence}

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}] (n={self.count})"


def _normal_quantile(confidence: float) -> float:
    """z with P(|Z| <= z) = ``confidence`` for a standard normal Z."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _t_quantile(confidence: float, dof: float) -> float:
    """t with P(|T| <= t) = ``confidence`` for Student's T with ``dof`` degrees of freedom (scipy, imported here:
    the commands that only need normal quantiles start without it)."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return confidence


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Wilson's score interval for the proportion ``successes / trials``:

        centre = (p + z^2 / 2n) / (1 + z^2 / n),   half-width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n),

    z the two-sided normal quantile of ``confidence``."""
    _check_confidence(confidence)
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p, n = successes / trials, trials
    z = _normal_quantile(confidence)
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exactly the ends at k = 0 and k = n, not rounded
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return Interval(p, low, high, n, confidence)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student's t interval of the mean of independent ``values`` (at least 2): mean +- t_{n-1} s / sqrt(n)."""
    _check_confidence(confidence)
    x = [float(v) for v in values]
    n = len(x)
    if n < 2:
        raise ValueError(f"an interval of a mean needs at least 2 values, got {n}")
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
    half = _t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def rate_mean_interval(rates: Sequence[float], confidence: float = 0.95) -> Interval:
    """:func:`mean_interval` of rates in [0, 1] (one per training seed) with its ends clipped to [0, 1]: with few
    seeds the t interval of a rate near 0 or 1 reaches past the values a mean of rates can take."""
    interval = mean_interval(rates, confidence)
    return Interval(interval.estimate, max(0.0, interval.low), min(1.0, interval.high), interval.count, confidence)


def difference_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Welch's t interval of mean(a) - mean(b) for independent samples (at least 2 each); the degrees of freedom
    are Welch-Satterthwaite's. With no spread in either sample the interval is the point difference."""
    _check_confidence(confidence)
    x, y = [float(v) for v in a], [float(v) for v in b]
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"a difference interval needs at least 2 values per group, got {len(x)} and {len(y)}")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    vx = sum((v - mx) ** 2 for v in x) / (len(x) - 1) / len(x)
    vy = sum((v - my) ** 2 for v in y) / (len(y) - 1) / len(y)
    diff = mx - my
    if vx + vy == 0.0:
        return Interval(diff, diff, diff, len(x) + len(y), confidence)
    dof = (vx + vy) ** 2 / ((vx * vx / (len(x) - 1) if vx else 0.0) + (vy * vy / (len(y) - 1) if vy else 0.0))
    half = _t_quantile(confidence, dof) * math.sqrt(vx + vy)
    return Interval(diff, diff - half, diff + half, len(x) + len(y), confidence)


# ------------------------------------------------------------------------------------------------ rank statistics
def as_vector(values: object, name: str) -> np.ndarray:
    """A 1-D float64 array of finite values (tensors, arrays and lists accepted)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from err
    if out.ndim != 1 or out.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains non-finite values")
    return out


def as_mask(values: object, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    out = np.asarray(values)
    if out.ndim != 1 or out.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D boolean mask, got shape {out.shape}")
    if out.dtype != np.bool_:
        if not np.all(np.isin(out, (0, 1))):
            raise ValueError(f"{name} must be boolean (or 0/1), got values {np.unique(out)[:5].tolist()}")
        out = out.astype(bool)
    return out


def midranks(values: object) -> np.ndarray:
    """Ranks 1..n of ``values`` (float64), tied values sharing the mean of the ranks they span."""
    x = as_vector(values, "values")
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]  # each tie group is [start, end) in sorted order
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    return ranks


def auroc(scores: object, positives: object) -> float:
    """Area under the ROC curve of ``scores`` for the ``positives`` (a boolean mask, 1-D, same length), exactly:

        AUROC = P(score of a positive > score of a negative) + 0.5 P(equal)
              = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)      (Mann-Whitney U / (n_+ n_-)),

    R_+ the sum of the positives' midranks (:func:`midranks`), which is how ties earn half a pair. 0.5 is chance
    level, 1 a perfect ranking. ValueError when either class is empty (the AUROC is undefined)."""
    s = as_vector(scores, "scores")
    pos = as_mask(positives, "positives")
    if s.size != pos.size:
        raise ValueError(f"{s.size} scores for {pos.size} mask entries")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"the AUROC needs positives and negatives, got {n_pos} positives and {n_neg} negatives")
    rank_sum = float(midranks(s)[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auroc_interval(scores: object, positives: object, confidence: float = 0.95) -> Interval:
    """The AUROC (:func:`auroc`) with DeLong's interval (DeLong, DeLong & Clarke-Pearson 1988): with the kernel
    psi(a, b) = 1 [a > b] + 0.5 * 1 [a = b], positives' scores X_1..X_m and negatives' Y_1..Y_n, the placement values

        V_i = (1/n) sum_j psi(X_i, Y_j),    W_j = (1/m) sum_i psi(X_i, Y_j)      (both average to the AUROC A),

    give Var A ~ s_V^2 / m + s_W^2 / n (sample variances), and the interval is A +- z sqrt(Var A), clipped to
    [0, 1]. The count is m + n. Placement values come from midranks, O((m + n) log(m + n)): V_i = (R_i - r_i) / n,
    R_i the midrank of X_i among all scores and r_i among the positives alone (and likewise W_j)."""
    _check_confidence(confidence)
    estimate = auroc(scores, positives)
    s, pos = as_vector(scores, "scores"), as_mask(positives, "positives")
    m, n = int(pos.sum()), int((~pos).sum())
    ranks = midranks(s)
    placement_pos = (ranks[pos] - midranks(s[pos])) / n  # share of negatives below each positive (ties: half)
    placement_neg = 1.0 - (ranks[~pos] - midranks(s[~pos])) / m  # share of positives above each negative
    var_pos = float(np.var(placement_pos, ddof=1)) if m > 1 else 0.0
    var_neg = float(np.var(placement_neg, ddof=1)) if n > 1 else 0.0
    half = _normal_quantile(confidence) * math.sqrt(var_pos / m + var_neg / n)
    return Interval(estimate, max(0.0, estimate - half), min(1.0, estimate + half), m + n, confidence)


def spearman(a: object, b: object) -> float:
    """Spearman's rank correlation: the Pearson correlation of the midranks of ``a`` and ``b`` (ties averaged,
    as scipy.stats.spearmanr). ValueError for fewer than 2 values or a constant input (undefined)."""
    x, y = as_vector(a, "a"), as_vector(b, "b")
    if x.size != y.size:
        raise ValueError(f"a has {x.size} values but b has {y.size}")
    if x.size < 2:
        raise ValueError(f"a rank correlation needs at least 2 values, got {x.size}")
    for name, v in (("a", x), ("b", y)):
        if np.all(v == v[0]):
            raise ValueError(f"{name} is constant: the rank correlation is undefined")
    rx, ry = midranks(x), midranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def auroc_null_std(n_pos: int, n_neg: int) -> float:
    """Standard deviation of the AUROC of a score independent of the labels (no ties):
    sqrt((n_+ + n_- + 1) / (12 n_+ n_-)) (Mann-Whitney: Var U = n_+ n_- (n_+ + n_- + 1) / 12)."""
    n_pos, n_neg = check_count(n_pos, "n_pos"), check_count(n_neg, "n_neg")
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def spearman_null_std(n: int) -> float:
    """Standard deviation of Spearman's rho between independent continuous variables: 1 / sqrt(n - 1)."""
    n = check_count(n, "n")
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    return 1.0 / math.sqrt(n - 1)
