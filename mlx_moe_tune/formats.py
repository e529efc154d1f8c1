"""MLX quantization formats as a numpy reference, bit-exact with MLX 0.32.4 on the CPU.

Modes (defaults in parentheses, as `mx.quantize`):
- affine: bits 1,2,3,4,5,6,8 (4), group size 32,64,128 (64); `w = scale*q + bias`,
  q packed as a little-endian LSB-first bit stream in uint32. Per group the value of larger
  magnitude (min or max) is the bias and is hit exactly, so scales may be negative; 1-bit
  uses plain scale = max - min, bias = min.
- mxfp4: E2M1 elements (nearest, ties toward zero), group 32, E8M0 (uint8) scale
  2^ceil(log2(absmax/6)) (0.32.4; 0.32.2 rounded instead of ceil).
- nvfp4: E2M1 elements, group 16, E4M3 (uint8) scale e4m3(absmax/6 * 2688/global_scale),
  optional float32 global scale (dequantize then returns float32, as MLX does).
- mxfp8: E4M3 elements (1 byte each), group 32, E8M0 scale 2^ceil(log2(absmax/448)).

`quantize`/`dequantize` replay MLX's CPU arithmetic step by step (each MLX op computes in
float32 and rounds to its dtype), so results match `mx.quantize`/`mx.dequantize` bit for bit.
`reference_gather_qmm` is the float64 ground truth kernels are checked against: it
dequantizes with exact arithmetic from the stored scales, not with MLX's roundings.

bfloat16 numpy arrays use `ml_dtypes.bfloat16`; `to_numpy`/`to_mlx` convert both ways.
"""
from __future__ import annotations

import numpy as np

import ml_dtypes

bfloat16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), bfloat16)

# mode -> (default group size, default bits)
MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)

# E2M1 code -> value; codes 8..15 are the negatives (8 is -0).
FP4_LUT = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
F8E4M3_MAX = 448.0
F4E2M1_MAX = 6.0


# ---------------------------------------------------------------------------------------------
# numpy <-> mlx (bfloat16 has no buffer-protocol format, so it travels as uint16 bits)


def _is_mlx(a) -> bool:
    return type(a).__module__.startswith("mlx")


def to_numpy(a) -> np.ndarray:
    """mx.array (any dtype, bfloat16 included) or array-like -> numpy array."""
    if _is_mlx(a):
        import mlx.core as mx

        if a.dtype == mx.bfloat16:
            return np.array(a.view(mx.uint16)).view(bfloat16)
        return np.array(a)
    return np.asarray(a)


def to_mlx(a):
    """numpy array (ml_dtypes.bfloat16 included) -> mx.array with the same dtype."""
    import mlx.core as mx

    if _is_mlx(a):
        return a
    a = np.asarray(a)
    if a.dtype == bfloat16:
        return mx.array(np.ascontiguousarray(a).view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def _np_dtype(dtype) -> np.dtype:
    """numpy dtype from a numpy/ml_dtypes dtype, a name, or an mx.Dtype."""
    if _is_mlx(dtype):
        dtype = str(dtype).rsplit(".", 1)[-1]
    if isinstance(dtype, str) and dtype == "bfloat16":
        return bfloat16
    return np.dtype(dtype)


# ---------------------------------------------------------------------------------------------
# validation


def quantization_params(mode: str, group_size: int | None, bits: int | None) -> tuple[int, int]:
    """Validated (group_size, bits) for `mode`, filling MLX's defaults for None."""
    if mode not in MODES:
        raise ValueError(f"unsupported quantization mode {mode!r}; expected one of {list(MODES)}")
    dgs, dbits = MODES[mode]
    gs = dgs if group_size is None else int(group_size)
    b = dbits if bits is None else int(bits)
    if mode == "affine":
        if gs not in AFFINE_GROUP_SIZES:
            raise ValueError(
                f"unsupported group size {gs} for affine; supported: {AFFINE_GROUP_SIZES}"
            )
        if b not in AFFINE_BITS:
            raise ValueError(f"unsupported bits {b} for affine; supported: {AFFINE_BITS}")
    else:
        if gs != dgs:
            raise ValueError(f"{mode} requires group size {dgs}, got group size {gs}")
        if b != dbits:
            raise ValueError(f"{mode} requires bits {dbits}, got bits {b}")
    return gs, b


def _float_input(w, what: str = "w") -> np.ndarray:
    w = to_numpy(w)
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must have dtype float32, float16 or bfloat16 (as mx.quantize on the CPU), "
            f"got dtype {w.dtype}"
        )
    return w


def _global_scale(global_scale, mode: str, per_expert: int | None = None) -> np.ndarray | None:
    """float32 global scale as an array of shape () (or (E,) when per_expert=E is allowed)."""
    if global_scale is None:
        return None
    if mode != "nvfp4":
        raise ValueError(f"global_scale is only supported for mode 'nvfp4', not {mode!r}")
    if isinstance(global_scale, (int, float)) and not isinstance(global_scale, np.generic):
        return np.asarray(global_scale, np.float32)
    g = to_numpy(global_scale)
    if g.dtype != np.float32:
        raise ValueError(f"global_scale must have dtype float32, got dtype {g.dtype}")
    if g.size == 1:
        return g.reshape(())
    if per_expert is not None and g.shape == (per_expert,):
        return g
    want = "a scalar" + (f" or shape ({per_expert},)" if per_expert is not None else "")
    raise ValueError(f"global_scale must be {want}, got shape {g.shape}")


# ---------------------------------------------------------------------------------------------
# bit packing


def pack(q, bits: int) -> np.ndarray:
    """Pack integer codes q (..., K) of `bits` bits into uint32 (..., K*bits/32).

    Element i of a row occupies bits [i*bits, (i+1)*bits) of the row's little-endian bit
    stream: for 2/4/8 bits element j of a word is `(word >> j*bits) & mask`; 3/5/6-bit
    elements straddle word boundaries, exactly as MLX packs them.
    """
    q = to_numpy(q)
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported bits {bits} for pack; expected 1..8")
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"pack expects integer codes, got dtype {q.dtype}")
    if q.ndim < 1 or (q.shape[-1] * bits) % 32:
        raise ValueError(
            f"pack: last dimension {q.shape[-1] if q.ndim else None} times bits {bits} "
            "must be a multiple of 32"
        )
    if q.size and (q.min() < 0 or q.max() >= (1 << bits)):
        raise ValueError(f"pack: codes must lie in [0, {1 << bits}) for bits {bits}")
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((q.astype(np.uint8)[..., None] >> shifts) & 1).reshape(*q.shape[:-1], -1)
    packed = np.packbits(stream, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def unpack(wq, bits: int, k: int | None = None) -> np.ndarray:
    """Inverse of `pack`: uint32 (..., K*bits/32) -> uint32 codes (..., k); k defaults to all."""
    wq = to_numpy(wq)
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"unsupported bits {bits} for unpack; expected 1..8")
    if wq.dtype != np.uint32:
        raise ValueError(f"unpack expects uint32 packed words, got dtype {wq.dtype}")
    total = wq.shape[-1] * 32 // bits
    k = total if k is None else int(k)
    if not 0 <= k <= total:
        raise ValueError(f"unpack: k={k} exceeds the {total} codes held by {wq.shape[-1]} words")
    raw = np.ascontiguousarray(wq.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : k * bits]
    stream = stream.reshape(*wq.shape[:-1], k, bits).astype(np.uint32)
    return (stream << np.arange(bits, dtype=np.uint32)).sum(-1, dtype=np.uint32)


# ---------------------------------------------------------------------------------------------
# FP8 E4M3 conversions: ports of MLX's detail::ToFP8 / FromFP8 (saturating, NaN -> 448)


def to_fp8_e4m3(x) -> np.ndarray:
    """float -> E4M3 byte, as MLX's ToFP8: round to nearest even, |x| >= 464 saturates to 448."""
    f = np.asarray(x, np.float32)
    bits = np.ascontiguousarray(f).view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    bits = bits ^ sign
    denorm = np.uint32(141 << 23)
    with np.errstate(over="ignore", invalid="ignore"):
        # small values: adding 2^14 rounds the value to the E4M3 subnormal grid (step 2^-9)
        low = (bits.view(np.float32) + denorm.view(np.float32)).view(np.uint32)
        result_low = (low - denorm).astype(np.uint8)
        mant_odd = (bits >> 20) & 1
        # (7 - 127) << 23 rebiases the exponent; uint32 wrap-around as in C++
        high = bits + np.uint32((((7 - 127) << 23) + 0x7FFFF) & 0xFFFFFFFF) + mant_odd
        result_high = (high >> 20).astype(np.uint8)
    result = np.where(bits < np.uint32(121 << 23), result_low, result_high)
    result = np.where(bits >= np.uint32(543 << 21), np.uint8(0x7E), result)
    return (result | (sign >> 24).astype(np.uint8)).astype(np.uint8)


def from_fp8_e4m3(b) -> np.ndarray:
    """E4M3 byte -> float32, as MLX's FromFP8 (bits placed in a float16, times 256; 0x7F/0xFF
    are NaN in 0.32.4)."""
    b = np.asarray(b, np.uint8)
    v = ((b & 127).astype(np.uint16) << 7).view(np.float16).astype(np.float32) * np.float32(256)
    v = np.where((b & 127) == 127, np.float32(np.nan), v)
    return np.where(b & 128, -v, v).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# quantize


def _rnd(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round a float32 result to `dtype` (what an MLX op in that dtype stores), kept as float32."""
    x = np.asarray(x, np.float32)
    if dtype == np.float32:
        return x
    return x.astype(dtype).astype(np.float32)


def quantize(w, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
             global_scale=None):
    """numpy `mx.quantize`: (wq, scales, biases) for affine, (wq, scales) for fp modes."""
    gs, bits = quantization_params(mode, group_size, bits)
    w = _float_input(w)
    if w.ndim < 2:
        raise ValueError(f"quantize needs w with at least 2 dimensions, got shape {w.shape}")
    if w.shape[-1] % gs:
        raise ValueError(
            f"last dimension K={w.shape[-1]} of w is not divisible by group size {gs}"
        )
    g = _global_scale(global_scale, mode)
    if mode == "affine":
        return _affine_quantize(w, gs, bits)
    return _fp_quantize(w, gs, bits, g)


def _affine_quantize(w: np.ndarray, gs: int, bits: int):
    # MLX's CPU fast::Quantize kernel: everything in float32, std::rint (half to even).
    dtype = w.dtype
    lead, K = w.shape[:-1], w.shape[-1]
    wf = w.astype(np.float32).reshape(-1, K // gs, gs)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = wf.max(-1), wf.min(-1)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(mask, scale, -scale)  # negative scale when the edge is the max
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    nz = q0 != 0
    # the edge value is represented exactly: scale = edge/q0, bias = edge
    scale = np.where(nz, edge / np.where(nz, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    if bits == 1:  # 0.32.4's 1-bit mode: plain min/max, scale = max - min, bias = min
        scale = np.maximum(w_max - w_min, np.float32(1e-7)).astype(np.float32)
        bias = w_min
    q = np.rint((wf - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, n_bins).astype(np.uint32).reshape(*lead, K)
    shape = (*lead, K // gs)
    return pack(q, bits), scale.astype(dtype).reshape(shape), bias.astype(dtype).reshape(shape)


def _fp_quantize(w: np.ndarray, gs: int, bits: int, g: np.ndarray | None):
    # MLX's fp_quantize fallback graph (used on the CPU), op by op in w's dtype.
    dtype = w.dtype
    lead, K = w.shape[:-1], w.shape[-1]
    wg = w.astype(np.float32).reshape(-1, gs)
    maxval = np.float32(F4E2M1_MAX if bits == 4 else F8E4M3_MAX)
    scales = _rnd(np.abs(wg).max(-1, keepdims=True) / maxval, dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if gs == 16:  # nvfp4: E4M3 scale, times 448*6/global_scale when given
            enc = np.float32(1) if g is None else np.float32(448.0 * 6.0) / g
            s8 = to_fp8_e4m3(scales * enc)
            wq = _rnd(wg / _rnd(from_fp8_e4m3(s8), dtype), dtype) * enc  # float32 from here on
            diff_dtype = np.dtype(np.float32)
        else:  # mx: E8M0 scale = ceil(log2(absmax/maxval)) + 127 (0.32.4; 0.32.2 rounded)
            e = np.ceil(np.log2(scales))
            e = np.where(scales == 0, 0, e).astype(np.int32)
            wq = _rnd(wg / _rnd(np.ldexp(np.float32(1), e), dtype), dtype)
            s8 = (e + 127).astype(np.uint8)
            diff_dtype = dtype
        if bits == 4:
            # nearest LUT entry, first index on ties (ties go towards zero; -0 never chosen)
            lut = _rnd(FP4_LUT, dtype)
            diff = _rnd(np.abs(_rnd(wq[..., None] - lut, diff_dtype)), diff_dtype)
            codes = np.argmin(diff, axis=-1).astype(np.uint32)
        else:
            codes = to_fp8_e4m3(wq)
    codes = codes.reshape(*lead, K)
    return pack(codes, bits), s8.reshape(*lead, K // gs)


# ---------------------------------------------------------------------------------------------
# dequantize


def _promote(a: np.dtype, b: np.dtype) -> np.dtype:
    """MLX's promotion among float32/float16/bfloat16 (float16 + bfloat16 -> float32)."""
    return a if a == b else np.dtype(np.float32)


def _check_packed(w, scales, gs: int, bits: int, what: str = "scales"):
    if w.dtype != np.uint32:
        raise ValueError(f"the quantized matrix w must have dtype uint32, got dtype {w.dtype}")
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dimensions, got shape {w.shape}")
    if w.shape[:-1] != scales.shape[:-1]:
        raise ValueError(f"shape of {what} {scales.shape} does not match w {w.shape}")
    k = w.shape[-1] * 32 // bits
    if (w.shape[-1] * 32) % bits or k != scales.shape[-1] * gs:
        raise ValueError(
            f"w {w.shape} holds {k} elements per row but {what} {scales.shape} with group size "
            f"{gs} cover {scales.shape[-1] * gs} (bits={bits})"
        )
    return k


def dequantize(w, scales, biases=None, group_size: int | None = None, bits: int | None = None,
               mode: str = "affine", global_scale=None, dtype=None) -> np.ndarray:
    """numpy `mx.dequantize`, bit-exact with MLX's CPU result.

    Output dtype: `dtype`, else the scales/biases dtype (affine) or bfloat16 (fp modes); like
    MLX, nvfp4 with a global scale always returns float32.
    """
    gs, bits = quantization_params(mode, group_size, bits)
    w, scales = to_numpy(w), to_numpy(scales)
    out_dtype = None if dtype is None else _np_dtype(dtype)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {out_dtype}")
    g = _global_scale(global_scale, mode)
    if mode == "affine":
        if biases is None:
            raise ValueError("biases must be provided for affine quantization")
        biases = to_numpy(biases)
        for name, a in (("scales", scales), ("biases", biases)):
            if a.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")
        if biases.shape != scales.shape:
            raise ValueError(f"biases shape {biases.shape} differs from scales {scales.shape}")
        k = _check_packed(w, scales, gs, bits)
        q = unpack(w, bits, k).astype(np.float32).reshape(*w.shape[:-1], -1, gs)
        # two MLX ops: multiply in the scales' dtype, then add in the promoted dtype
        y = _rnd(q * scales.astype(np.float32)[..., None], scales.dtype)
        add_dtype = _promote(scales.dtype, biases.dtype)
        y = _rnd(y + biases.astype(np.float32)[..., None], add_dtype)
        out = (out_dtype or add_dtype)
        return y.reshape(*w.shape[:-1], k).astype(out)
    if biases is not None:
        raise ValueError(f"biases must be None for mode {mode!r}")
    if scales.dtype != np.uint8:
        raise ValueError(f"{mode} scales must have dtype uint8, got dtype {scales.dtype}")
    k = _check_packed(w, scales, gs, bits)
    out = out_dtype or bfloat16
    codes = unpack(w, bits, k)
    vals = _rnd(FP4_LUT[codes], out) if bits == 4 else _rnd(from_fp8_e4m3(codes), out)
    vals = vals.reshape(*w.shape[:-1], -1, gs)
    if gs == 16:
        s = _rnd(from_fp8_e4m3(scales), out)[..., None]
        if g is not None:  # scales * (g / 2688) in float32, product left in float32
            return (vals * (s * (g / np.float32(448.0 * 6.0)))).reshape(*w.shape[:-1], k)
    else:
        with np.errstate(over="ignore"):
            e = scales.astype(np.int32) - 127
            s = _rnd(np.ldexp(np.float32(1), e), out)[..., None]
    return _rnd(vals * s, out).reshape(*w.shape[:-1], k).astype(out)


def dequantize_exact(w, scales, biases=None, group_size: int | None = None,
                     bits: int | None = None, mode: str = "affine", global_scale=None) -> np.ndarray:
    """float64 dequantization with exact arithmetic from the stored scales/biases.

    This is the mathematical weight a kernel approximates (no intermediate roundings).
    `global_scale` may be a scalar or, for (E, N, K/8) weights, one float32 per expert (E,).
    """
    gs, bits = quantization_params(mode, group_size, bits)
    w, scales = to_numpy(w), to_numpy(scales)
    k = _check_packed(w, scales, gs, bits)
    if mode == "affine":
        if biases is None:
            raise ValueError("biases must be provided for affine quantization")
        biases = to_numpy(biases)
        if biases.shape != scales.shape:
            raise ValueError(f"biases shape {biases.shape} differs from scales {scales.shape}")
        q = unpack(w, bits, k).astype(np.float64).reshape(*w.shape[:-1], -1, gs)
        y = q * scales.astype(np.float64)[..., None] + biases.astype(np.float64)[..., None]
        return y.reshape(*w.shape[:-1], k)
    if biases is not None:
        raise ValueError(f"biases must be None for mode {mode!r}")
    if scales.dtype != np.uint8:
        raise ValueError(f"{mode} scales must have dtype uint8, got dtype {scales.dtype}")
    g = _global_scale(global_scale, mode, per_expert=w.shape[0] if w.ndim == 3 else None)
    codes = unpack(w, bits, k)
    vals = (FP4_LUT[codes] if bits == 4 else from_fp8_e4m3(codes)).astype(np.float64)
    vals = vals.reshape(*w.shape[:-1], -1, gs)
    if gs == 16:
        s = from_fp8_e4m3(scales).astype(np.float64)
        if g is not None:
            gv = g.astype(np.float64) / (F8E4M3_MAX * F4E2M1_MAX)
            s = s * (gv.reshape(-1, *([1] * (s.ndim - 1))) if gv.ndim else gv)
    else:
        s = np.ldexp(1.0, scales.astype(np.int64) - 127)
    return (vals * s[..., None]).reshape(*w.shape[:-1], k)


# ---------------------------------------------------------------------------------------------
# gather_qmm reference


def reference_gather_qmm(x, w, scales, biases, indices, *, group_size: int | None = None,
                         bits: int | None = None, mode: str = "affine", global_scale=None,
                         transpose: bool = True) -> np.ndarray:
    """float64 reference of `mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, ...)`.

    y[b] = x[lhs(b)] @ W[indices[b]].T (or @ W when transpose=False), where W is the exact
    float64 dequantization of the expert's weights and lhs(b) broadcasts x's batch dims
    against `indices`, exactly as mx.gather_qmm without lhs_indices. mlx-lm's layouts:
    - sorted:   x (P, 1, K),        indices (P,)        -> (P, 1, N)
    - unsorted: x (B, L, 1, 1, K),  indices (B, L, k)   -> (B, L, k, 1, N)  (or (T,1,1,K))
    A 2-D x (R, K) is the kernels' per-row layout (not mx semantics): row r uses expert
    indices[r] -> (R, N), or every slot of indices (R, k) -> (R, k, N).
    """
    x = to_numpy(x)
    w, idx = to_numpy(w), to_numpy(indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    if w.ndim < 3:
        raise ValueError(f"w must be (E, N, K*bits/32) (or more batch dims), got shape {w.shape}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
    if x.ndim == 2:  # per-row kernel layout
        if idx.ndim not in (1, 2) or idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"with 2-D x {x.shape}, indices must be (R,) or (R, k) with R={x.shape[0]}, "
                f"got shape {idx.shape}"
            )
        if idx.ndim == 1:
            y = reference_gather_qmm(x[:, None, :], w, scales, biases, idx, group_size=group_size,
                                     bits=bits, mode=mode, global_scale=global_scale,
                                     transpose=transpose)
            return y[:, 0, :]
        y = reference_gather_qmm(x[:, None, None, :], w, scales, biases, idx,
                                 group_size=group_size, bits=bits, mode=mode,
                                 global_scale=global_scale, transpose=transpose)
        return y[..., 0, :]

    W = dequantize_exact(w, scales, biases, group_size, bits, mode, global_scale)
    n_experts = int(np.prod(W.shape[:-2]))
    W = W.reshape(n_experts, *W.shape[-2:])
    if not transpose:
        W = W.swapaxes(-1, -2)  # stored (E, K, N): y = x @ W
    N, K = W.shape[-2:]
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]} but the weights have K={K}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
        raise ValueError(
            f"expert index out of range: indices span [{idx.min()}, {idx.max()}] "
            f"but there are {n_experts} experts"
        )
    xb = x.shape[:-2]
    lhs = np.arange(int(np.prod(xb)), dtype=np.int64).reshape(xb)
    try:
        lhs, rhs = np.broadcast_arrays(lhs, idx)
    except ValueError:
        raise ValueError(
            f"x batch shape {xb} does not broadcast with indices shape {idx.shape}"
        ) from None
    xf = x.reshape(-1, *x.shape[-2:]).astype(np.float64)
    lhs, rhs = lhs.reshape(-1), rhs.reshape(-1)
    y = np.empty((lhs.size, x.shape[-2], N), np.float64)
    for e in np.unique(rhs):  # one matmul per expert keeps memory at one W slab
        sel = np.nonzero(rhs == e)[0]
        y[sel] = xf[lhs[sel]] @ W[e].T
    return y.reshape(*np.broadcast_shapes(xb, idx.shape), x.shape[-2], N)
