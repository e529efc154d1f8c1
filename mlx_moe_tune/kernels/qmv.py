"""qmv and qmv_glu: the no-reuse gather kernels (decode / m ~ 1), one (token, expert) pair per
block column. qmv_glu runs the gate and up weight sets on the same x loads and writes
silu(gate) * up: a decode step's gate+up in one launch.

Expert ids are read directly (no sort), so a decode step is a single launch. Inputs: x (X, K), w (E, N, K*bits/32) uint32, scales/biases (E, N, K/gs), idx (P,);
x row of pair p is p / X_DIV; output y (P, N).

CUDA tile (cuda/qmv.cu): FN 16-row mma fragments per warp, WN warps along N, WK warps splitting
K inside the block (reduced through shared memory), KU k blocks loaded per step and warp (bytes
in flight). Metal tile: see kernels/metal_tiles.py.
"""
from __future__ import annotations

from typing import Mapping

from ..backend import Backend
from . import metal_tiles
from .common import (CUDA_STATIC_SMEM, GRID_LIMIT, WARP, ceil_div, check_format_cuda, check_prefetch,
                     check_w_in_flight)
from .family import Launch, gather_families

CUDA_SPACE: dict[str, tuple[int, ...]] = {
    "FN": (1, 2),
    "WN": (2, 4),
    "WK": (2, 4),
    "KU": (1, 2),
    # L2 prefetch distance in k blocks (warp_gemm). Searched at 0 only until an H200 A/B of PF > 0
    # (scripts/h200/next.sh) says otherwise: each value doubles the space's NVRTC compiles. The op
    # takes any PF >= 0 given in a config (tests/test_kernels_cuda.py checks PF = 3 on the emulator).
    "PF": (0,),
}
OPTIONAL = {"cuda": {"PF": 0}}


def _cuda_threads(config: Mapping[str, int]) -> int:
    return WARP * config["WN"] * config["WK"]


def _cuda_blocks(problem, config: Mapping[str, int]) -> int:
    return max(problem.rows, 0) * ceil_div(problem.n, 16 * config["FN"] * config["WN"])


def _check(problem, config: Mapping[str, int], backend: Backend, glu: bool, route: str = "ids") -> str | None:
    if backend.dialect == "metal":
        return metal_tiles.check_qmv(problem, config, backend, glu=glu)
    if (why := check_format_cuda(problem)) is not None:
        return why
    fn, wn, wk = config["FN"], config["WN"], config["WK"]
    if config["KU"] < 1:
        return f"KU={config['KU']} must be >= 1"
    if (why := check_prefetch(config)) is not None:
        return why
    threads = _cuda_threads(config)
    if threads > backend.max_threads:
        return f"{threads} threads per block > {backend.max_threads}"
    sets = 2 if glu else 1
    if threads * config["KU"] * sets > 512:
        # ~100 registers per KU step buffer and weight set: 512 threads x 2 steps exceed the 64K
        # register file (the H100 refuses the launch: "too many resources requested")
        return (f"{threads} threads x KU={config['KU']} x {sets} weight set(s) exceed the register "
                f"file (threads*KU*sets <= 512)")
    if (why := check_w_in_flight(config, sets)) is not None:
        return why
    smem = (wk - 1) * wn * sets * fn * 4 * WARP * 4
    if smem > CUDA_STATIC_SMEM:
        return f"split-K buffer {smem} B > {CUDA_STATIC_SMEM} B of static shared memory"
    if _cuda_blocks(problem, config) * threads > GRID_LIMIT:
        return f"{problem.rows} pairs need more than 2^31 threads: use the qmm family"
    return None


def launch(problem, config: Mapping[str, int], backend: Backend, glu: bool = False, route: str = "ids") -> Launch:
    if backend.dialect == "metal":
        return Launch(*metal_tiles.launch_qmv(problem, config))
    threads = _cuda_threads(config)
    return Launch((threads * _cuda_blocks(problem, config), 1, 1), (threads, 1, 1))


QMV, QMV_GLU = gather_families("qmv", "ids", {"cuda": CUDA_SPACE, "metal": metal_tiles.QMV_SPACE},
                                _check, launch, OPTIONAL)
