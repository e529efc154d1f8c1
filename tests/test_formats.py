"""formats.py against MLX itself: bit-exact quantize/dequantize for every mode, packing, errors,
and the float64 gather_qmm reference against mx.gather_qmm (CPU)."""
from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import formats as F

CPU = mx.cpu
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _weights(shape, dtype, seed, kind="normal"):
    """Random weights in `dtype` (as an mx array) with awkward groups mixed in."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    if kind == "mixed":
        flat = w.reshape(-1, 32)
        n = flat.shape[0]
        flat[0 : n : 7] = np.abs(flat[0 : n : 7]) * 3  # all positive: negative scale, bias = max
        flat[1 : n : 7] = -np.abs(flat[1 : n : 7])  # all negative
        flat[2 : n : 7] *= 1e-3  # tiny values
        flat[3 : n : 7] = 0.0  # all-zero group
        flat[4 : n : 7] = flat[4, :1]  # constant group
        flat[5 : n : 7] *= 50  # large values
    return mx.array(w).astype(DTYPES[dtype])


def _np(a):
    return F.to_numpy(a)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.kind == "f" or a.dtype == F.bfloat16:
        a = a.view(f"u{a.dtype.itemsize}")
        b = b.view(f"u{b.dtype.itemsize}")
    bad = np.nonzero(a != b)
    assert bad[0].size == 0, f"{bad[0].size} mismatches, first at {tuple(i[0] for i in bad)}"


AFFINE = list(itertools.product(F.AFFINE_BITS, F.AFFINE_GROUP_SIZES))


@pytest.mark.parametrize("bits,gs", AFFINE, ids=[f"b{b}-gs{g}" for b, g in AFFINE])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_affine_bit_exact(bits, gs, dtype):
    w = _weights((3, 6, 256), dtype, seed=bits * 1000 + gs, kind="mixed")
    ref = mx.quantize(w, group_size=gs, bits=bits, stream=CPU)
    got = F.quantize(_np(w), group_size=gs, bits=bits)
    assert len(got) == 3
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))
    if bits > 1:  # 1-bit uses plain min/max scales
        assert (_np(ref[1]) < 0).any(), "test data should produce negative scales"
    for out in (None, mx.float32, mx.float16):
        ref_d = mx.dequantize(*ref, group_size=gs, bits=bits, dtype=out, stream=CPU)
        _same_bits(F.dequantize(*got, group_size=gs, bits=bits, dtype=out), _np(ref_d))


@pytest.mark.parametrize("bits", [1, 3, 5, 6])
@pytest.mark.parametrize("K", [32, 96, 160])
def test_affine_odd_word_rows(bits, K):
    """Rows whose bit stream ends mid-word pattern (K*bits/32 odd): packing across rows."""
    w = _weights((5, K), "bfloat16", seed=K + bits)
    ref = mx.quantize(w, group_size=32, bits=bits, stream=CPU)
    got = F.quantize(_np(w), group_size=32, bits=bits)
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))
    _same_bits(F.dequantize(*got, group_size=32, bits=bits),
               _np(mx.dequantize(*ref, group_size=32, bits=bits, stream=CPU)))


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_fp_modes_float32_wide_range(mode):
    """float32 groups spanning 24 orders of magnitude: the scale exponent's every branch."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((2048, 32)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-12, 12, (2048, 1))).astype(np.float32)
    ref = mx.quantize(mx.array(w), mode=mode, stream=CPU)
    got = F.quantize(w, mode=mode)
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))
    _same_bits(F.dequantize(*got, mode=mode, dtype=mx.float32),
               _np(mx.dequantize(*ref, mode=mode, dtype=mx.float32, stream=CPU)))


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fp_modes_bit_exact(mode, dtype):
    w = _weights((2, 8, 128), dtype, seed=len(mode), kind="mixed")
    ref = mx.quantize(w, mode=mode, stream=CPU)
    got = F.quantize(_np(w), mode=mode)
    assert len(got) == 2 and got[1].dtype == np.uint8
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))
    for out in (None, mx.float32, mx.float16):
        ref_d = mx.dequantize(*ref, mode=mode, dtype=out, stream=CPU)
        _same_bits(F.dequantize(*got, mode=mode, dtype=out), _np(ref_d))


@pytest.mark.parametrize("g", [1.0, 0.37, 1234.5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nvfp4_global_scale_bit_exact(g, dtype):
    w = _weights((4, 64), dtype, seed=int(g * 10)) * 40
    gs = mx.array(g, dtype=mx.float32)
    ref = mx.quantize(w, mode="nvfp4", global_scale=gs, stream=CPU)
    got = F.quantize(_np(w), mode="nvfp4", global_scale=np.float32(g))
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))
    ref_d = mx.dequantize(*ref, mode="nvfp4", global_scale=gs, stream=CPU)
    got_d = F.dequantize(*got, mode="nvfp4", global_scale=np.float32(g))
    assert got_d.dtype == np.float32  # MLX returns float32 whenever a global scale is given
    _same_bits(got_d, _np(ref_d))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_fp_scale_every_half_value(mode, dtype):
    """Every finite positive 16-bit value as a group's absmax: exhausts the scale rounding."""
    npd = np.float16 if dtype == "float16" else F.bfloat16
    u = np.arange(1, 0x7C00 if dtype == "float16" else 0x7F80, dtype=np.uint16)
    vals = u.view(npd)
    gsz = 16 if mode == "nvfp4" else 32
    vals = vals[: vals.size // 2 * 2]  # MLX's nvfp4 packing needs an even number of groups
    w = np.zeros((vals.size, gsz), np.float32)
    w[:, 0] = vals.astype(np.float32)
    w[:, 1] = -w[:, 0] * 0.3  # something to quantize beside the max
    w[:, 2] = w[:, 0] * 0.77
    w = w.astype(npd)
    ref = mx.quantize(F.to_mlx(w), mode=mode, stream=CPU)
    got = F.quantize(w, mode=mode)
    for a, b in zip(got, ref):
        _same_bits(a, _np(b))


def test_pack_unpack_round_trip_and_layout():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        q = rng.integers(0, 1 << bits, size=(3, 5, 64)).astype(np.uint32)
        wq = F.pack(q, bits)
        assert wq.shape == (3, 5, 64 * bits // 32) and wq.dtype == np.uint32
        np.testing.assert_array_equal(F.unpack(wq, bits, 64), q)
        np.testing.assert_array_equal(F.unpack(wq, bits), q)
        # independent check: the row as one big little-endian integer, element i at i*bits
        row = sum(int(v) << (32 * j) for j, v in enumerate(wq[1, 2]))
        assert [(row >> (i * bits)) & ((1 << bits) - 1) for i in range(64)] == list(q[1, 2])


def test_fp8_conversions_match_mlx():
    every = np.arange(256, dtype=np.uint8)
    ref = mx.from_fp8(mx.array(every), dtype=mx.float32, stream=CPU)
    np.testing.assert_array_equal(F.from_fp8_e4m3(every), np.array(ref))  # NaN == NaN here
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-4, 3, 4000),
        F.from_fp8_e4m3(every)[np.isfinite(F.from_fp8_e4m3(every))],
        np.array([0.0, -0.0, 448, 463.9, 464, 1e9, -1e9, 2.0**-10, 3 * 2.0**-11], np.float32),
    ]).astype(np.float32)
    np.testing.assert_array_equal(F.to_fp8_e4m3(x), np.array(mx.to_fp8(mx.array(x), stream=CPU)))


def test_bfloat16_conversion_round_trip():
    a = np.array([1.5, -2.25, 3e38, 1e-30], F.bfloat16)
    m = F.to_mlx(a)
    assert m.dtype == mx.bfloat16
    _same_bits(F.to_numpy(m), a)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=7), "bits 7"),
        (dict(group_size=16), "group size 16"),
        (dict(mode="int4"), "mode 'int4'"),
        (dict(mode="mxfp4", group_size=64), "group size 32"),
        (dict(mode="nvfp4", bits=8), "bits 4"),
        (dict(mode="affine", global_scale=1.0), "global_scale"),
    ],
)
def test_quantize_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.quantize(np.zeros((2, 128), np.float32), **kwargs)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by group size 64"):
        F.quantize(np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        F.quantize(np.zeros((2, 64), np.int32))
    with pytest.raises(ValueError, match="dtype"):
        F.quantize(np.zeros((2, 64), np.float64))
    with pytest.raises(ValueError, match="2 dimensions"):
        F.quantize(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="float32"):
        F.quantize(np.zeros((2, 64), np.float32), mode="nvfp4", global_scale=np.float64(2))
    wq, s, b = F.quantize(np.ones((2, 128), np.float32))
    with pytest.raises(ValueError, match="biases must be provided"):
        F.dequantize(wq, s)
    with pytest.raises(ValueError, match="uint32"):
        F.dequantize(wq.astype(np.int32), s, b)
    with pytest.raises(ValueError, match="group size 32"):
        F.dequantize(wq, s, b, group_size=32)
    wq8, s8 = F.quantize(np.ones((2, 64), np.float32), mode="mxfp8")
    with pytest.raises(ValueError, match="uint8"):
        F.dequantize(wq8, s8.astype(np.float32), mode="mxfp8")
    with pytest.raises(ValueError, match="biases must be None"):
        F.dequantize(wq8, s8, s8, mode="mxfp8")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        F.pack(np.full((1, 8), 16), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        F.pack(np.zeros((1, 5), np.uint32), 4)


# ---------------------------------------------------------------------------------------------
# reference_gather_qmm against mx.gather_qmm on the CPU (float32, so only summation order differs)

E, N, K = 6, 24, 128
GATHER_MODES = [("affine", 4, 64), ("affine", 3, 32), ("affine", 6, 128), ("affine", 2, 64),
                ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)]


def _expert_weights(mode, bits, gs, seed=0):
    w = mx.array(np.random.default_rng(seed).standard_normal((E, N, K)).astype(np.float32))
    q = mx.quantize(w, group_size=gs, bits=bits, mode=mode, stream=CPU)
    return q if mode == "affine" else (q[0], q[1], None)


def _close(y, ref):
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("mode,bits,gs", GATHER_MODES, ids=[f"{m}-b{b}-gs{g}" for m, b, g in GATHER_MODES])
def test_reference_gather_qmm_sorted_layout(mode, bits, gs):
    wq, s, b = _expert_weights(mode, bits, gs)
    rng = np.random.default_rng(1)
    P = 40
    idx = np.sort(rng.integers(0, E, P)).astype(np.uint32)
    x = rng.standard_normal((P, 1, K)).astype(np.float32)
    y = mx.gather_qmm(mx.array(x), wq, s, b, rhs_indices=mx.array(idx), transpose=True,
                      group_size=gs, bits=bits, mode=mode, sorted_indices=True, stream=CPU)
    ref = F.reference_gather_qmm(x, wq, s, b, idx, group_size=gs, bits=bits, mode=mode)
    assert ref.shape == (P, 1, N)
    _close(y, ref)


@pytest.mark.parametrize("mode,bits,gs", GATHER_MODES[:2] + GATHER_MODES[4:],
                         ids=[f"{m}-b{b}-gs{g}" for m, b, g in GATHER_MODES[:2] + GATHER_MODES[4:]])
@pytest.mark.parametrize("xshape,ishape", [((2, 3, 1, 1, K), (2, 3, 4)), ((5, 1, 1, K), (5, 2))])
def test_reference_gather_qmm_unsorted_layout(mode, bits, gs, xshape, ishape):
    wq, s, b = _expert_weights(mode, bits, gs, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xshape).astype(np.float32)
    idx = np.argsort(rng.random((*ishape[:-1], E)), -1)[..., : ishape[-1]].astype(np.int32)
    y = mx.gather_qmm(mx.array(x), wq, s, b, rhs_indices=mx.array(idx), transpose=True,
                      group_size=gs, bits=bits, mode=mode, stream=CPU)
    ref = F.reference_gather_qmm(x, wq, s, b, idx, group_size=gs, bits=bits, mode=mode)
    assert ref.shape == tuple(y.shape) == (*ishape, 1, N)
    _close(y, ref)


def test_reference_gather_qmm_transpose_false_and_row_layout():
    rng = np.random.default_rng(4)
    w = mx.array(rng.standard_normal((E, K, 64)).astype(np.float32))  # (E, K, N) for x @ W
    wq, s, b = mx.quantize(w, group_size=32, bits=4, stream=CPU)
    x = rng.standard_normal((7, 1, K)).astype(np.float32)
    idx = rng.integers(0, E, 7).astype(np.int32)
    y = mx.gather_qmm(mx.array(x), wq, s, b, rhs_indices=mx.array(idx), transpose=False,
                      group_size=32, bits=4, stream=CPU)
    ref = F.reference_gather_qmm(x, wq, s, b, idx, group_size=32, bits=4, transpose=False)
    _close(y, ref)
    # the 2-D per-row layout equals the (P, 1, K) layout without the singleton axis
    wq, s, b = _expert_weights("affine", 4, 64)
    r3 = F.reference_gather_qmm(x, wq, s, b, idx, group_size=64, bits=4)
    r2 = F.reference_gather_qmm(x[:, 0], wq, s, b, idx, group_size=64, bits=4)
    np.testing.assert_array_equal(r2, r3[:, 0])
    idx2 = np.stack([idx, (idx + 1) % E], 1)
    r2k = F.reference_gather_qmm(x[:, 0], wq, s, b, idx2, group_size=64, bits=4)
    np.testing.assert_array_equal(r2k[:, 0], r3[:, 0])
    assert r2k.shape == (7, 2, N)


def test_reference_gather_qmm_per_expert_global_scale():
    """nvfp4 with one global scale per expert == each expert dequantized with its own scale."""
    rng = np.random.default_rng(5)
    g = np.array([0.5, 2.0, 7.0], np.float32)
    ws = [rng.standard_normal((N, 64)).astype(np.float32) * 30 for _ in g]
    qs = [F.quantize(w, mode="nvfp4", global_scale=gi) for w, gi in zip(ws, g)]
    wq = np.stack([q[0] for q in qs])
    s = np.stack([q[1] for q in qs])
    x = rng.standard_normal((5, 1, 64)).astype(np.float32)
    idx = np.array([2, 0, 1, 2, 2])
    got = F.reference_gather_qmm(x, wq, s, None, idx, mode="nvfp4", global_scale=g)
    for r, e in enumerate(idx):
        deq = mx.dequantize(mx.array(qs[e][0]), mx.array(qs[e][1]), mode="nvfp4",
                            global_scale=mx.array(g[e]), stream=CPU)
        np.testing.assert_allclose(got[r, 0], x[r, 0].astype(np.float64) @ np.array(deq, np.float64).T,
                                   rtol=1e-5, atol=1e-4)


def test_reference_gather_qmm_errors():
    wq, s, b = _expert_weights("affine", 4, 64)
    x = np.zeros((3, 1, K), np.float32)
    with pytest.raises(ValueError, match="expert index out of range"):
        F.reference_gather_qmm(x, wq, s, b, np.array([0, E, 1]), group_size=64, bits=4)
    with pytest.raises(ValueError, match="expert index out of range"):
        F.reference_gather_qmm(x, wq, s, b, np.array([0, -1, 1]), group_size=64, bits=4)
    with pytest.raises(ValueError, match="K=64"):
        F.reference_gather_qmm(x[..., :64], wq, s, b, np.array([0, 1, 1]), group_size=64, bits=4)
    with pytest.raises(ValueError, match="integers"):
        F.reference_gather_qmm(x, wq, s, b, np.array([0.0, 1, 1]), group_size=64, bits=4)
    with pytest.raises(ValueError, match="broadcast"):
        F.reference_gather_qmm(x, wq, s, b, np.array([0, 1]), group_size=64, bits=4)
