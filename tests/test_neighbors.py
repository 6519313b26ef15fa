"""Exact k-nearest neighbours against brute force from explicit differences in float64."""

import pytest
import torch

from calmwild import neighbors
from calmwild.neighbors import knn, squared_distances


def brute_knn(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances from explicit differences in float64; a stable sort keeps the smaller index first among ties."""
    d = torch.cdist(x.flatten(1).double(), y.flatten(1).double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist, index = torch.sort(d, dim=1, stable=True)
    return dist[:, :k], index[:, :k]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("chunks", [(1024, 8192), (7, 13), (1, 1)])
def test_knn_matches_brute_force(k, chunks, gen):
    g = gen(0)
    y = torch.randn(97, 3, 4, 4, generator=g)
    x = torch.cat([torch.randn(20, 3, 4, 4, generator=g), y[:5] + 0.01 * torch.randn(5, 3, 4, 4, generator=g)])
    dist, index = knn(x, y, k=k, query_chunk=chunks[0], ref_chunk=chunks[1])
    ref_dist, ref_index = brute_knn(x, y, k)
    assert dist.dtype == torch.float32 and index.dtype == torch.long and dist.shape == (25, k)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-6, atol=1e-7)


def test_knn_float64_and_few_candidates(gen):
    g = gen(1)
    y = torch.randn(200, 10, dtype=torch.float64, generator=g)
    x = torch.randn(30, 10, dtype=torch.float64, generator=g)
    for candidates in (3, 4, 50):
        dist, index = knn(x, y, k=3, ref_chunk=17, candidates=candidates)
        ref_dist, ref_index = brute_knn(x, y, 3)
        assert torch.equal(index, ref_index)
        torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-6, atol=0)


def test_ties_smallest_index_first(monkeypatch, gen):
    # Points of {0, 1}^4 repeated: every query has many references at exactly equal distances.
    corners = torch.tensor([[(i >> b) & 1 for b in range(4)] for i in range(16)], dtype=torch.float32)
    y = corners[torch.randperm(16, generator=gen(2)).repeat(3)]  # 48 references, each corner 3 times
    x = torch.cat([corners, torch.full((1, 4), 0.5)])  # the centre is at equal distance 0.5 * 2 = 1 from all 48
    fallbacks = []
    original = neighbors._brute_force
    monkeypatch.setattr(neighbors, "_brute_force", lambda q, r, k: fallbacks.append(len(q)) or original(q, r, k))
    for k in (1, 4, 10):
        for candidates in (None, k):  # with exactly k candidates, ties at the boundary need the exact fallback
            dist, index = knn(x, y, k=k, ref_chunk=5, candidates=candidates)
            ref_dist, ref_index = brute_knn(x, y, k)
            assert torch.equal(index, ref_index)
            torch.testing.assert_close(dist.double(), ref_dist)
    assert fallbacks, "the tie certificate never sent a query to the exact fallback"
    dist, index = knn(x[-1:], y, k=5)
    assert index.tolist() == [[0, 1, 2, 3, 4]] and torch.allclose(dist, torch.ones(1, 5))


def test_duplicate_reference_gives_zero_second_distance(gen):
    g = gen(3)
    y = torch.randn(30, 1, 5, 5, generator=g)
    y[21] = y[8]
    dist, index = knn(y[8:9], y, k=3, ref_chunk=4)
    assert index[0, :2].tolist() == [8, 21]
    assert dist[0, 0] == 0 and dist[0, 1] == 0 and dist[0, 2] > 0


def test_cancellation_exact_where_the_norm_identity_fails(gen):
    """Large-norm images (about 100 per pixel, d = 3072) with queries 1e-4 per pixel away from training images:
    the matrix-product identity loses every digit in float32, the exact re-scoring does not."""
    g = gen(4)
    y = 100.0 + torch.randn(40, 3, 32, 32, generator=g)
    x = y[:6] + 1e-4 * torch.randn(6, 3, 32, 32, generator=g)
    truth = (x.double() - y[:6].double()).flatten(1).norm(dim=1)  # about 1e-4 * sqrt(3072) = 5.5e-3
    naive = squared_distances(x, y[:6]).diagonal().sqrt().double()
    assert ((naive - truth).abs() / truth).max() > 0.5  # the naive route is wrong by more than 50%
    dist, index = knn(x, y, k=2, ref_chunk=16)
    assert index[:, 0].tolist() == list(range(6))
    torch.testing.assert_close(dist[:, 0].double(), truth, rtol=1e-5, atol=0)
    ref_dist, ref_index = brute_knn(x, y, 2)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=0)


def test_only_candidates_within_twice_the_error_bound_of_the_kth_are_rescored():
    """Computed values [1, 2, 3.1, 10] with k = 2 and error bound 0.6: a true distance can be among the 2 nearest only
    if its computed value is <= 2 + 2 * 0.6, so 10 is never rescored (+inf) and the rest equal explicit differences."""
    x = torch.zeros(1, 3)
    y = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [4.0, 0, 0]])
    computed = torch.tensor([[1.0, 2.0, 3.1, 10.0]])
    exact = neighbors._rescore_viable(x, y, computed, torch.arange(4).unsqueeze(0), 2, torch.tensor([0.6]))
    assert exact.dtype == torch.float64
    assert exact[0, :3].tolist() == [1.0, 4.0, 9.0] and exact[0, 3] == float("inf")


def test_near_ties_hidden_by_rounding_are_ordered_exactly(gen):
    """Twelve references about 1e-3 from a query of norm ~5500, nearly tied: the float32 matrix-product values are
    rounding noise (all within the error bound of each other), so every candidate is rescored, and the order and
    distances equal brute force from explicit differences."""
    g = gen(5)
    x = 100.0 + torch.randn(1, 3072, generator=g, dtype=torch.float64)
    directions = torch.randn(12, 3072, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    radii = 1e-3 * (1 + torch.arange(12, dtype=torch.float64) * 1e-3)
    order = torch.randperm(12, generator=g)
    y = x + radii[order].unsqueeze(1) * directions
    dist, index = knn(x.float(), y.float(), k=4)
    ref_dist, ref_index = brute_knn(x.float(), y.float(), 4)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-6, atol=0)


def test_chunk_sizes_do_not_change_results(gen):
    g = gen(5)
    y, x = torch.randn(150, 12, generator=g), torch.randn(40, 12, generator=g)
    base = knn(x, y, k=4)
    for qc, rc in [(3, 7), (40, 150), (1, 149)]:
        other = knn(x, y, k=4, query_chunk=qc, ref_chunk=rc)
        assert torch.equal(base[1], other[1]) and torch.equal(base[0], other[0])


def test_empty_queries_and_device_argument(gen):
    y = torch.randn(10, 4, generator=gen(6))
    dist, index = knn(torch.empty(0, 4), y, k=2)
    assert dist.shape == (0, 2) and index.shape == (0, 2)
    dist, index = knn(y[:3], y, k=1, device="cpu")
    assert index[:, 0].tolist() == [0, 1, 2] and dist.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k must"),
        ({"k": 11}, "k must lie"),
        ({"query_chunk": 0}, "query_chunk"),
        ({"ref_chunk": -1}, "ref_chunk"),
        ({"k": 3, "candidates": 2}, "candidates"),
    ],
)
def test_bad_arguments(kwargs, match, gen):
    y = torch.randn(10, 4, generator=gen(7))
    with pytest.raises(ValueError, match=match):
        knn(y, y, **kwargs)


def test_bad_inputs(gen):
    y = torch.randn(10, 4, generator=gen(8))
    with pytest.raises(ValueError, match="dimension mismatch"):
        knn(torch.randn(2, 5), y)
    bad = y.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        knn(bad, y)
    with pytest.raises(ValueError, match="reference contains non-finite"):
        knn(y, bad)
    with pytest.raises(ValueError, match="empty"):
        knn(y, torch.empty(0, 4))
