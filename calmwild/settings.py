"""The settings that several commands and callbacks share, one small dataclass each, so every setting has one
default. jsonargparse turns a dataclass argument into nested options (``--sampling.steps 18`` on the command line,
``sampling: {steps: 18}`` in a config).

- :class:`SamplingSettings`: how samples are generated (EDM's sampler, paper eq. 4);
- :class:`PerSigmaSettings`: the items of the per-noise-level metrics (paper eq. 5, Section 3);
- :class:`GeometrySettings`: the Monte Carlo sizes and levels of the dataset geometry (paper Section 4);
- :class:`FIDSettings`: the feature space and reference set of a Frechet distance;
- :class:`EarlyRejectionSettings`: how ``sample`` / ``swap`` stop memorized trajectories early (seed 004).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from calmwild.checks import check_choice, check_count, check_open_unit, check_positive, check_sigmas

SOLVERS = ("heun", "euler")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class SamplingSettings:
    """How samples are drawn with EDM's sampler (Karras et al. 2022, Alg. 2; the probability-flow ODE of paper
    eq. 4 on EDM's rho = 7 schedule).

    Attributes:
        steps: noise levels of the schedule (EDM: 18, i.e. 35 evaluations with Heun).
        solver: ``heun`` (2nd order, two evaluations per step) or ``euler``.
        s_churn: EDM's stochasticity (0: the deterministic ODE).
        seed: sample i starts from noise seeded with seed + i, so a sample does not depend on its batch.
        batch_size: samples per sampler batch.
        precision: network arithmetic: ``fp32``, or ``bf16`` autocast (faster on GPUs; closed-form denoisers
            always compute in float32 / float64).
    """

    steps: int = 18
    solver: Literal["heun", "euler"] = "heun"
    s_churn: float = 0.0
    seed: int = 0
    batch_size: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        check_choice(self.solver, "solver", SOLVERS)
        if not self.s_churn >= 0:
            raise ValueError(f"s_churn must be >= 0, got {self.s_churn}")
        check_count(self.seed, "seed", 0)
        check_count(self.batch_size, "batch_size")
        check_choice(self.precision, "precision", PRECISIONS)

    def generate_kwargs(self) -> dict:
        """The keyword arguments of :func:`calmwild.sampling.generate` these settings decide."""
        return {"seed": self.seed, "batch_size": self.batch_size, "num_steps": self.steps, "solver": self.solver,
                "s_churn": self.s_churn}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PerSigmaSettings:
    """The items of a per-noise-level metric: the first ``num_images`` images of a set, each noised
    ``num_noises`` times with seeded noise, at every noise level of ``sigmas``.

    Attributes:
        sigmas: noise levels; None: EDM's 18-step sampling schedule 80 ... 0.002 (paper App. E.1).
        num_images: at most this many images (the first ones) of each set.
        num_noises: seeded noise draws per image.
        seed: noise seed: the noise of (image i, draw j) depends only on seed, i and j.
        batch_size: denoiser batch size.
    """

    sigmas: list[float] | None = None
    num_images: int = 256
    num_noises: int = 1
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.sigmas is not None:
            check_sigmas(self.sigmas, distinct_names=True)
        check_count(self.num_images, "num_images")
        check_count(self.num_noises, "num_noises")
        check_count(self.seed, "seed", 0)
        check_count(self.batch_size, "batch_size")

    def sigma_list(self) -> list[float]:
        """The noise levels as a list (the default schedule resolved)."""
        from calmwild.schedule import edm_sigma_steps

        if self.sigmas is None:
            return edm_sigma_steps(DEFAULT_PER_SIGMA_LEVELS).tolist()
        return check_sigmas(self.sigmas, distinct_names=True).tolist()

    def items_key(self) -> tuple:
        """What decides the items and so the numbers: levels, images, noises per image, noise seed (not the batch
        size). Two metrics with equal keys evaluate the same (image, noise, sigma) triples."""
        return tuple(self.sigma_list()), self.num_images, self.num_noises, self.seed

    def to_dict(self) -> dict:
        return {**asdict(self), "sigmas": [round(s, 6) for s in self.sigma_list()]}


DEFAULT_PER_SIGMA_LEVELS = 18  # EDM's sampling schedule (paper App. E.1)


@dataclass(frozen=True)
class GeometrySettings:
    """The dataset geometry of paper Section 4: Monte Carlo sizes, the shell width and the levels that define the
    danger zone.

    Attributes:
        num_levels: noise levels of the grid (EDM's rho schedule, 40 as in App. E.2).
        num_points: training base points of the posterior-weight curves (Def. 4.1).
        num_noises: noises per base point.
        num_queries: held-out points of the coverage curve (Def. 4.6).
        num_coverage_noises: noises per held-out point.
        num_pairs: held-out / training pairs of the Theorem 4.8 upper bound.
        num_threshold_points: training points of the Theorem 4.2 thresholds (the paper used 20).
        t: Lemma 4.5's shell parameter (5: probability >= 0.9865).
        eps, delta: Theorem 4.2's posterior-weight level and failure probability.
        weight_level, coverage_level: the danger zone is where the max posterior weight and the coverage are both at
            least these.
        seed: seed of the Monte Carlo estimates.
    """

    num_levels: int = 40
    num_points: int = 100
    num_noises: int = 100
    num_queries: int = 500
    num_coverage_noises: int = 20
    num_pairs: int = 10_000
    num_threshold_points: int = 20
    t: float = 5.0
    eps: float = 0.05
    delta: float = 0.05
    weight_level: float = 0.5
    coverage_level: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_levels", "num_points", "num_noises", "num_queries", "num_coverage_noises", "num_pairs",
                     "num_threshold_points"):
            check_count(getattr(self, name), name, 2 if name == "num_levels" else 1)
        check_positive(self.t, "t")
        for name in ("eps", "delta", "weight_level", "coverage_level"):
            check_open_unit(getattr(self, name), name)
        check_count(self.seed, "seed", 0)

    def sigma_grid(self):
        """The ascending grid of noise levels: EDM's rho schedule with ``num_levels`` levels."""
        from calmwild.schedule import edm_sigma_steps

        return edm_sigma_steps(self.num_levels).flip(0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FIDSettings:
    """Sample quality against a reference set: FID (Inception features) and KID beside it (:mod:`calmwild.fid`).

    Attributes:
        feature_extractor: ``inception`` (FID proper; needs torch-fidelity's InceptionV3 weights, see
            ``weights_path``) or ``random`` (a fixed random conv net: a consistency check, not comparable with FID).
        weights_path: InceptionV3 weights file (default: $TORCH_HOME/hub/checkpoints/, downloaded if reachable).
        reference: ``train`` or ``heldout`` (a set of the datamodule), a folder of images, a ``.npz`` of reference
            statistics (``mu``, ``sigma``; FID only), or ``torch-fidelity:<name>`` (a dataset registered with
            torch-fidelity, e.g. ``torch-fidelity:cifar10-train``); see :mod:`calmwild.references`.
        cache_dir: where reference statistics are cached (default: a ``fid_cache`` folder of the output).
        datasets_root: where torch-fidelity keeps its datasets (default: its own, $TORCH_HOME/fidelity_datasets).
    """

    feature_extractor: Literal["inception", "random"] = "inception"
    weights_path: str | None = None
    reference: str = "train"
    cache_dir: str | None = None
    datasets_root: str | None = None

    def __post_init__(self) -> None:
        from calmwild.features import FEATURE_EXTRACTORS
        from calmwild.references import reference_kind

        check_choice(self.feature_extractor, "feature_extractor", FEATURE_EXTRACTORS)
        reference_kind(self.reference)

    def to_dict(self) -> dict:
        return asdict(self)


# The early scores of calmwild.memorization.early (defined there), named here where the settings that pick one live.
ScoreName = Literal["schedule_deviation", "noise_suppression", "estimate_distance", "estimate_ratio",
                    "posterior_concentration"]
SCORES: tuple[str, ...] = get_args(ScoreName)
RELIABLE_AUROC = 0.9  # issue 15's criterion for a reliable early score, fixed before any curve was seen


@dataclass(frozen=True)
class EarlyRejectionSettings:
    """How ``calmwild sample --reject_memorized_early true`` stops trajectories
    (:mod:`calmwild.memorization.early_filter`).

    Attributes:
        score: the early score (see calmwild.memorization.early).
        step: the step (1-based) at which trajectories are scored; default: the earliest step where the score's
            AUROC on the calibration trajectories reaches ``level`` (else the step of its largest AUROC).
        false_negative_rate: the share of memorized calibration trajectories allowed to pass the threshold.
        level: the AUROC that picks the default step.
        calibration_num: calibration trajectories, run to the end and labelled by the ratio test.
        calibration_seed: seed of the calibration trajectories (image i from seed + i; keep it away from the
            sampling seeds).
        max_attempts: trajectories started at most (default 10 x the number requested).
    """

    score: ScoreName = "estimate_ratio"
    step: int | None = None
    false_negative_rate: float = 0.05
    level: float = RELIABLE_AUROC
    calibration_num: int = 256
    calibration_seed: int = 1_000_000
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.score, "score", SCORES)
        if self.step is not None:
            check_count(self.step, "step")
        check_open_unit(self.false_negative_rate, "false_negative_rate")
        check_open_unit(self.level, "level")
        check_count(self.calibration_num, "calibration_num", 2)
        check_count(self.calibration_seed, "calibration_seed", 0)
        if self.max_attempts is not None:
            check_count(self.max_attempts, "max_attempts")

    def to_dict(self) -> dict:
        return asdict(self)
