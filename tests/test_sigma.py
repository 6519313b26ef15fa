"""Tests of calmwild.sigma against independent computations.

Distributions are checked on 10^5 seeded draws with Kolmogorov-Smirnov / chi-square tests against scipy (a fixed
seed makes each test deterministic; the p-value floor 1e-3 is what a correct sampler passes 99.9% of the time), CDFs
and kept masses against closed forms from scipy.stats.norm and a numpy DDPM schedule written here.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from calmwild.schedule import sigma_to_timestep
from calmwild.settings import GeometrySettings
from calmwild.sigma import DangerZoneGap, DDPMUniform, Gap, LogNormal, Reweighted, SigmaSampler

N_DRAWS = 100_000
P_FLOOR = 1e-3
CELEBA_BAND = [100, 350]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def numpy_ddpm_sigmas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), abar_t = prod_{s<=t} (1 - beta_s), beta linear (Ho et al. 2020)."""
    abar = np.cumprod(1.0 - np.linspace(beta_start, beta_end, T))
    return np.sqrt((1.0 - abar) / abar)


def draw_timesteps(sampler: SigmaSampler, seed: int = 0, n: int = N_DRAWS) -> np.ndarray:
    """Draws mapped back to integer DDPM timesteps (checking that every draw is an atom)."""
    sigma = sampler.sample(n, gen(seed)).sigma
    t = sigma_to_timestep(sigma.double()).numpy()
    rounded = np.rint(t)
    assert np.max(np.abs(t - rounded)) < 1e-3, "a draw is not a DDPM atom"
    return rounded.astype(np.int64)


def gapped_normal_cdf(x: np.ndarray, mu: float, sd: float, log_bands: list[tuple[float, float]]) -> np.ndarray:
    """CDF of N(mu, sd^2) with disjoint closed intervals removed and renormalised (independent of calmwild)."""
    norm = stats.norm(mu, sd)
    removed_below = np.zeros_like(x)
    removed_total = 0.0
    for a, b in log_bands:
        removed_below += np.clip(norm.cdf(np.minimum(x, b)) - norm.cdf(a), 0.0, None)
        removed_total += norm.cdf(b) - norm.cdf(a)
    return (norm.cdf(x) - removed_below) / (1.0 - removed_total)


# ------------------------------------------------------------------------------------------- base distributions


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.4, 0.3)])
def test_lognormal_matches_normal_in_log_sigma(p_mean, p_std):
    draw = LogNormal(p_mean, p_std).sample(N_DRAWS, gen(1))
    assert draw.sigma.dtype == torch.float32 and draw.sigma.shape == (N_DRAWS,)
    assert torch.all(draw.sigma > 0) and torch.all(torch.isfinite(draw.sigma))
    assert torch.equal(draw.weight, torch.ones(N_DRAWS))
    result = stats.kstest(np.log(draw.sigma.double().numpy()), stats.norm(p_mean, p_std).cdf)
    assert result.pvalue > P_FLOOR, result


def test_lognormal_cdf_against_scipy():
    sampler = LogNormal(-1.2, 1.2)
    s = np.geomspace(1e-3, 200.0, 57)
    expected = stats.norm.cdf((np.log(s) + 1.2) / 1.2)
    np.testing.assert_allclose(sampler.cdf(torch.from_numpy(s)).numpy(), expected, rtol=1e-12, atol=1e-15)
    assert float(sampler.cdf(0.0)) == 0.0
    assert sampler.mass(0.1, 2.0) == pytest.approx(
        stats.norm.cdf((math.log(2.0) + 1.2) / 1.2) - stats.norm.cdf((math.log(0.1) + 1.2) / 1.2), abs=1e-13
    )


def test_ddpm_uniform_atoms_and_chi_square():
    sampler = DDPMUniform()
    np.testing.assert_allclose(sampler.atoms().numpy(), numpy_ddpm_sigmas(), rtol=1e-12)
    t = draw_timesteps(sampler, seed=2)
    assert t.min() >= 1 and t.max() <= 1000
    counts = np.bincount(t, minlength=1001)[1:]
    result = stats.chisquare(counts)  # uniform over all 1000 timesteps
    assert result.pvalue > P_FLOOR, result


# --------------------------------------------------------------------------------------------------------- Gap


def test_gap_lognormal_matches_truncated_normal():
    band = (0.2, 0.8)
    sampler = Gap(LogNormal(-1.2, 1.2), [list(band)])
    draw = sampler.sample(N_DRAWS, gen(3))
    s = draw.sigma.double().numpy()
    assert not np.any((s >= band[0]) & (s <= band[1]))
    log_band = [(math.log(band[0]), math.log(band[1]))]
    result = stats.kstest(np.log(s), lambda x: gapped_normal_cdf(x, -1.2, 1.2, log_band))
    assert result.pvalue > P_FLOOR, result
    # the sampler's own CDF agrees with the independent one
    x = np.linspace(-6.0, 4.0, 41)
    np.testing.assert_allclose(
        sampler.cdf(torch.from_numpy(np.exp(x))).numpy(), gapped_normal_cdf(x, -1.2, 1.2, log_band), atol=1e-12
    )


def test_gap_ddpm_celeba_band():
    sampler = Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep")
    assert sampler.kept_mass == 749 / 1000
    assert sampler.is_discrete
    t = draw_timesteps(sampler, seed=4)
    assert not np.any((t >= 100) & (t <= 350))
    kept = np.r_[1:100, 351:1001]
    assert kept.size == 749
    counts = np.bincount(t, minlength=1001)[kept]
    assert counts.sum() == N_DRAWS
    result = stats.chisquare(counts)  # uniform over the remaining 749 timesteps
    assert result.pvalue > P_FLOOR, result


def test_gap_timestep_band_holds_exactly_its_atoms():
    """A closed timestep band [a, b] removes the atoms a..b, both edges included, for any a <= b."""
    atoms = DDPMUniform().atoms()
    for a, b in [(1, 1), (8, 8), (8, 58), (57, 57), (100, 350), (999, 1000), (1, 999)]:
        sampler = Gap(DDPMUniform(), [[a, b]], unit="timestep")
        assert sampler.kept_mass == pytest.approx((1000 - (b - a + 1)) / 1000, abs=1e-14), (a, b)
        pmf = sampler.cdf(atoms) - sampler.cdf_below(atoms)
        inside = torch.zeros(1000, dtype=torch.bool)
        inside[a - 1 : b] = True
        assert torch.all(pmf[inside] == 0), (a, b)
        torch.testing.assert_close(pmf[~inside], torch.full((int((~inside).sum()),), 1 / (1000 - (b - a + 1)),
                                                            dtype=torch.float64), rtol=1e-12, atol=0)


def test_gap_timestep_band_on_lognormal_against_numpy_schedule():
    sampler = Gap(LogNormal(), [CELEBA_BAND], unit="timestep")
    sig = numpy_ddpm_sigmas()
    lo, hi = sig[99], sig[349]
    assert 0.3 < lo < 0.4 and 1.4 < hi < 1.8  # paper Section 5: t=100 -> ~0.34, t=350 -> ~1.6
    removed = stats.norm.cdf((math.log(hi) + 1.2) / 1.2) - stats.norm.cdf((math.log(lo) + 1.2) / 1.2)
    assert sampler.kept_mass == pytest.approx(1.0 - removed, abs=1e-12)
    s = sampler.sample(N_DRAWS, gen(5)).sigma.double().numpy()
    assert not np.any((s >= lo) & (s <= hi))


def test_gap_two_bands():
    bands = [[1.0, 2.0], [0.05, 0.1]]  # unsorted on purpose
    sampler = Gap(LogNormal(-1.2, 1.2), bands)
    log_bands = sorted((math.log(a), math.log(b)) for a, b in bands)
    norm = stats.norm(-1.2, 1.2)
    assert sampler.kept_mass == pytest.approx(1.0 - sum(norm.cdf(b) - norm.cdf(a) for a, b in log_bands), abs=1e-12)
    s = sampler.sample(N_DRAWS, gen(6)).sigma.double().numpy()
    for a, b in bands:
        assert not np.any((s >= a) & (s <= b))
    result = stats.kstest(np.log(s), lambda x: gapped_normal_cdf(x, -1.2, 1.2, log_bands))
    assert result.pvalue > P_FLOOR, result

    ddpm = Gap(DDPMUniform(), [[300, 350], [100, 200]], unit="timestep")
    assert ddpm.kept_mass == pytest.approx((1000 - 101 - 51) / 1000, abs=1e-14)
    t = draw_timesteps(ddpm, seed=7)
    assert not np.any(((t >= 100) & (t <= 200)) | ((t >= 300) & (t <= 350)))
    assert np.any((t > 200) & (t < 300))


def test_gap_overlapping_bands_are_merged():
    merged = Gap(LogNormal(), [[0.4, 1.0], [0.2, 0.6], [1.0, 1.5]])  # overlapping and touching
    single = Gap(LogNormal(), [[0.2, 1.5]])
    assert merged.bands.sigma == [(0.2, 1.5)]
    assert merged.kept_mass == single.kept_mass
    assert torch.equal(merged.sample(1000, gen(8)).sigma, single.sample(1000, gen(8)).sigma)
    assert len(merged.describe()["bands"]) == 1

    ddpm = Gap(DDPMUniform(), [[100, 250], [200, 350]], unit="timestep")
    assert ddpm.kept_mass == 749 / 1000
    assert ddpm.describe()["bands"][0]["timestep"] == pytest.approx(CELEBA_BAND, abs=1e-6)


def test_gap_removing_a_tail():
    sampler = Gap(LogNormal(-1.2, 1.2), [[0.0, 0.05]])
    assert sampler.kept_mass == pytest.approx(stats.norm.sf((math.log(0.05) + 1.2) / 1.2), abs=1e-12)
    assert float(sampler.sample(N_DRAWS, gen(9)).sigma.min()) > 0.05


def test_gap_passes_base_weight_through():
    inner = Reweighted(LogNormal(), [[0.5, 1.0]], factors=0.25)
    sampler = Gap(inner, [[0.05, 0.1]])
    draw = sampler.sample(20_000, gen(10))
    s = draw.sigma.double()
    expected = torch.where((s >= 0.5) & (s <= 1.0), 0.25, 1.0).float()
    assert torch.equal(draw.weight, expected)


# -------------------------------------------------------------------------------------------------- Reweighted


def test_reweighted_keeps_base_distribution_and_sets_factors():
    base = LogNormal()
    sampler = Reweighted(base, [[0.5, 1.0]], factors=0.1)
    draw, base_draw = sampler.sample(N_DRAWS, gen(11)), base.sample(N_DRAWS, gen(11))
    assert torch.equal(draw.sigma, base_draw.sigma)
    inside = (draw.sigma.double() >= 0.5) & (draw.sigma.double() <= 1.0)
    assert 0 < int(inside.sum()) < N_DRAWS
    assert torch.equal(draw.weight[inside], torch.full((int(inside.sum()),), np.float32(0.1)))
    assert torch.all(draw.weight[~inside] == 1.0)
    s = torch.from_numpy(np.geomspace(0.01, 10, 33))
    torch.testing.assert_close(sampler.cdf(s), base.cdf(s), rtol=0, atol=0)


def test_reweighted_per_band_factors_follow_their_bands():
    bands = [[1.0, 2.0], [0.05, 0.1]]  # unsorted: factor 0.3 belongs to [1, 2], 0.7 to [0.05, 0.1]
    sampler = Reweighted(LogNormal(), bands, factors=[0.3, 0.7])
    s = torch.tensor([0.01, 0.05, 0.07, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.7, 0.7, 0.7, 1.0, 0.3, 0.3, 0.3, 1.0], dtype=torch.float64)
    assert torch.equal(sampler.weight(s), expected)
    draw = sampler.sample(N_DRAWS, gen(12))
    d = draw.sigma.double()
    for (a, b), f in zip(bands, [0.3, 0.7]):
        inside = (d >= a) & (d <= b)
        assert int(inside.sum()) > 0 and torch.all(draw.weight[inside] == np.float32(f))
    outside = ~(((d >= 1.0) & (d <= 2.0)) | ((d >= 0.05) & (d <= 0.1)))
    assert torch.all(draw.weight[outside] == 1.0)
    # a one-element list is one factor for all bands
    assert Reweighted(LogNormal(), bands, factors=[0.5]).factors == [0.5, 0.5]


def test_reweighted_timestep_band_on_ddpm_weights_exactly_its_atoms():
    sampler = Reweighted(DDPMUniform(), [CELEBA_BAND], factors=0.2, unit="timestep")
    w = sampler.weight(DDPMUniform().atoms())
    t = torch.arange(1, 1001)
    inside = (t >= 100) & (t <= 350)
    assert torch.all(w[inside] == 0.2) and torch.all(w[~inside] == 1.0)
    base_draw = DDPMUniform().sample(N_DRAWS, gen(13))
    draw = sampler.sample(N_DRAWS, gen(13))
    assert torch.equal(draw.sigma, base_draw.sigma)


# ----------------------------------------------------------------------------------------- cdf / quantile / mass


@pytest.mark.parametrize(
    "sampler,bands",
    [
        (LogNormal(), []),
        (LogNormal(0.3, 0.5), []),
        (Gap(LogNormal(), [[0.2, 0.8], [3.0, 5.0]]), [(0.2, 0.8), (3.0, 5.0)]),
    ],
)
def test_continuous_quantile_inverts_cdf(sampler, bands):
    s = torch.from_numpy(np.geomspace(0.01, 20.0, 200))
    outside = torch.ones_like(s, dtype=torch.bool)
    for a, b in bands:
        outside &= ~((s >= a) & (s <= b))
    s = s[outside]
    torch.testing.assert_close(sampler.quantile(sampler.cdf(s)), s, rtol=1e-8, atol=0)
    u = torch.linspace(1e-6, 1 - 1e-6, 101, dtype=torch.float64)
    torch.testing.assert_close(sampler.cdf(sampler.quantile(u)), u, rtol=0, atol=1e-9)
    torch.testing.assert_close(sampler.cdf_below(s), sampler.cdf(s), rtol=0, atol=0)


def _boundary_uniforms(grid: torch.Tensor) -> torch.Tensor:
    """Each cdf value, the next float above and below it, and a random sprinkle."""
    above = torch.nextafter(grid, torch.full_like(grid, 2.0))
    below = torch.nextafter(grid, torch.zeros_like(grid))
    rand = torch.rand(2000, generator=gen(14), dtype=torch.float64).clamp_min(1e-12)
    return torch.cat([grid, above[above <= 1], below[below > 0], rand])


@pytest.mark.parametrize(
    "sampler,tol",
    [
        (DDPMUniform(), 0.0),
        (DDPMUniform(T=50), 0.0),
        # renormalising by kept_mass rounds differently in cdf (divide) and quantile (multiply): a few ulps
        (Gap(DDPMUniform(), [CELEBA_BAND, [900, 990]], unit="timestep"), 1e-15),
    ],
)
def test_discrete_quantile_is_minimal(sampler, tol):
    atoms = DDPMUniform(T=sampler.base.T if isinstance(sampler, Gap) else sampler.T).atoms()
    grid = torch.unique(sampler.cdf(atoms))
    u = _boundary_uniforms(grid[grid > 0])
    q = sampler.quantile(u)
    assert torch.all(torch.isin(q, atoms))
    assert torch.all(sampler.cdf(q) >= u - tol), "quantile(u) has cdf below u"
    assert torch.all(sampler.cdf_below(q) < u + tol), "quantile(u) is not the smallest such atom"
    # away from the jumps the answer is exact: the atom whose cdf interval holds u
    mid = 0.5 * (grid[1:] + grid[:-1])
    q_mid = sampler.quantile(mid)
    assert torch.all(sampler.cdf_below(q_mid) < mid) and torch.all(sampler.cdf(q_mid) > mid)


def test_gap_quantile_never_lands_inside_band_at_boundaries():
    """u just above the kept mass below the band must map to the first atom after the band (t = 351)."""
    sampler = Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep")
    edge = torch.tensor([0.099 / 0.749], dtype=torch.float64)
    u = torch.cat([edge + e for e in (0.0, 1e-17, 1e-16, 1e-15, 1e-13, 1e-12, 1e-10)])
    t = sigma_to_timestep(sampler.quantile(u))
    assert not torch.any((t > 99.5) & (t < 350.5)), t.tolist()


def test_draws_are_finite_even_for_uniform_zero():
    """sample() maps the uniform 0 (possible from torch.rand) to a finite sigma."""
    for sampler in (LogNormal(), Gap(LogNormal(), [[0.2, 0.8]])):
        s = sampler._sigma_from_uniform(torch.zeros(1, dtype=torch.float64))
        assert torch.isfinite(s).all() and s.item() > 0


def test_mass():
    ddpm = DDPMUniform()
    atoms = ddpm.atoms()
    assert ddpm.mass(float(atoms[99]), float(atoms[349])) == pytest.approx(251 / 1000, abs=1e-15)
    assert ddpm.mass(0.0, 1e6) == 1.0
    gap = Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep")
    assert gap.mass(float(atoms[99]), float(atoms[349])) == 0.0
    assert gap.mass(float(atoms[0]), float(atoms[98])) == pytest.approx(99 / 749, abs=1e-14)
    assert gap.mass(0.0, 1e6) == pytest.approx(1.0, abs=1e-14)
    lognormal_gap = Gap(LogNormal(), [[0.2, 0.8]])
    assert lognormal_gap.mass(0.25, 0.5) == 0.0
    with pytest.raises(ValueError, match="low=2.0"):
        ddpm.mass(2.0, 1.0)


# ---------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "build,pattern",
    [
        (lambda: Gap(LogNormal(), [[0.8, 0.2]]), r"\[0\.8, 0\.2\] is inverted"),
        (lambda: Gap(LogNormal(), [[-0.1, 0.5]]), r"\[-0\.1, 0\.5\] has a negative edge"),
        (lambda: Gap(DDPMUniform(), [[0, 350]], unit="timestep"), r"\[0, 350\] must lie within \[1, 1000\]"),
        (lambda: Gap(DDPMUniform(), [[100, 1001]], unit="timestep"), r"\[100, 1001\] must lie within \[1, 1000\]"),
        (lambda: Gap(DDPMUniform(), [[200.0, 300.0]]), r"\[200\.0, 300\.0\].*holds no mass.*DDPMUniform"),
        (lambda: Gap(DDPMUniform(), [[100.2, 100.8]], unit="timestep"), r"\[100\.2, 100\.8\] \(timestep.*no mass"),
        (lambda: Reweighted(DDPMUniform(), [[200.0, 300.0]]), r"\[200\.0, 300\.0\].*holds no mass"),
        (lambda: Gap(DDPMUniform(), [[1, 1000]], unit="timestep"), r"\[\[1\.0, 1000\.0\]\].*remove all the mass"),
        (lambda: Gap(DDPMUniform(), [[1, 500], [501, 1000]], unit="timestep"), r"1000\.0\]\].*remove all the mass"),
        (lambda: Gap(LogNormal(), [[0.0, 1e6]]), r"1000000\.0\]\].*remove all the mass"),
        (lambda: Reweighted(LogNormal(), [[0.2, 0.5]], factors=1.5), r"factor 1\.5 is outside \[0, 1\]"),
        (lambda: Reweighted(LogNormal(), [[0.2, 0.5]], factors=-0.1), r"factor -0\.1 is outside \[0, 1\]"),
        (lambda: Reweighted(LogNormal(), [[0.2, 0.5], [1, 2]], factors=[0.1, 2.0]), r"factor 2\.0 is outside"),
        (lambda: Reweighted(LogNormal(), [[0.2, 0.5], [1, 2]], factors=[0.1, 0.2, 0.3]), r"got 3 factors.*2 bands"),
        (lambda: Reweighted(LogNormal(), [[0.2, 0.5], [0.4, 2]], factors=[0.1, 0.2]), r"overlap"),
        (lambda: Gap(DDPMUniform(T=500), [CELEBA_BAND], unit="timestep"), r"T=1000.*DDPMUniform base has T=500"),
        (lambda: Gap(DDPMUniform(beta_end=0.01), [CELEBA_BAND], unit="timestep"), r"beta 0\.0001\.\.0\.01"),
        (lambda: Reweighted(DDPMUniform(T=500), [CELEBA_BAND], unit="timestep"), r"base has T=500"),
        (lambda: Gap(Gap(DDPMUniform(T=500), [[1, 10]], unit="timestep", T=500), [CELEBA_BAND], unit="timestep"),
         r"base has T=500"),
        (lambda: Gap(LogNormal(), [[0.1, 0.2, 0.3]]), r"\[0\.1, 0\.2, 0\.3\]"),
        (lambda: Gap(LogNormal(), [0.1, 0.5]), r"pair, got 0\.1"),
        (lambda: Gap(LogNormal(), []), r"non-empty.*got \[\]"),
        (lambda: Reweighted(LogNormal(), [[0.1], [0.2, 0.3]], factors=[0.1, 0.2]), r"pair, got \[0\.1\]"),
        (lambda: Gap(LogNormal(), [[0.1, 0.2]], unit="log"), r"'log'"),
        (lambda: LogNormal(p_std=0.0), r"p_std must be positive, got 0\.0"),
        (lambda: LogNormal(p_std=-1.0), r"got -1\.0"),
        (lambda: LogNormal(p_mean=math.inf), r"p_mean must be finite, got inf"),
        (lambda: DDPMUniform(T=10.5), r"T must be a whole number.*10\.5"),
        (lambda: Gap(LogNormal(), [[0.1, math.nan]]), r"non-finite"),
    ],
)


def test_construction_errors(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_type_errors():
    with pytest.raises(TypeError, match="dict"):
        Gap({"class": "LogNormal"}, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        LogNormal().sample(0, gen())


# ------------------------------------------------------------------------------------ reproducibility / describe
ALL_SAMPLERS = [
    LogNormal(),
    DDPMUniform(),
    Gap(LogNormal(), [[0.2, 0.8]]),
    Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep"),
    Reweighted(LogNormal(), [[0.05, 0.1], [1.0, 2.0]], factors=[0.5, 0.25]),
    Reweighted(DDPMUniform(), [CELEBA_BAND], unit="timestep"),
]


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda s: s.describe()["class"])
def test_same_seed_same_draws(sampler):
    a, b = sampler.sample(5000, gen(21)), sampler.sample(5000, gen(21))
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.sigma, sampler.sample(5000, gen(22)).sigma)
    json.loads(json.dumps(sampler.describe()))


def test_describe_reports_bands_in_sigma_and_timesteps():
    sig = numpy_ddpm_sigmas()
    described = json.loads(json.dumps(Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep").describe()))
    assert described["class"] == "Gap" and described["unit"] == "timestep"
    assert described["base"] == {"class": "DDPMUniform", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert described["kept_mass"] == 0.749
    (band,) = described["bands"]
    assert band["sigma"] == pytest.approx([sig[99], sig[349]], rel=1e-12)
    assert band["timestep"] == pytest.approx(CELEBA_BAND, abs=1e-6)

    sigma_band = json.loads(json.dumps(Reweighted(LogNormal(), [[0.5, 1.0]], factors=0.1).describe()))
    assert sigma_band["bands"][0]["sigma"] == [0.5, 1.0]
    t_expected = [float(np.interp(np.log(s), np.log(sig), np.arange(1, 1001))) for s in (0.5, 1.0)]
    assert sigma_band["bands"][0]["timestep"] == pytest.approx(t_expected, abs=1e-9)
    assert sigma_band["factors"] == [0.1]


def test_describe_has_no_timestep_outside_the_ddpm_range():
    """Edges below sigma_1 or above sigma_T have no DDPM timestep: None, not a clamped 1 or T."""
    sig = numpy_ddpm_sigmas()
    (band,) = Gap(LogNormal(), [[0.005, 400.0]]).describe()["bands"]
    assert sig[0] > 0.005 and sig[-1] < 400.0
    assert band["sigma"] == [0.005, 400.0] and band["timestep"] == [None, None]
    (band,) = Gap(LogNormal(), [[0.5, 400.0]]).describe()["bands"]
    assert band["timestep"][0] == pytest.approx(float(np.interp(np.log(0.5), np.log(sig), np.arange(1, 1001))))
    assert band["timestep"][1] is None


# ---------------------------------------------------------------- more Gap distributions (both units, both bases)


def test_gap_ddpm_sigma_band_chi_square():
    """A sigma band on DDPMUniform drops exactly the atoms with sigma_t inside it (numpy schedule)."""
    sig = numpy_ddpm_sigmas()
    band = (0.5, 2.0)
    inside = (sig >= band[0]) & (sig <= band[1])
    sampler = Gap(DDPMUniform(), [list(band)])
    assert sampler.kept_mass == pytest.approx(1.0 - inside.sum() / 1000, abs=1e-14)
    t = draw_timesteps(sampler, seed=40)
    assert not np.any(inside[t - 1])
    counts = np.bincount(t, minlength=1001)[1:][~inside]
    assert counts.sum() == N_DRAWS
    result = stats.chisquare(counts)  # uniform over the kept timesteps
    assert result.pvalue > P_FLOOR, result


def test_gap_lognormal_timestep_band_ks():
    sig = numpy_ddpm_sigmas()
    log_band = [(math.log(sig[99]), math.log(sig[349]))]
    s = Gap(LogNormal(), [CELEBA_BAND], unit="timestep").sample(N_DRAWS, gen(41)).sigma.double().numpy()
    result = stats.kstest(np.log(s), lambda x: gapped_normal_cdf(x, -1.2, 1.2, log_band))
    assert result.pvalue > P_FLOOR, result


# ------------------------------------------------------------------------------------------ atoms / probs


def test_discrete_wrappers_expose_atoms_and_probs():
    sig = numpy_ddpm_sigmas()
    gap = Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep")
    kept_t = np.r_[1:100, 351:1001]
    np.testing.assert_allclose(gap.atoms().numpy(), sig[kept_t - 1], rtol=1e-12)
    torch.testing.assert_close(gap.probs(), torch.full((749,), 1 / 749, dtype=torch.float64), rtol=1e-12, atol=0)
    # the pmf read off the CDF agrees with probs()
    pmf = gap.cdf(gap.atoms()) - gap.cdf_below(gap.atoms())
    torch.testing.assert_close(pmf, gap.probs(), rtol=1e-12, atol=0)
    reweighted = Reweighted(DDPMUniform(), [CELEBA_BAND], factors=0.5, unit="timestep")
    assert reweighted.is_discrete
    assert torch.equal(reweighted.atoms(), DDPMUniform().atoms())
    assert torch.equal(reweighted.probs(), DDPMUniform().probs())


@pytest.mark.parametrize("sampler", [LogNormal(), Gap(LogNormal(), [[0.2, 0.8]]),
                                     Reweighted(LogNormal(), [[0.2, 0.8]], factors=0.5)])


def test_continuous_samplers_have_no_atoms(sampler):
    assert not sampler.is_discrete
    with pytest.raises(TypeError, match="continuous"):
        sampler.atoms()
    with pytest.raises(TypeError, match="continuous"):
        sampler.probs()


@pytest.mark.parametrize("sampler", [LogNormal(), DDPMUniform(), Gap(DDPMUniform(), [CELEBA_BAND], unit="timestep"),
                                     Gap(LogNormal(), [[0.2, 0.8]])], ids=lambda s: s.describe()["class"])


@pytest.mark.parametrize("u,shown", [(0.0, "0.0"), (1.5, "1.5"), (-0.25, "-0.25"), (math.nan, "nan")])
def test_quantile_rejects_levels_outside_unit_interval(sampler, u, shown):
    with pytest.raises(ValueError, match=rf"\(0, 1\], got \[{shown}\]"):
        sampler.quantile(torch.tensor([0.5, u], dtype=torch.float64))


# ------------------------------------------------------------------------------------- LightningCLI YAML


def _instantiate(yaml_text: str) -> SigmaSampler:
    """Build a sampler from YAML the way LightningCLI does (jsonargparse class_path / init_args)."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--sigma_sampler", type=SigmaSampler)
    cfg = parser.parse_string(yaml_text)
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return build(cfg).sigma_sampler


def test_yaml_gap_with_timestep_band():
    sampler = _instantiate(
        """
sigma_sampler:
  class_path: calmwild.sigma.Gap
  init_args:
    base: {class_path: calmwild.sigma.DDPMUniform, init_args: {T: 1000}}
    bands: [[100, 350]]
    unit: timestep
"""
    )
    assert isinstance(sampler, Gap) and isinstance(sampler.base, DDPMUniform)
    assert sampler.kept_mass == 749 / 1000


@pytest.mark.parametrize("factors,expected", [("0.25", [0.25, 0.25]), ("[0.25, 0.5]", [0.25, 0.5])])
def test_yaml_reweighted_factors(factors, expected):
    sampler = _instantiate(
        f"""
sigma_sampler:
  class_path: calmwild.sigma.Reweighted
  init_args:
    base: {{class_path: calmwild.sigma.LogNormal, init_args: {{p_mean: -1.2, p_std: 1.2}}}}
    bands: [[0.05, 0.1], [0.3, 1.6]]
    factors: {factors}
"""
    )
    assert isinstance(sampler, Reweighted) and sampler.factors == expected


# ---------------------------------------------------------------------------------------------- DangerZoneGap
FAST_ZONE = GeometrySettings(num_levels=16, num_points=32, num_noises=8, num_queries=32, num_coverage_noises=8)


def sphere_points(n: int, d: int, generator: torch.Generator, radius: float = 1.0) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator)
    return (radius * x / x.norm(dim=1, keepdim=True)).reshape(n, 1, 1, d)


@pytest.fixture(scope="module")
def sphere_data():
    g = gen(30)
    return sphere_points(64, 256, g), sphere_points(64, 256, g)


@pytest.fixture(scope="module")
def prepared_zone(sphere_data):
    sampler = DangerZoneGap(LogNormal(), FAST_ZONE, margin=1.2)
    record = sampler.prepare(*sphere_data)
    return sampler, record


def test_danger_zone_gap_needs_prepare():
    sampler = DangerZoneGap(LogNormal(), FAST_ZONE)
    with pytest.raises(RuntimeError, match="call prepare"):
        sampler.sample(10, gen())
    for call in (lambda: sampler.cdf(1.0), lambda: sampler.cdf_below(1.0), lambda: sampler.kept_mass,
                 lambda: sampler.state_dict(), lambda: sampler.mass(0.1, 1.0)):
        with pytest.raises(RuntimeError, match="call prepare"):
            call()
    assert json.loads(json.dumps(sampler.describe()))["prepared"] is False


def test_danger_zone_gap_band_from_sphere_data(prepared_zone):
    sampler, record = prepared_zone
    low, high = sampler.bands.sigma[0]
    zone_low, zone_high = record["danger_zone"]["sigma"]
    # 64 near-equidistant points (pairwise distance ~ sqrt(2)): the zone lies at a medium sigma, widened by margin
    assert 0.01 < zone_low < zone_high < 2.0
    assert low == pytest.approx(zone_low / 1.2, rel=1e-12) and high == pytest.approx(zone_high * 1.2, rel=1e-12)
    norm = stats.norm(-1.2, 1.2)
    assert sampler.kept_mass == pytest.approx(1 - (norm.cdf(math.log(high)) - norm.cdf(math.log(low))), abs=1e-12)
    assert record["kept_mass"] == sampler.kept_mass
    s = sampler.sample(N_DRAWS, gen(31)).sigma.double()
    assert not torch.any((s >= low) & (s <= high))
    described = json.loads(json.dumps(sampler.describe()))
    assert described["prepared"] is True and described["class"] == "DangerZoneGap"
    assert described["bands"][0]["sigma"] == pytest.approx([low, high])


def test_danger_zone_gap_state_round_trip(prepared_zone):
    sampler, _ = prepared_zone
    state = json.loads(json.dumps(sampler.state_dict()))
    restored = DangerZoneGap(LogNormal(), FAST_ZONE, margin=1.2)
    restored.load_state_dict(state)
    assert restored.bands.sigma == sampler.bands.sigma
    assert restored.kept_mass == sampler.kept_mass
    assert restored.zone == sampler.zone
    assert torch.equal(restored.sample(1000, gen(32)).sigma, sampler.sample(1000, gen(32)).sigma)
    with pytest.raises(ValueError, match="'band'"):
        restored.load_state_dict({"zone": None})


def _far_heldout_data():
    """Training points close together, held-out points far away: the posterior weight collapses (sigma ~ 0.03)
    long before the shells around training points reach the held-out data (sigma ~ 3), so no sigma has both."""
    g = gen(33)
    train = sphere_points(64, 256, g, radius=0.05)
    heldout = sphere_points(64, 256, g, radius=0.05) + 20.0
    return train, heldout


def test_danger_zone_gap_empty_zone_names_levels():
    sampler = DangerZoneGap(LogNormal(), replace(FAST_ZONE, weight_level=0.4, coverage_level=0.6))
    with pytest.raises(ValueError, match=r"empty at weight_level=0\.4 and coverage_level=0\.6"):
        sampler.prepare(*_far_heldout_data())


def test_danger_zone_gap_crossing_fallback():
    sampler = DangerZoneGap(LogNormal(), FAST_ZONE, margin=1.5, if_empty="crossing")
    sampler.prepare(*_far_heldout_data())
    assert sampler.zone["empty"] is True
    crossing = sampler.zone["crossing"]["sigma"]
    low, high = sampler.bands.sigma[0]
    assert low == pytest.approx(crossing / 1.5, rel=1e-12) and high == pytest.approx(crossing * 1.5, rel=1e-12)


@pytest.mark.parametrize(
    "geometry,kwargs,pattern",
    [
        (dict(weight_level=1.0), {}, r"weight_level must lie in \(0, 1\), got 1\.0"),
        (dict(coverage_level=0.0), {}, r"coverage_level must lie in \(0, 1\), got 0\.0"),
        ({}, dict(margin=0.5), r"margin must be >= 1.*got 0\.5"),
        ({}, dict(if_empty="skip"), r"'skip'"),
    ],
)


def test_danger_zone_gap_construction_errors(geometry, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DangerZoneGap(LogNormal(), GeometrySettings(**geometry), **kwargs)


def test_timestep_bands_given_as_sigma_are_refused_as_unit_mistakes():
    with pytest.raises(ValueError, match="did you mean unit: timestep"):
        Gap(LogNormal(), [[100.0, 350.0]])
    with pytest.raises(ValueError, match="reaches past the largest noise level"):
        Gap(DDPMUniform(), [[100.0, 200.0]])
