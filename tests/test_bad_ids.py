"""Expert ids outside [0, E) with the default `validate=False` (what the patch passes): every
kernel family of both dialects, both mlx-lm layouts, in the emulator's check mode (an
out-of-bounds access fails the run). Rows of bad ids come out as zeros; the other rows match
the numpy reference."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import formats, ops, selftest
from mlx_moe_tune.emulator.kernel import ENV_CHECK

E, GS, BITS = 4, 32, 4
BAD = (E, -1, 2**31 - 1)


@pytest.fixture(autouse=True)
def _check_mode(monkeypatch):
    monkeypatch.setenv(ENV_CHECK, "1")


def _weights(K, N, seed):
    rng = np.random.default_rng(seed)
    wq, s, b = formats.quantize(rng.standard_normal((E, N, K)).astype(np.float32), group_size=GS, bits=BITS)
    s, b = mx.array(s).astype(mx.bfloat16), mx.array(b).astype(mx.bfloat16)
    return mx.array(wq), s, b


def _reference(x_rows, w, flat):
    wq, s, b = w
    good = (flat >= 0) & (flat < E)
    ref = formats.reference_gather_qmm(x_rows, np.asarray(wq), np.asarray(s.astype(mx.float32)),
                                       np.asarray(b.astype(mx.float32)), np.where(good, flat, 0),
                                       group_size=GS, bits=BITS)
    return np.where(good[:, None], ref, 0.0), good


def _case(layout, seed):
    """(x, ids, x rows per pair, flat ids, K, N): the decode selftest's shape for the per-token
    layout and the ragged one's for the sorted layout (their kernels are compiled already)."""
    rng = np.random.default_rng(seed)
    if layout == "unsorted":  # x (T, 1, 1, K), ids (T, k=2): X_DIV = 2
        K, N, T = 64, 40, 5
        flat = rng.integers(0, E, 2 * T).astype(np.int64)
        flat[[1, 4, 7]] = BAD
        x = rng.standard_normal((T, 1, 1, K)).astype(np.float32)
        ids = mx.array(flat.reshape(T, 2).astype(np.int32))
        x_rows = np.repeat(x.reshape(T, K), 2, axis=0)
    else:  # x (P, 1, K), ids sorted: negative ones first, >= E last
        K, N = 128, 72
        flat = np.sort(np.concatenate([[-1], rng.integers(0, E, 11), [E, 2**31 - 1]])).astype(np.int64)
        x = rng.standard_normal((flat.size, 1, K)).astype(np.float32)
        ids = mx.array(flat.astype(np.int32))
        x_rows = x.reshape(-1, K)
    xb = mx.array(x).astype(mx.bfloat16)
    return xb, ids, np.asarray(xb.astype(mx.float32)).reshape(-1, K)[
        np.arange(flat.size) // (2 if layout == "unsorted" else 1)], flat, K, N


@pytest.mark.parametrize("backend", ["emulator-cuda", "emulator-metal"])
@pytest.mark.parametrize("layout", ["unsorted", "sorted"])
@pytest.mark.parametrize("family", ["qmv", "qmm"])
def test_bad_ids_give_zero_rows(backend, layout, family):
    x, ids, x_rows, flat, K, N = _case(layout, seed=3)
    w, wu = _weights(K, N, 0), _weights(K, N, 1)
    tol = selftest.TOLERANCE["bfloat16"]
    kw = dict(group_size=GS, bits=BITS, sorted_indices=layout == "sorted", family=family, backend=backend)
    y = np.asarray(ops.gather_qmm(x, *w, ids, **kw).astype(mx.float32)).reshape(-1, N)
    ref, good = _reference(x_rows, w, flat)
    assert not good.all() and np.isfinite(y).all()
    assert (y[~good] == 0).all()
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
    yg = np.asarray(ops.gather_qmm_glu(x, *w, *wu, ids, **kw).astype(mx.float32)).reshape(-1, N)
    up, _ = _reference(x_rows, wu, flat)
    ref_glu = ref / (1 + np.exp(-ref)) * up
    assert (yg[~good] == 0).all()
    assert np.abs(yg - ref_glu).max() <= tol * np.abs(ref_glu).max()


def test_validate_opts_in_to_a_host_check():
    x, ids, _, _, K, N = _case("sorted", seed=4)
    with pytest.raises(ValueError, match="expert index out of range"):
        ops.gather_qmm(x, *_weights(K, N, 0), ids, group_size=GS, bits=BITS, sorted_indices=True,
                       backend="emulator-cuda", validate=True)
