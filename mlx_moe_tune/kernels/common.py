"""What the gather_qmm kernel families share: format checks, template arguments, launch math.

The families (kernels/qmv.py, kernels/qmm.py) are data; these helpers keep their check /
template / launch rules short and identical across families. Dialect-specific tile rules
live beside the sources' dialect: CUDA here, Metal in kernels/metal_tiles.py.
"""
from __future__ import annotations

from typing import Mapping

import mlx.core as mx

from ..backend import Backend

WARP = 32  # SIMD width, both dialects
# CUDA: static __shared__ (split-K reduction buffer) must stay under the 48 KB static limit.
CUDA_STATIC_SMEM = 48 * 1024
# Without the opt-in (cuFuncSetAttribute) a block's static + dynamic shared memory stays within
# 48 KB; MLX's cuda_kernel opts in only for more than 48000 dynamic bytes (cuda/custom_kernel.cpp).
MLX_OPTIN_DYNAMIC = 48000


def cuda_dynamic_smem(static: int, dynamic: int) -> int:
    """Dynamic shared memory to ask MLX for: `dynamic`, raised past MLX_OPTIN_DYNAMIC when static +
    dynamic exceed 48 KB but dynamic alone does not (MLX would not opt in, and the launch fail)."""
    if dynamic and static + dynamic > CUDA_STATIC_SMEM and dynamic <= MLX_OPTIN_DYNAMIC:
        return MLX_OPTIN_DYNAMIC + 16
    return dynamic


# Accumulator floats per lane above which the register tile spills (255 regs per thread).
CUDA_MAX_ACC = 64
# W fragments a lane holds in flight: weight sets x FN x KU. Above 4, ptxas spills: compiled with
# NVRTC 13.5 for sm_90a at the gemma-26b-a4b shapes (`mlx-moe-tune ptxas`, sweeps/results/nvrtc/),
# every shipped-space config above it spilled (qmm_glu FN2 KU2 at BM 8/16/32: 124-636 B; qmv_glu
# FN2 KU2: 272 B) and none at or below it did (up to 255 registers without a spill).
CUDA_MAX_W_IN_FLIGHT = 4
CUDA_DTYPES = ("float16", "bfloat16")  # the mma.sync operand types
GRID_LIMIT = 2**31 - 1  # grid.x in threads is an int

_MX_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def mx_dtype(name: str):
    try:
        return _MX_DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported activation dtype {name!r}; choose from {sorted(_MX_DTYPES)}") from None


def dtype_name(dtype) -> str:
    for k, v in _MX_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"unsupported activation dtype {dtype}; choose from {sorted(_MX_DTYPES)}")


def check_format_cuda(problem) -> str | None:
    """Why the CUDA kernels cannot run this quantization format / dtype, or None."""
    if problem.mode != "affine":
        return f"CUDA kernels support affine quantization only (got mode {problem.mode!r})"
    if problem.bits not in (2, 4, 8):
        return f"CUDA kernels support bits 2, 4, 8 (got {problem.bits})"
    if problem.group_size not in (32, 64, 128):
        return f"group size must be 32, 64 or 128 (got {problem.group_size})"
    if problem.k % problem.group_size:
        return f"K={problem.k} is not a multiple of the group size {problem.group_size}"
    if problem.dtype not in CUDA_DTYPES:
        return f"CUDA kernels take float16 or bfloat16 activations (got {problem.dtype})"
    return None


def template_args(problem, config: Mapping[str, int], x_div: int = 1) -> list[tuple[str, object]]:
    """Template arguments in the contract's order: T, BITS, GS, K, N, E, X_DIV, then the tile."""
    return [
        ("T", mx_dtype(problem.dtype)),
        ("BITS", int(problem.bits)),
        ("GS", int(problem.group_size)),
        ("K", int(problem.k)),
        ("N", int(problem.n)),
        ("E", int(problem.experts)),
        ("X_DIV", int(x_div)),
        *((k, int(v)) for k, v in config.items()),
    ]


def check_w_in_flight(config, sets: int) -> str | None:
    """Why a CUDA tile holds too many W fragments per lane (CUDA_MAX_W_IN_FLIGHT), or None."""
    n = sets * config["FN"] * config["KU"]
    if n > CUDA_MAX_W_IN_FLIGHT:
        return (f"{sets} weight set(s) x FN={config['FN']} x KU={config['KU']} = {n} W fragments in flight "
                f"per lane > {CUDA_MAX_W_IN_FLIGHT} (ptxas spills registers)")
    return None


def check_prefetch(config) -> str | None:
    """PF, the CUDA kernels' L2 prefetch distance in k blocks (cuda/mmt_gather.cuh warp_gemm)."""
    pf = config.get("PF", 0)
    return None if pf >= 0 else f"PF={pf} must be >= 0 (k blocks of L2 prefetch ahead; 0: none)"


def as_dtype(a: mx.array, dtype) -> mx.array:
    """`a` in `dtype`; an astype to the same dtype would still add a graph node (the decode path)."""
    return a if a.dtype == dtype else a.astype(dtype)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
