"""qmm and qmm_glu: the reuse kernels, expert-major.

Each block owns (expert, N tile) and walks that expert's rows in BM-row chunks, taken in sorted
order from the routing plan (`order`, `offsets`): sorted position i reads x row order[i] / X_DIV
and writes y row order[i] (the unsort is fused). Each has a `sorted_twin` for ids already grouped
by expert (mlx-lm's sorted layout), which finds its rows in the ids themselves: no plan launch. qmm_glu runs the gate and up weight sets in
one pass over x and writes silu(gate) * up.

CUDA tile (cuda/qmm.cu): BM rows per chunk (the mma n side, multiple of 8), FN 16-row fragments
per warp, WN warps along N, WK warps splitting K, MC chunks per block (row split: a hot expert
is spread over ceil(rows / (BM*MC)) blocks per N tile), KU k blocks loaded per step (bytes in
flight; KU=2 reads whole 128-byte lines of each W row). 4-bit with BM >= 16 stages x in shared
memory through a 2-3 deep cp.async pipeline. Metal tile: see kernels/metal_tiles.py.
"""
from __future__ import annotations

from typing import Mapping

from ..backend import Backend
from . import metal_tiles
from .common import (CUDA_MAX_ACC, CUDA_STATIC_SMEM, GRID_LIMIT, WARP, ceil_div, check_format_cuda,
                     check_prefetch, check_w_in_flight, cuda_dynamic_smem)
from .family import Launch, gather_families

CUDA_SPACE: dict[str, tuple[int, ...]] = {
    "BM": (8, 16, 32, 64),
    "FN": (1, 2),
    "WN": (4,),
    "WK": (1,),
    "MC": (4,),
    "KU": (1, 2),
    # L2 prefetch distance in k blocks (warp_gemm). Searched at 0 only until an H200 A/B of PF > 0
    # (scripts/h200/next.sh) says otherwise: each value doubles the space's NVRTC compiles. The op
    # takes any PF >= 0 given in a config (tests/test_kernels_cuda.py checks PF = 3 on the emulator).
    "PF": (0,),
    # 1: W through shared memory (cp.async with the x tile; warp_gemm WS). Searched at 0 only until
    # an H200 A/B (scripts/h200/next.sh ab); the op takes WS=1 where it is valid.
    "WS": (0,),
}
OPTIONAL = {"cuda": {"PF": 0, "WS": 0}}


def _threads(config: Mapping[str, int]) -> int:
    return WARP * config["WN"] * config["WK"]


def cuda_blocks(problem, config: Mapping[str, int], route: str = "plan") -> int:
    """Upper bound of (unit, N tile) blocks, with no host sync on the routing (units: see
    cuda/mmt_gather.cuh). Plan: floor(P / RPU) + min(E, P) runs of at most RPU = BM*MC rows,
    plus the unit that zeroes bad ids' rows. Sorted: one per RPU-row chunk plus one per expert."""
    rows, rpu = max(problem.rows, 0), config["BM"] * config["MC"]
    if route == "sorted":
        units = ceil_div(rows, rpu) + problem.experts
    else:
        units = rows // rpu + min(problem.experts, rows) + 1
    return units * ceil_div(problem.n, 16 * config["FN"] * config["WN"])


def xs_smem_bytes(problem, config: Mapping[str, int]) -> int:
    """Bytes of the shared-memory x tile (cuda/mmt_gather.cuh XsTile; 0 when x is not staged)."""
    bm, ku = config["BM"], config["KU"]
    if problem.bits != 4 or bm < 16:
        return 0
    tile = bm * 16 * 16  # bytes of one k block: BM rows x 128 values x 2 bytes
    stages = 3 if tile * ku * 3 <= 40 * 1024 else 2
    return stages * ku * tile


def ws_smem_bytes(problem, config: Mapping[str, int], glu: bool) -> int:
    """Dynamic shared memory the launch asks for with WS=1 (cuda/mmt_gather.cuh warp_gemm's W
    slots: per stage and k block of a step, 16 bytes per thread and (weight set, 16-row fragment,
    half)), raised where MLX would otherwise not opt in (cuda_dynamic_smem); 0 for WS=0."""
    if not config.get("WS", 0):
        return 0
    bm, ku = config["BM"], config["KU"]
    stages = 3 if bm * 16 * 16 * ku * 3 <= 40 * 1024 else 2  # as XsTile::SS and xs_smem_bytes
    slots = stages * ku * (2 if glu else 1) * config["FN"] * 2 * _threads(config) * 16
    return cuda_dynamic_smem(xs_smem_bytes(problem, config) + 64, slots)


def _check(problem, config: Mapping[str, int], backend: Backend, glu: bool, route: str = "plan") -> str | None:
    if backend.dialect == "metal":
        return metal_tiles.check_qmm(problem, config, backend, glu=glu)
    if (why := check_format_cuda(problem)) is not None:
        return why
    bm, fn, wn, wk, mc, ku = (config[k] for k in ("BM", "FN", "WN", "WK", "MC", "KU"))
    if ku < 1:
        return f"KU={ku} must be >= 1"
    if (why := check_prefetch(config)) is not None:
        return why
    xs_bytes = xs_smem_bytes(problem, config)
    if xs_bytes and wk != 1:
        return "4-bit with BM >= 16 stages x in shared memory, which needs WK=1"
    if xs_bytes + 64 > CUDA_STATIC_SMEM:
        return f"x tile {xs_bytes} B of shared memory > {CUDA_STATIC_SMEM} B (lower BM or KU)"
    ws = config.get("WS", 0)
    if ws not in (0, 1):
        return f"WS={ws} must be 0 or 1 (W through shared memory)"
    if ws and not xs_bytes:
        return "WS=1 (W through shared memory) needs the shared-x path: 4-bit weights and BM >= 16"
    if ws and (total := xs_bytes + ws_smem_bytes(problem, config, glu)) + 64 > backend.max_shared_bytes:
        return f"WS=1: {total} B of shared memory > {backend.max_shared_bytes} B (lower BM, FN or KU)"
    if bm % 8 or bm <= 0:
        return f"BM={bm} must be a positive multiple of 8 (the mma n side)"
    if mc < 1:
        return f"MC={mc} must be >= 1"
    threads = _threads(config)
    if threads > backend.max_threads:
        return f"{threads} threads per block > {backend.max_threads}"
    acc = (2 if glu else 1) * fn * (bm // 8) * 4
    if acc > CUDA_MAX_ACC:
        return f"{acc} accumulator floats per lane > {CUDA_MAX_ACC} (register spill)"
    if (why := check_w_in_flight(config, 2 if glu else 1)) is not None:
        return why
    smem = (wk - 1) * wn * acc * WARP * 4
    if smem > CUDA_STATIC_SMEM:
        return f"split-K buffer {smem} B > {CUDA_STATIC_SMEM} B of static shared memory"
    if cuda_blocks(problem, config, route) * threads > GRID_LIMIT:
        return f"{problem.rows} rows need more than 2^31 threads with BM={bm}, MC={mc}"
    return None


def _launch(problem, config: Mapping[str, int], backend: Backend, glu: bool = False,
            route: str = "plan") -> Launch:
    if backend.dialect == "metal":
        return Launch(*metal_tiles.launch_qmm(problem, config))
    threads = _threads(config)
    return Launch((threads * cuda_blocks(problem, config, route), 1, 1), (threads, 1, 1),
                  ws_smem_bytes(problem, config, glu))


QMM, QMM_GLU = gather_families("qmm", "plan", {"cuda": CUDA_SPACE, "metal": metal_tiles.QMM_SPACE},
                                _check, _launch, OPTIONAL)
