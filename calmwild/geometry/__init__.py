"""Geometry of the noise schedule (paper Section 4), computed from the dataset alone: one module per object.

- :mod:`~calmwild.geometry.weights`: posterior concentration, m(sigma) = E max_i w_i (Def. 4.1), the self weight
  (Fig. 7) and Theorem 4.2's noise thresholds;
- :mod:`~calmwild.geometry.shells`: the Gaussian shell of Lemma 4.5, the coverage C_sigma (Def. 4.6), the two-shell
  function f_sigma (Def. 4.7) and Theorem 4.8's bounds;
- :mod:`~calmwild.geometry.zone`: the danger zone (Section 4.2.3, App. E.4) and the rule that turns it into the
  band a gap removes (:func:`~calmwild.geometry.zone.gap_band`);
- :mod:`~calmwild.geometry.risk`: which training images are at risk (seed 002, local coverage);
- :mod:`~calmwild.geometry.report`: the full report (``geometry.json``, the Figure 3 plot, ``risk.json``);
- :mod:`~calmwild.geometry.noise`: the Monte Carlo machinery they share.

Every Monte Carlo estimate carries a standard error. Heavy work is chunked matrix products on the training tensor's
device (float32 or float64, the training tensor's dtype); results are float64 CPU tensors.
"""

from calmwild.lazy import lazy_exports

# public name -> the module that defines it; imported on first use, so ``calmwild.geometry.zone`` can be imported
# (by the sigma samplers) without the report's plotting stack
_WHERE = {
    "GEOMETRY_KEYS": "report", "GeometryResult": "report", "analyze_geometry": "report",
    "coverage_bounds": "shells", "shell_coverage": "shells", "shell_probability_bound": "shells",
    "shell_radii": "shells", "two_shell_probability": "shells", "two_shell_probability_mc": "shells",
    "concentration_thresholds": "weights", "posterior_weight_curves": "weights",
    "CROSSING_MIN_MARGIN": "zone", "DangerZone": "zone", "danger_zone": "zone", "gap_band": "zone",
    "check_gap_options": "zone",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
