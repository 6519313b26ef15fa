"""calmwild.memorization.report: what the metrics report (peak of the per-sigma curve) and the curve figures."""

import math

import pytest
import torch
from matplotlib.figure import Figure

from calmwild.memorization.per_sigma import summarize_ratio_tests
from calmwild.memorization.ratio import RatioTestResult
from calmwild.memorization.report import memorization_report, plot_sigma_curves

SIGMAS = [80.0, 2.0, 0.05, 0.002]


def test_peak_sigma_is_undefined_without_memorization():
    flags = torch.zeros(len(SIGMAS), 5, dtype=torch.bool)
    tests = RatioTestResult(flags, torch.ones(flags.shape), torch.zeros(flags.shape, dtype=torch.long),
                            torch.ones(flags.shape), torch.ones(flags.shape))
    section, metrics = memorization_report(summarize_ratio_tests(SIGMAS, tests, torch.arange(5), 1, 1 / 3))
    assert section["peak_rate"] == 0.0 and math.isnan(section["peak_sigma"]) and math.isnan(metrics["mem/peak_sigma"])


def test_sigma_curve_plot_checks_lengths():
    with pytest.raises(ValueError, match="3 values for 4 sigmas"):
        plot_sigma_curves(SIGMAS, {"x": ([1.0, 2.0, 3.0], None)}, "y", "t")
    assert isinstance(plot_sigma_curves(SIGMAS, {"x": ([1.0, 2.0, 3.0, 4.0], [0.1] * 4)}, "y", "t", log_y=True),
                      Figure)
