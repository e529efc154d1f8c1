"""mlx_moe_tune.gather_qmm: input validation, call layouts, routing plan (CPU), and results vs
mx.gather_qmm on the GPU (marker gpu) / the numpy reference on the CUDA emulator."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import formats, ops
from mlx_moe_tune.kernels.plan import make_plan


def _weights(E=4, N=72, K=256, bits=4, gs=64, dtype=mx.bfloat16, seed=0):
    # drawn by MLX (on the GPU where there is one): the seed shape is 507M values, which numpy
    # would draw as 4 GB of float64 on the host first
    w = mx.random.normal((E, N, K), key=mx.random.key(seed))
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return wq, s.astype(dtype), b.astype(dtype)


@pytest.fixture(scope="module")
def wsb():
    return _weights()


def test_validation_errors(wsb):
    wq, s, b = wsb
    x = mx.zeros((3, 1, 256), mx.bfloat16)
    idx = mx.array([0, 1, 3], mx.int32)
    cases = [
        (dict(bits=3), "bits"),
        (dict(group_size=16), "group_size"),
        (dict(mode="mxfp4"), "mode"),
        (dict(x=mx.zeros((3, 1, 128), mx.bfloat16)), "K="),
        (dict(x=mx.zeros((3, 2, 256), mx.bfloat16)), "M=1"),
        (dict(x=mx.zeros((3, 1, 256), mx.int32)), "dtype"),
        (dict(s=s[:, :, :2]), "scales must have shape"),
        (dict(idx=mx.array([0.0, 1.0, 2.0])), "integers"),
        (dict(idx=mx.array([0, 1, 4], mx.int32), validate=True), "out of range"),  # opt-in host check
        (dict(idx=mx.array([0, -1, 2], mx.int32), validate=True), "out of range"),
        (dict(idx=mx.zeros((5,), mx.int32)), "broadcast"),
        (dict(w=wq.astype(mx.int32)), "uint32"),
        (dict(config={"BM": 12, "FN": 1, "WN": 2, "WK": 1, "MC": 4, "KU": 1}, family="qmm", backend="emulator-cuda"), "BM=12"),
        (dict(config={"XX": 1}, backend="emulator-cuda"), "no kernel family"),
    ]
    for over, msg in cases:
        args = dict(x=x, w=wq, s=s, b=b, idx=idx)
        kw = {"group_size": 64, "bits": 4, **{k: v for k, v in over.items() if k not in args}}
        args.update({k: v for k, v in over.items() if k in args})
        with pytest.raises(ValueError, match=msg):
            ops.gather_qmm(args["x"], args["w"], args["s"], args["b"], args["idx"], **kw)


def test_layouts():
    K = 64
    x = mx.zeros((5, 1, 1, K))
    idx = mx.zeros((5, 3), mx.int32)
    x2, flat, x_div, batch = ops._layout(x, idx)
    assert (x2.shape, flat.shape, x_div, batch) == ((5, K), (15,), 3, (5, 3))
    x2, flat, x_div, batch = ops._layout(mx.zeros((15, 1, K)), mx.zeros((15,), mx.int32))
    assert (x2.shape, x_div, batch) == ((15, K), 1, (15,))
    # a batch that broadcasts another way is materialized
    x2, flat, x_div, batch = ops._layout(mx.zeros((1, 4, 1, K)), mx.zeros((3, 1), mx.int32))
    assert (x2.shape, x_div, batch) == ((12, K), 1, (3, 4))


@pytest.mark.parametrize("sorted_indices", [False, True])
def test_plan_matches_numpy(sorted_indices):
    rng = np.random.default_rng(3)
    E = 7
    idx = rng.integers(0, E - 2, size=(20, 3)).astype(np.int32)  # experts 5, 6 get no rows
    if sorted_indices:
        idx = np.sort(idx.reshape(-1)).reshape(20, 3)
    p = make_plan(mx.array(idx), E, sorted_indices=sorted_indices)
    flat = idx.reshape(-1)
    order = np.asarray(p.order)
    assert sorted(order.tolist()) == list(range(flat.size))
    assert np.all(np.diff(flat[order]) >= 0)
    counts = np.bincount(flat, minlength=E)
    assert np.asarray(p.offsets).tolist() == [0] + np.cumsum(counts).tolist()


def test_default_choice_by_m():
    from mlx_moe_tune.kernels.family import Problem

    fam, cfg = ops.default_choice(Problem(128, 2816, 1408, 8), sorted_layout=False)
    assert fam == "qmv"
    for m, bm in ((2, 8), (8, 8), (16, 16), (32, 32), (64, 64)):
        fam, cfg = ops.default_choice(Problem(128, 2816, 1408, 128 * m), sorted_layout=True)
        assert fam == "qmm" and cfg["BM"] == bm


def _reference(x, wq, s, b, idx, gs, bits):
    return formats.reference_gather_qmm(np.asarray(x.astype(mx.float32)), np.asarray(wq),
                                        np.asarray(s.astype(mx.float32)), np.asarray(b.astype(mx.float32)),
                                        np.asarray(idx), group_size=gs, bits=bits)


def _close(y, ref, tol=2e-2):
    y = np.asarray(y.astype(mx.float32))
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


def test_op_on_emulator():
    emu = pytest.importorskip("mlx_moe_tune.emulator")
    if not hasattr(emu, "cuda_kernel"):
        pytest.skip("emulator has no cuda_kernel yet")
    wq, s, b = _weights(E=4, N=40, K=128, gs=64)
    rng = np.random.default_rng(0)
    idx = mx.array(rng.integers(0, 3, size=(3, 2)).astype(np.int32))
    x = mx.array(rng.standard_normal((3, 1, 1, 128)).astype(np.float32)).astype(mx.bfloat16)
    ref = _reference(x, wq, s, b, idx, 64, 4)
    for family in ("qmv", "qmm"):
        _close(ops.gather_qmm(x, wq, s, b, idx, family=family, backend="emulator-cuda"), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_vs_mx(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 20))
    gs = int(rng.choice([32, 64, 128]))
    bits = int(rng.choice([2, 4, 8]))
    K = gs * int(rng.integers(1, 12))
    N = int(rng.integers(1, 300))
    dtype = [mx.bfloat16, mx.float16][seed % 2]
    wq, s, b = _weights(E, N, K, bits, gs, dtype, seed)
    k = int(rng.integers(1, min(E, 8) + 1))
    T = int(rng.integers(1, 200))
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    x = mx.random.normal((T, 1, 1, K)).astype(dtype)
    ref = mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=gs, bits=bits)
    ref = np.asarray(ref.astype(mx.float32))
    _close(ops.gather_qmm(x, wq, s, b, idx, group_size=gs, bits=bits), ref)
    # mlx-lm's sorted layout with a reusable plan
    flat = idx.reshape(-1)
    order = mx.argsort(flat)
    xs = mx.broadcast_to(x, (T, k, 1, K)).reshape(-1, 1, K)[order]
    plan = make_plan(flat[order], E, sorted_indices=True)
    y = ops.gather_qmm(xs, wq, s, b, flat[order], group_size=gs, bits=bits, sorted_indices=True, plan=plan)
    _close(y, ref.reshape(-1, 1, N)[np.asarray(order)])


@pytest.mark.gpu
def test_seed_shape_vs_mx():
    E, K, N, top_k = 128, 2816, 1408, 8
    wq, s, b = _weights(E, N, K, 4, 64, mx.bfloat16)
    for T in (1, 37, 1024):
        idx = mx.array(np.stack([np.random.default_rng(T + i).choice(E, top_k, replace=False)
                                 for i in range(T)]).astype(np.int32))
        x = mx.random.normal((T, 1, 1, K)).astype(mx.bfloat16)
        ref = mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4)
        _close(ops.gather_qmm(x, wq, s, b, idx), np.asarray(ref.astype(mx.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(50, 16, 4), (1, 128, 8), (3, 64, 4)], ids=["batch", "decode", "decode-3"])
def test_glu_vs_two_calls(T, E, k):
    """Both paths of gather_qmm_glu vs two mx.gather_qmm: batch (two calls below FUSED_MIN_M) and
    decode (the fused qmv_glu kernel)."""
    K, N = 512, 200
    (wg, sg, bg), (wu, su, bu) = _weights(E, N, K, seed=1), _weights(E, N, K, seed=2)
    rng = np.random.default_rng(0)
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    x = mx.random.normal((T, 1, 1, K)).astype(mx.bfloat16)
    g = mx.gather_qmm(x, wg, sg, bg, rhs_indices=idx, transpose=True).astype(mx.float32)
    u = mx.gather_qmm(x, wu, su, bu, rhs_indices=idx, transpose=True).astype(mx.float32)
    ref = np.asarray(g * mx.sigmoid(g) * u)
    _close(ops.gather_qmm_glu(x, wg, sg, bg, wu, su, bu, idx), ref, tol=3e-2)


@pytest.mark.parametrize("config,family", [
    (None, ""), ({"BM": 8, "FN": 1, "WN": 4, "WK": 1, "MC": 4, "KU": 1}, "qmm_glu"),
    ({"FN": 1, "WN": 2, "WK": 2, "KU": 1}, "qmv_glu")], ids=["split-calls", "fused-qmm", "fused-qmv"])
def test_glu_on_emulator(config, family):
    """Every gather_qmm_glu path (two calls + silu*up below FUSED_MIN_M, the fused reuse or
    no-reuse kernel when a config is forced) vs the numpy reference of silu(x Wg^T) * (x Wu^T)."""
    emu = pytest.importorskip("mlx_moe_tune.emulator")
    if not hasattr(emu, "cuda_kernel"):
        pytest.skip("emulator has no cuda_kernel yet")
    (wg, sg, bg), (wu, su, bu) = _weights(E=4, N=40, K=128, seed=1), _weights(E=4, N=40, K=128, seed=2)
    rng = np.random.default_rng(0)
    idx = mx.array(rng.integers(0, 3, size=(6, 2)).astype(np.int32))
    x = mx.array(rng.standard_normal((6, 1, 1, 128)).astype(np.float32)).astype(mx.bfloat16)
    g, u = _reference(x, wg, sg, bg, idx, 64, 4), _reference(x, wu, su, bu, idx, 64, 4)
    assert ops.describe(x, wg, sg, bg, idx, config=config, backend="emulator-cuda",
                        w_up=(wu, su, bu))["family"] == family
    y = ops.gather_qmm_glu(x, wg, sg, bg, wu, su, bu, idx, config=config, backend="emulator-cuda")
    _close(y, g / (1.0 + np.exp(-g)) * u, tol=3e-2)


def test_glu_decode_is_one_fused_launch():
    """A decode step (1 token, top-k) through gather_qmm_glu picks the fused no-reuse kernel by
    default (one launch for gate+up), builds no routing plan, and matches the reference."""
    emu = pytest.importorskip("mlx_moe_tune.emulator")
    if not hasattr(emu, "cuda_kernel"):
        pytest.skip("emulator has no cuda_kernel yet")
    from mlx_moe_tune.kernels.plan import SharedPlan

    E, K, N = 8, 128, 40
    (wg, sg, bg), (wu, su, bu) = _weights(E=E, N=N, K=K, seed=3), _weights(E=E, N=N, K=K, seed=4)
    rng = np.random.default_rng(5)
    idx = mx.array(rng.permutation(E)[:2].reshape(1, 1, 2).astype(np.int32))
    x = mx.array(rng.standard_normal((1, 1, 1, 1, K)).astype(np.float32)).astype(mx.bfloat16)
    d = ops.describe(x, wg, sg, bg, idx, backend="emulator-cuda", w_up=(wu, su, bu))
    assert d["family"] == "qmv_glu" and d["source"] == "default"
    plan = SharedPlan(idx, E, backend="emulator-cuda")
    y = ops.gather_qmm_glu(x, wg, sg, bg, wu, su, bu, idx, plan=plan, backend="emulator-cuda")
    assert plan._plan is None  # qmv reads expert ids directly: the shared plan was never built
    assert y.shape == (1, 1, 2, 1, N)
    g, u = _reference(x, wg, sg, bg, idx, 64, 4), _reference(x, wu, su, bu, idx, 64, 4)
    _close(y, g / (1.0 + np.exp(-g)) * u, tol=3e-2)


def test_config_without_an_optional_param_means_its_old_default():
    """Tables and ids written before PF (L2 prefetch) existed still pick their kernel, as PF=0;
    PF > 0 is taken when given; an unknown tile key or a negative PF is a clear error."""
    w, s, b = _weights(E=4, N=40, K=128, seed=1)
    idx = mx.array(np.array([[0, 1], [2, 3]], dtype=np.int32))
    x = mx.zeros((2, 1, 1, 128), dtype=mx.bfloat16)
    kw = dict(backend="emulator-cuda")
    assert ops.describe(x, w, s, b, idx, config="FN2_WN2_WK2_KU1", **kw) == dict(
        family="qmv", config="FN2_WN2_WK2_KU1_PF0", source="argument")
    assert ops.describe(x, w, s, b, idx, config="BM8_FN2_WN4_WK1_MC4_KU1_PF3", **kw)["family"] == "qmm"
    with pytest.raises(ValueError, match="tile parameters"):
        ops.describe(x, w, s, b, idx, config={"FN": 2, "WN": 2, "WK": 2, "KU": 1, "XX": 1}, family="qmv", **kw)
    with pytest.raises(ValueError, match="matches no kernel family"):
        ops.describe(x, w, s, b, idx, config={"FN": 2, "WN": 2, "XX": 1}, **kw)
    with pytest.raises(ValueError, match="PF=-1 must be >= 0"):
        ops.describe(x, w, s, b, idx, config={"FN": 2, "WN": 2, "WK": 2, "KU": 1, "PF": -1}, **kw)
