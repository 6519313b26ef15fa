"""Every noise level from one matrix product: the distances of noisy copies x = b + sigma n of a base point b to the
training points y, at all levels sigma at once (the Monte Carlo of paper Section 4: Def. 4.1, Def. 4.6).

With common random numbers (the same noise n at every level),

    ||b + sigma n - y||^2 = ||b - y||^2 + 2 sigma <n, b - y> + sigma^2 ||n||^2 = A + 2 sigma B + sigma^2 N,

so one product per (block of noisy copies, chunk of training points) gives A [P, C] and B [P, M, C], and each level
costs a few elementwise passes instead of its own product over the d pixels. Memory stays O(rows x chunk) for any
number of training points.

Rounding (float32 inputs, unit roundoff u, gamma = d u / (1 - d u)): A and B come from length-d inner products, so
the computed squared distance differs from the true one by at most about
gamma (||b|| + ||y||_max + sigma ||n||)^2 (Cauchy-Schwarz bounds every term); :data:`MARGIN_FACTOR` x that, plus
4 u times the value, is the per-row margin within which a decision is redone from explicit differences in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from calmwild.neighbors import squared_distances

# Elements of Gaussian noise drawn at once per block of base points (64 MiB in float32).
NOISE_BUDGET = 1 << 24
MARGIN_FACTOR = 4.0  # twice the margin of a single matrix-product distance: A and B carry one error each


class Terms(NamedTuple):
    """The level-free terms of one block of noisy copies against one chunk of training points."""

    a: torch.Tensor  # [P, C]   ||b_p - y_j||^2
    b: torch.Tensor  # [P, M, C] <n_pk, b_p - y_j>
    nn: torch.Tensor  # [P, M]   ||n_pk||^2


def noise_blocks(base: torch.Tensor, num_noises: int, generator: torch.Generator,
                 rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(p0, noise [pb, M, d]) for consecutive blocks of base points: the noise of ``NOISE_BUDGET`` elements is drawn
    at once (one seeded stream, the same whatever ``rows`` is) and handed out ``rows`` noisy copies at a time
    (at least one base point)."""
    num_base, dim = base.shape
    block = max(1, min(num_base, NOISE_BUDGET // max(1, num_noises * dim)))
    per_piece = max(1, rows // num_noises)
    for p0 in range(0, num_base, block):
        pb = min(block, num_base - p0)
        noise = torch.randn(pb, num_noises, dim, generator=generator, device=base.device, dtype=base.dtype)
        for q0 in range(0, pb, per_piece):
            yield p0 + q0, noise[q0 : q0 + per_piece]


def level_terms(base: torch.Tensor, noise: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor) -> Terms:
    """A, B and N (:class:`Terms`) of base points [P, d] with their noises [P, M, d] against training points y [C, d]
    (``y_sq`` their squared norms)."""
    p, m, d = noise.shape
    a = squared_distances(base, y, y_sq)
    flat = noise.reshape(p * m, d)
    own = (noise * base.unsqueeze(1)).sum(dim=2)  # <n, b>
    b = own.unsqueeze(2) - (flat @ y.T).reshape(p, m, -1)
    return Terms(a, b, noise.square().sum(dim=2))


def squared_at(terms: Terms, sigma: float) -> torch.Tensor:
    """||b + sigma n - y||^2 [P, M, C] at one level."""
    return torch.add(terms.a.unsqueeze(1), terms.b, alpha=2.0 * sigma).add_(terms.nn.unsqueeze(2), alpha=sigma * sigma)


def logits_at(terms: Terms, sigma: float) -> torch.Tensor:
    """-||b + sigma n - y||^2 / (2 sigma^2) up to a per-copy constant (-||n||^2 / 2, which no softmax over y sees):
    -(A + 2 sigma B) / (2 sigma^2), [P, M, C]."""
    return torch.add(terms.b, terms.a.unsqueeze(1), alpha=0.5 / sigma).mul_(-1.0 / sigma)
