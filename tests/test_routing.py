"""routing.py: every router's load properties, and the MLX plan against numpy's stable sort."""
from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import routing as R


def _rows_distinct(idx: np.ndarray) -> bool:
    return all(len(set(row)) == len(row) for row in idx.tolist())


@pytest.mark.parametrize("E,k,m", [(8, 2, 1), (8, 3, 3), (16, 8, 4), (128, 8, 2), (6, 4, 2),
                                   (5, 5, 7), (7, 1, 3)])
def test_balanced_exact_rows_and_distinct(E, k, m):
    idx = np.array(R.route("balanced", None, E, k, m=m, seed=E + k + m))
    assert idx.dtype == np.int32 and idx.shape == (m * E // k, k)
    assert Counter(idx.ravel().tolist()) == {e: m for e in range(E)}
    assert _rows_distinct(idx)


def test_balanced_tokens_form_and_errors():
    idx = np.array(R.route("balanced", 8, 16, 4))  # m = 2
    assert set(Counter(idx.ravel().tolist()).values()) == {2}
    with pytest.raises(ValueError, match="not an integer"):
        R.route("balanced", None, 8, 3, m=1)
    with pytest.raises(ValueError, match="divisible by experts"):
        R.route("balanced", 5, 8, 2)
    with pytest.raises(ValueError, match="disagrees"):
        R.route("balanced", 9, 8, 2, m=2)


@pytest.mark.parametrize("router", R.ROUTERS)
def test_every_router_shape_range_distinct_and_seeded(router):
    E, k, T = 32, 4, 256
    a = np.array(R.route(router, T, E, k, seed=3))
    b = np.array(R.route(router, T, E, k, seed=3))
    c = np.array(R.route(router, T, E, k, seed=4))
    assert a.shape == (T, k) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < E
    assert _rows_distinct(a)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_uniform_is_flat():
    E, k, T = 16, 2, 8000
    counts = np.bincount(np.array(R.route("uniform", T, E, k)).ravel(), minlength=E)
    expected = T * k / E
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 15 degrees of freedom: p ~ 1e-4


def test_skewed_follows_zipf_ranks():
    E, k, T = 32, 2, 8000
    counts = np.sort(np.bincount(np.array(R.route("skewed", T, E, k, skew=1.2)).ravel(),
                                 minlength=E))[::-1]
    # the hottest expert gets far more than an even share, the coldest far less
    assert counts[0] > 4 * T * k / E and counts[-1] < 0.5 * T * k / E
    # first-slot choices follow the Zipf weights exactly (Gumbel max = weighted sampling)
    p = 1.0 / np.arange(1, E + 1) ** 1.2
    p /= p.sum()
    first = np.sort(np.bincount(np.array(R.route("skewed", T, E, 1, skew=1.2)).ravel(),
                                minlength=E))[::-1]
    np.testing.assert_allclose(first[:4] / T, p[:4], rtol=0.12)
    flat = np.bincount(np.array(R.route("skewed", T, E, k, skew=0.0)).ravel(), minlength=E)
    assert flat.max() < 1.3 * T * k / E  # skew 0 is uniform


def test_sparse_uses_only_active_experts():
    idx = np.array(R.route("sparse", 500, 64, 4, active=6, seed=1))
    assert len(set(idx.ravel().tolist())) == 6
    assert len(set(np.array(R.route("sparse", 500, 64, 4)).ravel().tolist())) == 8  # E // 8


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("nope", 8, 8, 2), {}, "unknown router"),
        (("uniform", 8, 4, 5), {}, "top_k=5 exceeds"),
        (("uniform", 0, 8, 2), {}, "tokens must be a positive integer"),
        (("uniform", 8, 8, 0), {}, "top_k must be a positive integer"),
        (("uniform", None, 8, 2), {}, "give tokens or m"),
        (("skewed", 8, 8, 2), {"skew": -1.0}, "skew"),
        (("sparse", 8, 8, 2), {"active": 1}, "active=1"),
        (("sparse", 8, 8, 2), {"active": 9}, "active=9"),
    ],
)
def test_route_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.route(*args, **kwargs)


def _numpy_plan(idx: np.ndarray, E: int):
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=E)
    return order, flat[order], np.concatenate([[0], np.cumsum(counts)]), np.argsort(order)


@pytest.mark.parametrize("shape,E", [((64, 8), 16), ((7, 2), 32), ((50,), 4), ((3, 5, 2), 6),
                                     ((1, 1), 1), ((300, 4), 128)])
def test_plan_matches_numpy(shape, E):
    rng = np.random.default_rng(sum(shape) + E)
    idx = rng.integers(0, E, shape).astype(np.int32)  # duplicates and idle experts included
    p = R.plan(mx.array(idx), E)
    order, sexp, offsets, inv = _numpy_plan(idx, E)
    for got, want in ((p.order, order), (p.sorted_experts, sexp), (p.offsets, offsets),
                      (p.inv_order, inv), (p.counts, np.diff(offsets))):
        assert got.dtype == mx.int32
        np.testing.assert_array_equal(np.array(got), want)
    assert p.experts == E and p.top_k == (shape[-1] if len(shape) > 1 else 1)


def test_plan_int64_key_path_and_inferred_experts():
    E = 1 << 20  # experts * pairs >= 2**31: the sort key needs int64
    idx = np.random.default_rng(0).integers(0, E, (1024, 4)).astype(np.int32)
    idx[5, 1] = idx[9, 0]  # a tie that must stay in pair order
    p = R.plan(mx.array(idx), E)
    np.testing.assert_array_equal(np.array(p.order), np.argsort(idx.ravel(), kind="stable"))
    q = R.plan(mx.array(np.array([[2, 0], [2, 1]])))  # E read from the data
    assert q.experts == 3
    np.testing.assert_array_equal(np.array(q.offsets), [0, 1, 2, 4])


def test_plan_has_no_host_sync():
    """Tracing under mx.compile fails on any .item()/numpy conversion of a traced array."""
    idx = mx.array(np.random.default_rng(1).integers(0, 8, (32, 2)).astype(np.int32))

    @mx.compile
    def f(i):
        p = R.plan(i, 8)
        return p.order, p.offsets, p.inv_order

    order, offsets, inv = f(idx)
    ref = _numpy_plan(np.array(idx), 8)
    np.testing.assert_array_equal(np.array(order), ref[0])
    np.testing.assert_array_equal(np.array(offsets), ref[2])
    np.testing.assert_array_equal(np.array(inv), ref[3])


def test_plan_rejects_float_indices():
    with pytest.raises(ValueError, match="integers"):
        R.plan(mx.array([[0.0, 1.0]]), 2)


def test_stats_against_counter():
    idx = np.array(R.route("sparse", 40, 16, 2, active=5, seed=2))
    s = R.stats(idx, 16)
    c = Counter(idx.ravel().tolist())
    assert s["active_experts"] == len(c) == 5
    assert s["rows_per_expert_max"] == max(c.values())
    assert s["rows_per_expert_min"] == 0  # idle experts count
    assert s["rows_per_expert_mean"] == pytest.approx(80 / 16)
    assert s["rows_per_active_expert_mean"] == pytest.approx(80 / 5)
    assert R.stats(mx.array(idx), 16) == s
    with pytest.raises(ValueError, match="expert index out of range"):
        R.stats(idx, 4)


@pytest.mark.parametrize("P,E,fused", [(37, 8, None), (37, 8, False), (1 << 15, 600, None), (300, 9, True)])
def test_expert_offsets_match_numpy(P, E, fused):
    rng = np.random.default_rng(P)
    ids = rng.integers(0, E, P).astype(np.int32)
    ids[:3] = [-1, E, E + 5]  # out of range: counted in no expert
    got = np.asarray(R.expert_offsets(mx.array(ids), E, fused=fused))
    valid = ids[(ids >= 0) & (ids < E)]
    want = np.concatenate([[0], np.cumsum(np.bincount(valid, minlength=E))])
    np.testing.assert_array_equal(got, want)
