"""Memorization metrics (paper Section 3), one module per object:

- :mod:`~calmwild.memorization.ratio`: the ratio test d1/d2 < 1/3 (Yoon et al. 2023), rates with cluster-robust
  standard errors, trajectory-level memorization;
- :mod:`~calmwild.memorization.per_sigma`: per-noise-level MSE (eq. 5) and memorization, sharded by item;
- :mod:`~calmwild.memorization.report`: their JSON sections, logged metric names and figures;
- :mod:`~calmwild.memorization.early`: early scores along the sampling trajectory and how well each predicts the
  final sample's memorization, step by step (seed 004);
- :mod:`~calmwild.memorization.early_filter`: stopping and regenerating trajectories whose early score passes a
  calibrated threshold.
"""

from calmwild.lazy import lazy_exports

_WHERE = {
    "RATIO_THRESHOLD": "ratio", "RatioTestResult": "ratio", "TrajectoryMemorization": "ratio",
    "mean_and_stderr": "ratio", "ratio_test": "ratio", "trajectory_memorization": "ratio",
    "PerSigmaMSE": "per_sigma", "PerSigmaMemorization": "per_sigma", "item_ids": "per_sigma",
    "item_noise": "per_sigma", "per_sigma_errors": "per_sigma", "per_sigma_memorization": "per_sigma",
    "per_sigma_mse": "per_sigma", "per_sigma_errors_and_ratio_tests": "per_sigma", "summarize_errors": "per_sigma",
    "summarize_ratio_tests": "per_sigma",
    "memorization_report": "report", "mse_report": "report", "nearest_pairs_grid": "report",
    "plot_per_sigma_memorization": "report", "plot_per_sigma_mse": "report", "plot_ratio_histogram": "report",
    "plot_sigma_curves": "report", "trajectory_report": "report",
    "SCORES": "early", "ScoredTrajectories": "early", "detection_curves": "early", "evaluations_through": "early",
    "plot_detection_curves": "early", "score_trajectories": "early", "step_scores": "early",
    "Calibration": "early_filter", "FilteredSamples": "early_filter",
    "calibrate": "early_filter", "generate_rejecting": "early_filter",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
