"""SIMT emulator, CUDA dialect: warp functions, shared memory (static and dynamic), mma.sync via the
project's mmt:: intrinsics with ldmatrix and a cp.async pipeline, 16-bit intrinsics, templates,
helpers, grid semantics, check mode; and (marker gpu) the same kernels through mx.fast.cuda_kernel
on a real GPU vs the emulator."""
from __future__ import annotations

import numpy as np
import pytest

from mlx_moe_tune import emulator as em
from mlx_moe_tune.sources import read_source

try:  # the GPU host has no ml_dtypes; the CPU tests that need it skip themselves
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

RNG = np.random.default_rng(1)
MMT = read_source("cuda/mmt_intrinsics.cuh")

# ---------------------------------------------------------------------------------------------
# kernels (shared by the CPU tests and the GPU comparison)
# ---------------------------------------------------------------------------------------------
WARP_SRC = """
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[i];
  float s = v;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  float d = v;
  for (int o = 16; o > 0; o /= 2) d += __shfl_down_sync(0xffffffffu, d, o);
  float u = __shfl_up_sync(0xffffffffu, v, 2);
  const unsigned bal = __ballot_sync(0xffffffffu, v > 0.0f);
  const int cnt = __reduce_add_sync(0xffffffffu, v > 0.0f ? 1 : 0);
  const int any_big = __any_sync(0xffffffffu, v > 6.0f), all_small = __all_sync(0xffffffffu, v < 8.0f);
  float h = 0.0f;
  if ((threadIdx.x & 31) < 16) h = __shfl_xor_sync(0x0000ffffu, v, 1);  // half-warp mask
  out[i * 6 + 0] = s;
  out[i * 6 + 1] = __shfl_sync(0xffffffffu, d, 0);
  out[i * 6 + 2] = u;
  out[i * 6 + 3] = float(__popc(bal) * 100 + cnt);
  out[i * 6 + 4] = float(any_big * 10 + all_small);
  out[i * 6 + 5] = h;
"""

TILED_SRC = """
  // C = A @ B with TSxTS tiles in *dynamic* shared memory (extern __shared__)
  extern __shared__ float smem[];
  float* As = smem;
  float* Bs = smem + TS * TS;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int r = blockIdx.y * TS + ty, c = blockIdx.x * TS + tx;
  const int M = a_shape[0], K = a_shape[1], N = b_shape[1];
  float acc = 0.0f;
  for (int k0 = 0; k0 < K; k0 += TS) {
    As[ty * TS + tx] = (r < M && k0 + tx < K) ? a[r * K + k0 + tx] : 0.0f;
    Bs[ty * TS + tx] = (k0 + ty < K && c < N) ? b[(k0 + ty) * N + c] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TS; k++) acc += As[ty * TS + k] * Bs[k * TS + tx];
    __syncthreads();
  }
  if (r < M && c < N) out[r * N + c] = SCALE * acc;
"""

MMA_SRC = """
  // C (M x N, f32) = A (M x K) @ B^T with B given as (N x K) [BT=false] or B (K x N) [BT=true].
  // Block: 2 warps, a 16 x 16 output tile; warp w owns columns n0 + 8w .. +8. Two-stage cp.async
  // pipeline over K in steps of 16; fragments through ldmatrix; mma.sync m16n8k16.
  __shared__ __align__(16) T As[2][16][16];
  __shared__ __align__(16) T Bs[2][16 * 16];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, t = threadIdx.x;
  const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 16;
  auto load = [&](int s, int k0) {
    const int row = (t % 32) / 2, half = t % 2;
    if (t < 32) {
      mmt::cp_async_16(&As[s][row][half * 8], a + (m0 + row) * K + k0 + half * 8);
    } else if (!BT) {
      mmt::cp_async_16(&Bs[s][row * 16 + half * 8], b + (n0 + row) * K + k0 + half * 8);
    } else {  // rows of B are k: 16 k x 16 n
      mmt::cp_async_16(&Bs[s][row * 16 + half * 8], b + (k0 + row) * N + n0 + half * 8);
    }
  };
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  load(0, 0);
  mmt::cp_async_commit();
  for (int kt = 0; kt < K / 16; kt++) {
    if (kt + 1 < K / 16) load((kt + 1) & 1, (kt + 1) * 16);
    mmt::cp_async_commit();
    if (WAIT) mmt::cp_async_wait<1>();
    __syncthreads();
    const int s = kt & 1;
    uint32_t af[4], bf[2];
    mmt::ldmatrix_x4(af, &As[s][((lane / 8) % 2) * 8 + lane % 8][(lane / 16) * 8]);
    const int i = (lane / 8) % 2, r = lane % 8;
    if (!BT) {
      mmt::ldmatrix_x2(bf, &Bs[s][(warp * 8 + r) * 16 + i * 8]);
    } else {
      mmt::ldmatrix_x2_trans(bf, &Bs[s][(i * 8 + r) * 16 + warp * 8]);
    }
    if (F16) mmt::mma_m16n8k16_f16(acc, af, bf, acc);
    else mmt::mma_m16n8k16_bf16(acc, af, bf, acc);
    __syncthreads();
  }
  const int g = lane / 4, tig = lane % 4;
  const int col = n0 + warp * 8 + 2 * tig;
  c[(m0 + g) * N + col] = acc[0];
  c[(m0 + g) * N + col + 1] = acc[1];
  c[(m0 + g + 8) * N + col] = acc[2];
  c[(m0 + g + 8) * N + col + 1] = acc[3];
"""

HALF_SRC = """
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n[0]) {
    h[i] = __half_as_ushort(__float2half(x[i]));
    b[i] = __bfloat16_as_ushort(__float2bfloat16(x[i]));
    const int j = i ^ 1;
    const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], x[j]);
    const __nv_bfloat162 q = __hfma2(p, __halves2bfloat162(__float2bfloat16(0.5f), __float2bfloat16(2.0f)),
                                     __bfloat162bfloat162(__float2bfloat16(1.0f)));
    f[i] = __bfloat162float(q.x) + __bfloat162float(__high2bfloat16(q)) + __half2float(__hmul(__float2half(x[i]), __float2half(3.0f)));
  }
"""

GRID_SRC = """
  // CUDA: gridDim = ceil(grid / block) full blocks; threads past the grid do run
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = float(gridDim.x * 100000 + blockDim.x * 100 + (i < 100 ? 1 : 2));
"""


def _mma_inputs(dt: str, bt: bool, M=32, K=64, N=48):
    a = RNG.standard_normal((M, K)).astype(np.float32)
    b = RNG.standard_normal((K, N) if bt else (N, K)).astype(np.float32)
    return a, b


def _cast16(x: np.ndarray, dt: str) -> np.ndarray:
    """float32 -> float16 / bfloat16 (as numpy with the right dtype) and back to float64."""
    if dt == "float16":
        return x.astype(np.float16)
    return em.f32_to_bf16_bits(x)


def cases():
    """(id, kernel kwargs, call kwargs with numpy inputs, reference fn or None, tolerance)."""
    out = []
    x = RNG.integers(-8, 8, 128).astype(np.float32)
    out.append(("warp", dict(name="warp", input_names=["x"], output_names=["out"], source=WARP_SRC),
                dict(inputs=[x], output_shapes=[(128 * 6,)], output_dtypes=["float32"], grid=(128, 1, 1),
                     threadgroup=(64, 1, 1)), None, 0.0))
    a = RNG.standard_normal((37, 50)).astype(np.float32)
    b = RNG.standard_normal((50, 29)).astype(np.float32)
    TS = 8
    out.append(("tiled", dict(name="tiled", input_names=["a", "b"], output_names=["out"], source=TILED_SRC,
                              shared_memory=2 * TS * TS * 4),
                dict(inputs=[a, b], output_shapes=[(37, 29)], output_dtypes=["float32"],
                     grid=(32, 40, 1), threadgroup=(TS, TS, 1), template=[("TS", TS), ("SCALE", 2)]),
                None, 1e-5))
    for dt in ("bfloat16", "float16"):
        for bt in (False, True):
            M, K, N = 32, 64, 48
            a, b = _mma_inputs(dt, bt, M, K, N)
            out.append((f"mma_{dt}_{'kn' if bt else 'nk'}",
                        dict(name="mma", input_names=["a", "b"], output_names=["c"], source=MMA_SRC, header=MMT),
                        dict(inputs=[_cast16(a, dt), _cast16(b, dt)], input_dtypes=[dt, dt],
                             output_shapes=[(M, N)], output_dtypes=["float32"], grid=(32 * 2 * (N // 16), M // 16, 1),
                             threadgroup=(64, 1, 1),
                             template=[("T", dt), ("K", K), ("N", N), ("BT", bt), ("F16", dt == "float16"),
                                       ("WAIT", True)]),
                        None, 1e-4))
    xs = (RNG.standard_normal(1000) * 100).astype(np.float32)
    out.append(("half", dict(name="half", input_names=["x", "n"], output_names=["h", "b", "f"], source=HALF_SRC),
                dict(inputs=[xs, 1000], output_shapes=[(1000,), (1000,), (1000,)],
                     output_dtypes=["uint16", "uint16", "float32"], grid=(1024, 1, 1), threadgroup=(256, 1, 1)),
                None, 0.0))
    out.append(("grid", dict(name="grid", input_names=["x"], output_names=["out"], source=GRID_SRC),
                dict(inputs=[np.zeros(1, np.float32)], output_shapes=[(128,)], output_dtypes=["float32"],
                     grid=(100, 1, 1), threadgroup=(64, 1, 1), init_value=-1.0), None, 0.0))
    return out


CASES = {c[0]: c for c in cases()}


def _emu_inputs(call):
    call = dict(call)
    dts = call.pop("input_dtypes", None)
    if dts:
        import mlx.core as mx

        ins = []
        for x, d in zip(call["inputs"], dts):
            arr = mx.array(x)
            ins.append(arr.view(mx.bfloat16) if d == "bfloat16" else arr)
        call["inputs"] = ins
    return call


def run_emulator(case_id: str, check=False, **over):
    _, kk, call, _, _ = CASES[case_id]
    k = em.cuda_kernel(**kk)
    call = _emu_inputs(dict(call, **over))
    call["output_dtypes"] = [getattr(__import__("mlx.core", fromlist=["x"]), d) for d in call["output_dtypes"]]
    if "template" in call:
        call["template"] = [(n, _tv(v)) for n, v in call["template"]]
    return [np.array(o) for o in k(check=check, **call)]


def _tv(v):
    import mlx.core as mx

    return getattr(mx, v) if isinstance(v, str) else v


# ---------------------------------------------------------------------------------------------
# CPU tests vs numpy
# ---------------------------------------------------------------------------------------------
def test_cuda_warp_functions():
    (out,) = run_emulator("warp", check=True)
    x = CASES["warp"][2]["inputs"][0]
    out = out.reshape(128, 6)
    for w in range(4):
        xs, o = x[w * 32 : (w + 1) * 32], out[w * 32 : (w + 1) * 32]
        np.testing.assert_array_equal(o[:, 0], xs.sum())
        np.testing.assert_array_equal(o[:, 1], xs.sum())
        np.testing.assert_array_equal(o[:, 2], np.concatenate([xs[:2], xs[:-2]]))
        np.testing.assert_array_equal(o[:, 3], (xs > 0).sum() * 101)
        np.testing.assert_array_equal(o[:, 4], float((xs > 6).any()) * 10 + float((xs < 8).all()))
        np.testing.assert_array_equal(o[:16, 5], xs[:16][np.arange(16) ^ 1])
        np.testing.assert_array_equal(o[16:, 5], 0.0)


@pytest.mark.parametrize("check", [False, True], ids=["fast", "check"])
def test_cuda_tiled_matmul_dynamic_shared(check):
    (out,) = run_emulator("tiled", check=check)
    a, b = CASES["tiled"][2]["inputs"]
    np.testing.assert_allclose(out, 2 * (a.astype(np.float64) @ b), rtol=1e-5, atol=1e-4)


def _mma_ref(case_id):
    call = CASES[case_id][2]
    dt = call["input_dtypes"][0]
    a16, b16 = call["inputs"]
    if dt == "float16":
        a, b = a16.astype(np.float64), b16.astype(np.float64)
    else:
        a, b = em.bf16_bits_to_f32(a16).astype(np.float64), em.bf16_bits_to_f32(b16).astype(np.float64)
    bt = dict(call["template"])["BT"]
    return a @ (b if bt else b.T)


@pytest.mark.parametrize("case_id", [c for c in CASES if c.startswith("mma")])
def test_cuda_mma_ldmatrix_cp_async_pipeline(case_id):
    (c,) = run_emulator(case_id, check=True)
    np.testing.assert_allclose(c, _mma_ref(case_id), rtol=1e-5, atol=1e-4)


def test_cuda_cp_async_is_deferred_until_wait():
    """Without cp.async.wait_group the staged tiles are stale: the result must be wrong."""
    cid = "mma_bfloat16_nk"
    tmpl = [(n, False if n == "WAIT" else v) for n, v in CASES[cid][2]["template"]]
    (c,) = run_emulator(cid, template=tmpl)
    assert not np.allclose(c, _mma_ref(cid), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(ml_dtypes is None, reason="needs ml_dtypes")
def test_cuda_16bit_intrinsics():
    h, b, f = run_emulator("half")
    x = CASES["half"][2]["inputs"][0]
    np.testing.assert_array_equal(h, x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(b, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    bf = lambda v: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    xj = x[np.arange(1000) ^ 1]
    qx = bf(bf(x) * 0.5 + 1.0)  # exact products, one rounding (fma)
    qy = bf(bf(xj) * 2.0 + 1.0)
    hm = (x.astype(np.float16).astype(np.float64) * 3.0).astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(f, (qx + qy).astype(np.float32) + hm, rtol=1e-6)


def test_cuda_full_blocks_run_past_the_grid():
    (out,) = run_emulator("grid")
    np.testing.assert_array_equal(out[:100], 2 * 100000 + 64 * 100 + 1)
    np.testing.assert_array_equal(out[100:], 2 * 100000 + 64 * 100 + 2)


def test_cuda_templates_and_signature_text():
    k = em.cuda_kernel("sig", ["a", "s"], ["out"], "out[0] = a[0] + s[0] + a_shape[0] + a_ndim;")
    arrs = [em.kernel._to_arr(np.zeros((2, 3), np.float32))[0], em.kernel._to_arr(1.5)[0]]
    name, text = em.cuda_source("sig", ["a", "s"], ["out"], k.source, "", arrs, ["bfloat16"],
                                [("T", np.float16), ("B", True), ("C", False), ("N", 7)])
    assert name == "custom_kernel_sig_float16_t_t_f_7"
    assert ("__global__ void custom_kernel_sig_float16_t_t_f_7(\n    const float* a,\n"
            "    const __grid_constant__ Shape a_shape,\n    const __grid_constant__ int a_ndim,\n"
            "    const float* s,\n    __nv_bfloat16* out) {\n  using T = __half;\n  constexpr bool B = true;\n"
            "  constexpr bool C = false;\n  constexpr int N = 7;\n\n") in text
    assert text.startswith('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n')
    assert text.endswith("\n}\n\n} // namespace mlx::core::cu\n")
    (out,) = k(inputs=[np.ones((2, 3), np.float32), np.float32(1.5)], output_shapes=[(1,)],
               output_dtypes=[np.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    assert out[0] == 1 + 1.5 + 2 + 2


# ---------------------------------------------------------------------------------------------
# check mode (CUDA)
# ---------------------------------------------------------------------------------------------
def _k(src, n=64, tg=64, check=True, inputs=None, smem=0):
    k = em.cuda_kernel("planted", ["a"], ["out"], src, shared_memory=smem)
    inputs = inputs if inputs is not None else [np.arange(n, dtype=np.float32)]
    return k(inputs=inputs, output_shapes=[(n,)], output_dtypes=[np.float32], grid=(n, 1, 1),
             threadgroup=(tg, 1, 1), check=check)[0]


def test_cuda_check_out_of_bounds_write():
    with pytest.raises(em.EmulatorCheckError) as e:
        _k("int i = threadIdx.x; out[i + (i == 63 ? 5 : 0)] = a[i];")
    assert "out-of-bounds write of buffer 'out' at element index 68" in str(e.value)
    assert "threadIdx=(63,0,0)" in str(e.value)


def test_cuda_check_shared_race_and_clean_version():
    racy = """
      __shared__ float t[64];
      int i = threadIdx.x;
      t[i] = a[i];
      SYNC
      out[i] = t[63 - i];
    """
    with pytest.raises(em.EmulatorCheckError, match="race"):
        _k(racy.replace("SYNC", ""))
    with pytest.raises(em.EmulatorCheckError, match="race"):  # a warp sync does not order two warps
        _k(racy.replace("SYNC", "__syncwarp();"))
    clean = racy.replace("SYNC", "__syncthreads();")
    np.testing.assert_array_equal(_k(clean), np.arange(64, dtype=np.float32)[::-1])


def test_cuda_check_warp_sync_orders_lanes_of_one_warp():
    src = """
      __shared__ float t[32];
      int i = threadIdx.x;
      t[i] = a[i];
      __syncwarp();
      out[i] = t[31 - i];
    """
    np.testing.assert_array_equal(_k(src, n=32, tg=32), np.arange(32, dtype=np.float32)[::-1])


def test_cuda_check_divergent_syncthreads():
    src = """
      int i = threadIdx.x;
      if (i >= 32) return;
      __syncthreads();
      out[i] = a[i];
    """
    with pytest.raises(em.EmulatorError, match="divergent barrier"):
        _k(src)
    with pytest.raises(em.EmulatorError, match="divergent barrier|deadlock"):
        _k(src, check=False)


def test_cuda_shfl_with_exited_lane_in_mask_is_an_error():
    src = """
      int i = threadIdx.x;
      if (i == 5) return;
      out[i] = __shfl_xor_sync(0xffffffffu, a[i], 1);
    """
    with pytest.raises(em.EmulatorError, match="lane 5"):
        _k(src, n=32, tg=32, check=False)


def test_cuda_unsupported_construct():
    with pytest.raises(em.EmulatorUnsupportedError, match="wmma"):
        _k("nvcuda::wmma::fragment<int> f; out[0] = a[0];")


# ---------------------------------------------------------------------------------------------
# GPU: the same kernels through mx.fast.cuda_kernel vs the emulator
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("case_id", list(CASES))
def test_gpu_cuda_kernels_match_emulator(case_id):
    import mlx.core as mx

    if not (getattr(mx, "cuda", None) and mx.cuda.is_available()):
        pytest.skip("needs MLX's CUDA backend")
    _, kk, call, _, tol = CASES[case_id]
    emu = run_emulator(case_id)
    kernel = mx.fast.cuda_kernel(**kk)
    c = _emu_inputs(call)
    c["inputs"] = [x if isinstance(x, mx.array) else mx.array(x) for x in c["inputs"]]
    c["output_dtypes"] = [getattr(mx, d) for d in c["output_dtypes"]]
    if "template" in c:
        c["template"] = [(n, _tv(v)) for n, v in c["template"]]
    gpu = [np.array(o) for o in kernel(**c)]
    for g, e in zip(gpu, emu):
        if tol == 0.0:
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol)
