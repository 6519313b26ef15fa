"""calmwild: memorization along the noise schedule of diffusion models.

Library modules (everything here except ``module``, ``data`` and ``cli``) depend on torch only.
"""

__version__ = "0.1.0"
