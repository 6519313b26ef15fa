"""SigmaSampler plugins: the distribution of training noise levels p(sigma) of the loss (paper eq. 1).

- :class:`LogNormal`: EDM's ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1).
- :class:`DDPMUniform`: t ~ U{1..T}, sigma = sigma_t of the linear-beta DDPM schedule (Ho et al. 2020).
- :class:`Gap`: the base distribution with closed sigma bands removed and the rest renormalised (paper Section 5).
- :class:`Reweighted`: the base distribution with the loss inside bands multiplied by a factor in [0, 1].
- :class:`DangerZoneGap`: a Gap whose band is the dataset's danger zone, computed from the data at setup.

Every sampler draws by inverse transform from one uniform per sample, so a Gap samples exactly from the
renormalised distribution with no rejection loop. Samplers hold no random state: the caller passes a seeded
``torch.Generator``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, NamedTuple

import torch

from calmwild.checks import check_count
from calmwild.geometry.zone import check_gap_options, danger_zone, gap_band, paper_buffer_margin
from calmwild.schedule import ddpm_sigmas, sigma_to_timestep, timestep_to_sigma
from calmwild.settings import GeometrySettings

Unit = Literal["sigma", "timestep"]

# The largest float64 below 1: draws use uniforms in (0, 1) so a quantile never sees 1 (ln-normal quantile(1) = inf).
_BELOW_ONE = math.nextafter(1.0, 0.0)


class SigmaDraw(NamedTuple):
    """Noise levels [n] and the extra per-sample loss factor [n] (1 except under :class:`Reweighted`)."""

    sigma: torch.Tensor
    weight: torch.Tensor


class SigmaSampler(ABC):
    """A distribution of positive noise levels, sampled by inverse transform."""

    is_discrete: bool = False

    def sample(self, n: int, generator: torch.Generator) -> SigmaDraw:
        """``n`` draws as float32 tensors on the generator's device; one uniform per draw from ``generator``."""
        n = check_count(n, "n")
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
        sigma = self._sigma_from_uniform(u)
        return SigmaDraw(sigma.to(torch.float32), self.weight(sigma).to(torch.float32))

    def _sigma_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        # u in [0, 1): 1 - u lies in (0, 1]; capping it below 1 keeps an unbounded quantile finite.
        return self.quantile((1.0 - u).clamp(max=_BELOW_ONE))

    @abstractmethod
    def cdf(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """P(S <= sigma), float64."""

    def cdf_below(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """P(S < sigma); equals :meth:`cdf` for continuous distributions."""
        return self.cdf(sigma)

    @abstractmethod
    def quantile(self, u: torch.Tensor | float) -> torch.Tensor:
        """inf{s : cdf(s) >= u} for u in (0, 1], float64."""

    def mass(self, low: float, high: float) -> float:
        """P(low <= S <= high)."""
        if not low <= high:
            raise ValueError(f"mass needs low <= high, got low={low}, high={high}")
        return float(self.cdf(high) - self.cdf_below(low))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Extra loss factor at ``sigma`` (1 by default)."""
        return torch.ones_like(sigma, dtype=torch.float64)

    def atoms(self) -> torch.Tensor:
        """The support of a discrete sampler, increasing, float64 (``is_discrete`` samplers only)."""
        raise TypeError(f"{type(self).__name__} is continuous (is_discrete is False): it has no atoms")

    def probs(self) -> torch.Tensor:
        """The probability of each atom, float64, summing to 1 (``is_discrete`` samplers only)."""
        raise TypeError(f"{type(self).__name__} is continuous (is_discrete is False): it has no atom probabilities")

    def prepare(self, train_images: torch.Tensor, heldout_images: torch.Tensor) -> dict | None:
        """Hook for samplers that depend on the data (called once before training); returns a log record."""
        return None

    def state_dict(self) -> dict:
        """Whatever :meth:`prepare` computed, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""

    def describe(self) -> dict:
        """JSON-able description: class and parameters."""
        return {"class": type(self).__name__}


def _as_f64(x: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _probability_levels(u: torch.Tensor | float) -> torch.Tensor:
    """``u`` as float64, checked to lie in (0, 1] (the domain of a quantile function)."""
    u = _as_f64(u)
    bad = ~((u > 0) & (u <= 1))
    if torch.any(bad):
        raise ValueError(f"quantile levels must lie in (0, 1], got {u[bad].reshape(-1)[:5].tolist()}")
    return u


class LogNormal(SigmaSampler):
    """EDM's training distribution: ln(sigma) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1).

    Args:
        p_mean: mean of ln(sigma) (EDM: -1.2).
        p_std: standard deviation of ln(sigma) (EDM: 1.2).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        if not math.isfinite(p_mean):
            raise ValueError(f"p_mean must be finite, got {p_mean}")
        if not (math.isfinite(p_std) and p_std > 0):
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def cdf(self, sigma):
        """Phi((ln sigma - p_mean) / p_std), as erfc(-z / sqrt 2) / 2: accurate relative to the value in the lower
        tail, where ``torch.special.ndtr`` underflows to 0 already near z = -8.4."""
        s = _as_f64(sigma)
        z = (torch.log(s.clamp_min(1e-300)) - self.p_mean) / self.p_std
        return torch.where(s > 0, 0.5 * torch.special.erfc(-z / math.sqrt(2.0)), torch.zeros_like(s))

    def quantile(self, u):
        """exp(p_mean + p_std * Phi^-1(u)); quantile(1) = inf."""
        return torch.exp(self.p_mean + self.p_std * torch.special.ndtri(_probability_levels(u)))

    def describe(self) -> dict:
        return {"class": "LogNormal", "p_mean": self.p_mean, "p_std": self.p_std}


class DDPMUniform(SigmaSampler):
    """DDPM's timestep distribution mapped to sigma: t ~ U{1..T}, sigma = sqrt((1 - abar_t) / abar_t), beta linear
    from beta_start to beta_end (Ho et al. 2020). Discrete, with T atoms of mass 1/T.

    Args:
        T: number of timesteps.
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
    """

    is_discrete = True

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if isinstance(T, bool) or not float(T).is_integer():
            raise ValueError(f"T must be a whole number of timesteps, got {T!r}")
        self._sigmas = ddpm_sigmas(int(T), beta_start, beta_end)
        self.T, self.beta_start, self.beta_end = int(T), float(beta_start), float(beta_end)
        # cdf values k / T computed exactly as cdf() computes them, so quantile() is its exact generalised inverse
        self._cdf_grid = torch.arange(1, self.T + 1, dtype=torch.float64) / self.T

    def atoms(self) -> torch.Tensor:
        """The support: sigma_1 < ... < sigma_T."""
        return self._sigmas.clone()

    def probs(self) -> torch.Tensor:
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def cdf(self, sigma):
        s = _as_f64(sigma)
        atoms = self._sigmas.to(s.device)
        return torch.searchsorted(atoms, s.reshape(-1), right=True).reshape(s.shape).double() / self.T

    def cdf_below(self, sigma):
        s = _as_f64(sigma)
        atoms = self._sigmas.to(s.device)
        return torch.searchsorted(atoms, s.reshape(-1), right=False).reshape(s.shape).double() / self.T

    def quantile(self, u):
        """The first atom whose cdf k / T is >= u (searched on the same float values cdf() returns)."""
        u = _probability_levels(u)
        index = torch.searchsorted(self._cdf_grid.to(u.device), u.reshape(-1)).clamp(0, self.T - 1).reshape(u.shape)
        return self._sigmas.to(u.device)[index]

    def describe(self) -> dict:
        return {"class": "DDPMUniform", "T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}


class _Bands:
    """Validated closed bands, merged where they overlap or touch, in the given unit and in sigma.

    ``given``: the validated pairs as passed (unmerged, in order); ``merged``: the merged bands in the given unit;
    ``sigma``: the same bands in sigma. A whole-number timestep edge t maps to the schedule's own sigma_t
    (entry t - 1 of :func:`calmwild.schedule.ddpm_sigmas`) so a closed timestep band holds exactly its atoms
    t = low..high; a fractional edge is interpolated in log sigma (:func:`calmwild.schedule.timestep_to_sigma`).
    """

    def __init__(self, bands, unit: str, T: int, beta_start: float, beta_end: float):
        if unit not in ("sigma", "timestep"):
            raise ValueError(f"unit must be 'sigma' or 'timestep', got {unit!r}")
        if not isinstance(bands, (list, tuple)) or len(bands) == 0:
            raise ValueError(f"bands must be a non-empty list of [low, high] pairs, got {bands!r}")
        pairs = []
        for band in bands:
            if not isinstance(band, (list, tuple)) or len(band) != 2:
                raise ValueError(f"each band must be a [low, high] pair, got {band!r} in bands {bands!r}")
            low, high = float(band[0]), float(band[1])
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"band {list(band)} has a non-finite edge")
            if low < 0 or high < 0:
                raise ValueError(f"band {list(band)} has a negative edge; {unit} values must be >= 0")
            if low > high:
                raise ValueError(f"band {list(band)} is inverted: low {low} > high {high}")
            if unit == "timestep" and not (1 <= low and high <= T):
                raise ValueError(f"timestep band {list(band)} must lie within [1, {T}]")
            pairs.append((low, high))
        self.unit = unit
        self.given = [list(p) for p in pairs]
        merged: list[list[float]] = []
        for low, high in sorted(pairs):  # overlapping or touching bands are merged into one
            if merged and low <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.merged = merged
        if unit == "timestep":
            atoms = ddpm_sigmas(T, beta_start, beta_end)

            def to_sigma(t: float) -> float:
                if t.is_integer():
                    return float(atoms[int(t) - 1])
                return float(timestep_to_sigma(t, T, beta_start, beta_end))

            self.sigma = [(to_sigma(lo), to_sigma(hi)) for lo, hi in merged]
        else:
            self.sigma = [(lo, hi) for lo, hi in merged]
        self.T, self.beta_start, self.beta_end = T, beta_start, beta_end

    def index_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the band holding each sigma, -1 outside all bands."""
        index = torch.full(sigma.shape, -1, dtype=torch.long, device=sigma.device)
        for k, (low, high) in enumerate(self.sigma):
            index[(sigma >= low) & (sigma <= high)] = k
        return index

    def describe(self) -> list[dict]:
        """Each band in sigma and in (fractional) DDPM timesteps of the schedule T / beta_start / beta_end; an edge
        outside [sigma_1, sigma_T] has no timestep and is reported as None (sigma_to_timestep would clamp it)."""
        schedule = ddpm_sigmas(self.T, self.beta_start, self.beta_end)

        def timestep(s: float) -> float | None:
            if not float(schedule[0]) <= s <= float(schedule[-1]):
                return None
            return float(sigma_to_timestep(s, self.T, self.beta_start, self.beta_end))

        return [{"sigma": [lo, hi], "timestep": [timestep(lo), timestep(hi)]} for lo, hi in self.sigma]


def _check_base(base: SigmaSampler, unit: str, T: int, beta_start: float, beta_end: float) -> None:
    """``base`` is a sampler and, for timestep bands over a DDPMUniform (possibly wrapped by Gap / Reweighted),
    both use the same DDPM schedule."""
    if not isinstance(base, SigmaSampler):
        raise TypeError(f"base must be a SigmaSampler, got {type(base).__name__}")
    inner = base
    while not isinstance(inner, DDPMUniform) and isinstance(getattr(inner, "base", None), SigmaSampler):
        inner = inner.base
    if unit == "timestep" and isinstance(inner, DDPMUniform) and (inner.T, inner.beta_start, inner.beta_end) != (
        T, beta_start, beta_end
    ):
        raise ValueError(
            f"timestep bands use the schedule T={T}, beta {beta_start}..{beta_end} but the DDPMUniform base has "
            f"T={inner.T}, beta {inner.beta_start}..{inner.beta_end}: set the same values on both"
        )


MIN_BAND_MASS = 1e-5  # a band removing less base mass than this does nothing measurable: refused as a likely typo


def _band_cdf_spans(base: SigmaSampler, bands: _Bands) -> list[tuple[float, float]]:
    """(P(S < low), P(S <= high)) of the base for each band; a band without base mass is an error (it would do
    nothing, which almost surely means a unit mistake)."""
    spans = []
    for (low, high), given in zip(bands.sigma, bands.merged):
        lo_u, hi_u = float(base.cdf_below(low)), float(base.cdf(high))
        if hi_u - lo_u <= MIN_BAND_MASS:
            raise ValueError(
                f"band {given} ({bands.unit}; sigma [{low:.6g}, {high:.6g}]) holds "
                + ("no mass" if hi_u - lo_u <= 0 else f"only {hi_u - lo_u:.2g} of the mass (<= {MIN_BAND_MASS:g})")
                + f" of the base {type(base).__name__}: it lies (almost) outside "
                "the base's support, which is almost surely a unit mistake"
                + (" - did you mean unit: timestep?" if bands.unit == "sigma" and high >= 10 else "")
            )
        if bands.unit == "sigma" and base.is_discrete and high > float(base.quantile(1.0)) * (1 + 1e-9):
            raise ValueError(
                f"band {given} (sigma) reaches past the largest noise level of the base "
                f"({float(base.quantile(1.0)):.4g});"
                " a band given in DDPM timesteps needs unit: timestep"
            )
        spans.append((lo_u, hi_u))
    return spans


class Gap(SigmaSampler):
    """The base distribution with closed bands removed and the remaining mass renormalised (paper Section 5).

    Exact sampling by inverse transform: a uniform is drawn on the kept part of [0, 1] in the base's CDF space and
    mapped through the base quantile; for a discrete base this drops exactly the atoms inside the bands. Bands are
    given in sigma or, with ``unit: timestep``, in DDPM timesteps (converted with the schedule T / beta_start /
    beta_end). Overlapping bands are merged.

    Args:
        base: the distribution to cut.
        bands: closed intervals [[low, high], ...] to remove.
        unit: ``sigma`` or ``timestep``.
        T: DDPM timesteps (for unit timestep).
        beta_start: DDPM schedule's first beta (for unit timestep).
        beta_end: DDPM schedule's last beta (for unit timestep).
    """

    def __init__(
        self,
        base: SigmaSampler,
        bands: list[list[float]],
        unit: Unit = "sigma",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        _check_base(base, unit, T, beta_start, beta_end)
        self.base = base
        self.is_discrete = base.is_discrete
        self._set_bands(_Bands(bands, unit, T, beta_start, beta_end))

    def _set_bands(self, bands: _Bands) -> None:
        kept, cursor = [], 0.0
        for lo_u, hi_u in _band_cdf_spans(self.base, bands):
            if lo_u > cursor:
                kept.append((cursor, lo_u))
            cursor = max(cursor, hi_u)
        if cursor < 1.0:
            kept.append((cursor, 1.0))
        kept = [(a, b) for a, b in kept if b - a > 1e-15]
        total = sum(b - a for a, b in kept)
        if total <= 1e-12:
            raise ValueError(
                f"the bands {bands.given} ({bands.unit}) remove all the mass of {type(self.base).__name__}: "
                "nothing would be left to train on"
            )
        self.bands = bands
        self._kept = kept
        self._kept_mass = total

    @property
    def kept_mass(self) -> float:
        """Base probability outside the bands."""
        return self._kept_mass

    def cdf(self, sigma):
        s = _as_f64(sigma)
        base_u = self.base.cdf(s)
        return self._kept_cdf(base_u)

    def cdf_below(self, sigma):
        return self._kept_cdf(self.base.cdf_below(_as_f64(sigma)))

    def _kept_cdf(self, base_u: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(base_u)
        for a, b in self._kept:
            out += (base_u.clamp(a, b) - a)
        return out / self._kept_mass

    def quantile(self, u):
        """Walks u * kept_mass along the kept intervals (a_k, b_k] of the base's CDF space and maps the point
        through the base quantile. The point is clamped into (a_k, b_k] -- strictly above a_k, which is the base
        CDF at a band's upper edge -- so rounding can never map it onto an atom inside a band."""
        target = _probability_levels(u) * self._kept_mass
        lows = torch.tensor([a for a, _ in self._kept], dtype=torch.float64, device=target.device)
        highs = torch.tensor([b for _, b in self._kept], dtype=torch.float64, device=target.device)
        lengths = highs - lows
        ends = torch.cumsum(lengths, 0)
        k = torch.searchsorted(ends, target.reshape(-1)).clamp(max=len(self._kept) - 1).reshape(target.shape)
        v = lows[k] + (target - (ends[k] - lengths[k]))
        v = torch.maximum(torch.minimum(v, highs[k]), torch.nextafter(lows[k], highs[k]))
        return self.base.quantile(v.clamp(max=1.0))

    def weight(self, sigma):
        return self.base.weight(sigma)

    def atoms(self) -> torch.Tensor:
        """The base's atoms outside every band (a discrete base only)."""
        atoms = self.base.atoms()
        return atoms[self.bands.index_of(atoms) < 0]

    def probs(self) -> torch.Tensor:
        """The base's probabilities of :meth:`atoms`, renormalised to sum to 1."""
        atoms = self.base.atoms()
        kept = self.base.probs()[self.bands.index_of(atoms) < 0]
        return kept / kept.sum()

    def describe(self) -> dict:
        return {"class": type(self).__name__, "base": self.base.describe(), "bands": self.bands.describe(),
                "unit": self.bands.unit, "kept_mass": self._kept_mass}


class Reweighted(SigmaSampler):
    """The base distribution unchanged, with the loss inside each band multiplied by its factor (a soft gap).

    Args:
        base: the sigma distribution.
        bands: closed intervals [[low, high], ...].
        factors: one factor in [0, 1] for all bands, or one per band.
        unit: ``sigma`` or ``timestep``.
        T: DDPM timesteps (for unit timestep).
        beta_start: DDPM schedule's first beta (for unit timestep).
        beta_end: DDPM schedule's last beta (for unit timestep).
    """

    def __init__(
        self,
        base: SigmaSampler,
        bands: list[list[float]],
        factors: float | list[float] = 0.1,
        unit: Unit = "sigma",
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        _check_base(base, unit, T, beta_start, beta_end)
        self.base = base
        self.is_discrete = base.is_discrete
        self.bands = _Bands(bands, unit, T, beta_start, beta_end)
        _band_cdf_spans(base, self.bands)  # a band without mass would reweight nothing: a unit mistake
        given = self.bands.given
        if isinstance(factors, (list, tuple)) and len(factors) != 1:
            values = [float(f) for f in factors]
            if len(values) != len(given):
                raise ValueError(
                    f"got {len(values)} factors {list(factors)} for {len(given)} bands {given}; give one factor "
                    "or one per band"
                )
            if len(self.bands.merged) != len(given):  # merging would lose the pairing of bands and factors
                raise ValueError(f"bands {given} overlap or touch; per-band factors need disjoint bands")
            values = [values[i] for i in sorted(range(len(given)), key=lambda i: given[i][0])]
        else:
            single = factors[0] if isinstance(factors, (list, tuple)) else factors
            values = [float(single)] * len(self.bands.merged)
        for f in values:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"reweight factor {f} is outside [0, 1]")
        self.factors = values  # aligned with self.bands.sigma (sorted by lower edge)

    def cdf(self, sigma):
        return self.base.cdf(sigma)

    def cdf_below(self, sigma):
        return self.base.cdf_below(sigma)

    def quantile(self, u):
        return self.base.quantile(u)

    def atoms(self) -> torch.Tensor:
        return self.base.atoms()

    def probs(self) -> torch.Tensor:
        return self.base.probs()

    def weight(self, sigma):
        s = _as_f64(sigma)
        index = self.bands.index_of(s)
        table = torch.tensor(self.factors + [1.0], dtype=torch.float64, device=s.device)
        return table[index] * self.base.weight(s)

    def describe(self) -> dict:
        return {"class": "Reweighted", "base": self.base.describe(), "bands": self.bands.describe(),
                "factors": self.factors, "unit": self.bands.unit}


class DangerZoneGap(Gap):
    """A :class:`Gap` whose band is the dataset's danger zone, found from the data alone before training
    (paper Section 4.2.3 and App. E.4): the sigma band where both the expected max posterior weight (Def. 4.1) and
    the Gaussian-shell coverage (Def. 4.6) are at least their levels (:func:`calmwild.geometry.danger_zone`).

    The band is computed by :meth:`prepare` (the training module calls it once at setup, on rank 0, and broadcasts
    the result), turned into the gap by :func:`calmwild.geometry.gap_band` (widened by ``margin`` on each side in
    log sigma, as the paper's CelebA gaps add a buffer around the zone; an empty zone is an error, or with
    ``if_empty: crossing`` a band around the curves' crossing point), stored in checkpoints and logged.

    Args:
        base: the distribution to cut.
        geometry: sizes and levels of the geometry estimate (:class:`calmwild.settings.GeometrySettings`; the
            weight curve uses ``num_points`` x ``num_noises``, the coverage ``num_queries`` x
            ``num_coverage_noises``, on ``num_levels`` noise levels).
        margin: multiplicative widening of the band in sigma (band [a, b] becomes [a / margin, b * margin]), >= 1;
            ``paper``: the paper's buffer (:func:`calmwild.geometry.zone.paper_buffer_margin`, about 1.19).
        if_empty: ``error`` or ``crossing`` (see above).
    """

    def __init__(
        self,
        base: SigmaSampler,
        geometry: GeometrySettings = GeometrySettings(),
        margin: float | Literal["paper"] = 1.0,
        if_empty: Literal["error", "crossing"] = "error",
    ):
        _check_base(base, "sigma", 1000, 1e-4, 0.02)
        if margin == "paper":
            margin = paper_buffer_margin()
        check_gap_options(margin, if_empty)
        self.base = base
        self.is_discrete = base.is_discrete
        self.geometry = geometry
        self.settings = {**geometry.to_dict(), "margin": margin, "if_empty": if_empty}
        self.zone: dict | None = None
        self._kept = None

    def _require_prepared(self) -> None:
        if self._kept is None:
            raise RuntimeError("DangerZoneGap has no band yet: call prepare(train_images, heldout_images) first")

    def prepare(self, train_images: torch.Tensor, heldout_images: torch.Tensor) -> dict:
        from calmwild.geometry.shells import shell_coverage
        from calmwild.geometry.weights import posterior_weight_curves

        g = self.geometry
        sigmas = g.sigma_grid()
        weight = posterior_weight_curves(train_images, sigmas, num_points=min(g.num_points, len(train_images)),
                                         num_noises=g.num_noises, seed=g.seed)
        coverage = shell_coverage(train_images, heldout_images, sigmas,
                                  num_queries=min(g.num_queries, len(heldout_images)),
                                  num_noises=g.num_coverage_noises, t=g.t, seed=g.seed + 1)
        zone = danger_zone(sigmas, weight.max_weight, coverage.coverage, g.weight_level, g.coverage_level)
        band = gap_band(zone, self.settings["margin"], self.settings["if_empty"])
        self.load_state_dict({"band": list(band), "zone": zone.to_dict()})
        return {"danger_zone": self.zone, "gap_band_sigma": self.bands.sigma[0], "kept_mass": self.kept_mass}

    def state_dict(self) -> dict:
        self._require_prepared()
        return {"band": list(self.bands.sigma[0]), "zone": self.zone}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "band" not in state:
            raise ValueError(f"a DangerZoneGap state needs a 'band' entry [low, high] in sigma, got {state!r}")
        self._set_bands(_Bands([state["band"]], "sigma", 1000, 1e-4, 0.02))
        self.zone = state.get("zone")

    def quantile(self, u):
        self._require_prepared()
        return super().quantile(u)

    def cdf(self, sigma):
        self._require_prepared()
        return super().cdf(sigma)

    def cdf_below(self, sigma):
        self._require_prepared()
        return super().cdf_below(sigma)

    @property
    def kept_mass(self) -> float:
        self._require_prepared()
        return self._kept_mass

    def atoms(self) -> torch.Tensor:
        self._require_prepared()
        return super().atoms()

    def probs(self) -> torch.Tensor:
        self._require_prepared()
        return super().probs()

    def describe(self) -> dict:
        if self._kept is None:
            return {"class": "DangerZoneGap", "base": self.base.describe(), "settings": self.settings,
                    "prepared": False}
        return {**super().describe(), "settings": self.settings, "danger_zone": self.zone, "prepared": True}
