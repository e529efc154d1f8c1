"""Metal side of the gather_qmm kernel families: tile spaces, Apple's limits, launch geometry.

The families themselves (qmv, qmv_glu, qmm, qmm_glu: inputs, template, CUDA rules) are defined once in
kernels/qmv.py and kernels/qmm.py; they call these functions when `backend.dialect == "metal"`.
Sources: metal/qmv.metal, metal/qmv_glu.metal, metal/qmm.metal, metal/qmm_glu.metal, all with metal/mmt_gather.h.

Tile parameters (Metal names):
  qmv      RPS output rows per simdgroup, SG simdgroups per threadgroup, VPT K values per lane per
           step, PR (token, expert) pairs per threadgroup held in registers.
  qmm/glu  BM rows x BN columns per threadgroup tile, BK K depth staged per step, WM x WN
           simdgroups (each owns a (BM/WM) x (BN/WN) block of 8x8 simdgroup matrices).
"""
from __future__ import annotations

from typing import Mapping

from ..backend import Backend

SIMD = 32

# Shipped search spaces. Every config here is run against the numpy reference in CI
# (tests/test_metal_kernels.py) and by `mlx-moe-tune selftest`.
QMV_SPACE: dict[str, tuple[int, ...]] = {
    "RPS": (4, 8),
    "SG": (2, 4),
    "VPT": (8, 16),
    "PR": (1, 4),
}
QMM_SPACE: dict[str, tuple[int, ...]] = {
    "BM": (8, 16, 32),
    "BN": (32, 64),
    "BK": (32, 64),
    "WM": (1, 2),
    "WN": (2, 4),
}

# Registers per lane are not a hard limit on Apple GPUs, but spilling kills a kernel: cap the
# float accumulators (2 per 8x8 fragment) and the qmv register tile at sizes MLX's kernels use.
MAX_ACC_FLOATS = 64
MAX_QMV_REGS = 96

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unsupported activation dtype {dtype!r}; choose from {sorted(_DTYPE_BYTES)}")


def _common(problem, bits_ok=(2, 4, 8)) -> str | None:
    if problem.mode != "affine":
        return f"Metal kernels support affine quantization only (got {problem.mode!r})"
    if problem.bits not in bits_ok:
        return f"Metal kernels support bits {bits_ok} (got {problem.bits})"
    if problem.group_size not in (32, 64, 128):
        return f"group size must be 32, 64 or 128 (got {problem.group_size})"
    if problem.k % problem.group_size:
        return f"K={problem.k} is not a multiple of the group size {problem.group_size}"
    dtype_bytes(problem.dtype)
    return None


def check_qmv(problem, config: Mapping[str, int], backend: Backend, glu: bool = False) -> str | None:
    """Why `config` cannot run `problem` on this Metal backend, or None (glu: two weight sets,
    twice the accumulators)."""
    if (why := _common(problem)) is not None:
        return why
    rps, sg, vpt, pr = config["RPS"], config["SG"], config["VPT"], config["PR"]
    pf = 32 // problem.bits
    if vpt % pf:
        return f"VPT={vpt} is not a whole number of packed words ({pf} values each at {problem.bits} bits)"
    if problem.group_size % vpt:
        return f"VPT={vpt} does not divide the group size {problem.group_size} (one scale per lane chunk)"
    threads = SIMD * sg
    if threads > backend.max_threads:
        return f"{threads} threads per threadgroup > {backend.max_threads}"
    regs = pr * vpt + (2 if glu else 1) * pr * rps + vpt // pf
    if regs > MAX_QMV_REGS:
        what = "PR*VPT + 2*PR*RPS" if glu else "PR*VPT + PR*RPS"
        return f"register tile {what} = {regs} > {MAX_QMV_REGS}"
    return None


def launch_qmv(problem, config: Mapping[str, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid in threads, threadgroup) for qmv; pairs on x, the only axis that grows with tokens."""
    tg = SIMD * config["SG"]
    n_blocks = -(-problem.n // (config["SG"] * config["RPS"]))
    pair_blocks = -(-problem.rows // config["PR"])
    return (tg * max(pair_blocks, 1), n_blocks, 1), (tg, 1, 1)


def qmm_threadgroup_bytes(problem, config: Mapping[str, int], glu: bool = False) -> int:
    """Threadgroup memory of metal/qmm(_glu).metal: x tile, 1-2 W tiles (rows padded by 16
    bytes, as declared there) and two int row maps."""
    tb = dtype_bytes(problem.dtype)
    ld = config["BK"] + 16 // tb
    w_tiles = 2 if glu else 1
    return (config["BM"] * ld + w_tiles * config["BN"] * ld) * tb + 2 * config["BM"] * 4


def check_qmm(problem, config: Mapping[str, int], backend: Backend, glu: bool = False) -> str | None:
    if (why := _common(problem)) is not None:
        return why
    bm, bn, bk, wm, wn = (config[k] for k in ("BM", "BN", "BK", "WM", "WN"))
    if bm % (8 * wm):
        return f"BM={bm} is not a multiple of 8*WM={8 * wm} (8x8 simdgroup matrices)"
    if bn % (8 * wn):
        return f"BN={bn} is not a multiple of 8*WN={8 * wn} (8x8 simdgroup matrices)"
    pf = 32 // problem.bits
    if bk % 8 or bk % pf:
        return f"BK={bk} must be a multiple of 8 and of {pf} (values per packed word)"
    gs = problem.group_size
    if gs % bk and bk % gs:
        return f"BK={bk} and group size {gs}: one must divide the other"
    threads = SIMD * wm * wn
    if threads > backend.max_threads:
        return f"{threads} threads per threadgroup > {backend.max_threads}"
    smem = qmm_threadgroup_bytes(problem, config, glu)
    if smem > backend.max_shared_bytes:
        return f"threadgroup memory {smem} B > {backend.max_shared_bytes} B"
    acc = (bm // (8 * wm)) * (bn // (8 * wn)) * 2 * (2 if glu else 1)
    if acc > MAX_ACC_FLOATS:
        return f"{acc} accumulator floats per lane > {MAX_ACC_FLOATS}"
    return None


def check_qmm_glu(problem, config: Mapping[str, int], backend: Backend) -> str | None:
    return check_qmm(problem, config, backend, glu=True)


def launch_qmm(problem, config: Mapping[str, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid in threads, threadgroup) for qmm / qmm_glu: one threadgroup per (N tile, expert);
    N tiles of one expert are neighbours in dispatch order, so they share its x rows in cache.
    One more row of threadgroups (y = E) zeroes the rows of ids outside [0, E)."""
    tg = SIMD * config["WM"] * config["WN"]
    n_blocks = -(-problem.n // config["BN"])
    return (tg * n_blocks, problem.experts + 1, 1), (tg, 1, 1)


def default_choice(problem, glu: bool = False) -> tuple[str, dict[str, int]]:
    """Family and tile when no tuning table covers a Metal problem (reasoned, not measured: no
    Apple GPU was available). MLX's own choices: qmv with 2 simdgroups x 4 rows and 16 values
    per lane at m ~ 1; 8x8-fragment tiles with 64-128 threads above it, BM near m (a row
    chunk never straddles experts here, so a small BM wastes nothing but re-reads of W)."""
    m = problem.rows_per_expert
    if m <= 1.5:
        vpt = 16 if problem.group_size % 16 == 0 else 8
        return ("qmv_glu" if glu else "qmv"), {"RPS": 4, "SG": 2, "VPT": vpt, "PR": 1}
    bm = 8 if m <= 8 else 16 if m <= 16 else 32
    return ("qmm_glu" if glu else "qmm"), {"BM": bm, "BN": 64, "BK": 32, "WM": 1 if bm == 8 else 2, "WN": 2}
