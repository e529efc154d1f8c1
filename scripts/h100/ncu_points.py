"""Run one gemma-26b-a4b point a few times, for Nsight Compute to profile (ncu -k regex:mmt_q).

    ncu ... python3 scripts/h100/ncu_points.py INDEX          # a point of POINTS (H100 tables)
    ncu ... python3 scripts/h100/ncu_points.py N M FAMILY CONFIG_ID   # any point, e.g. 1408 32 qmm BM32_FN2_WN4_WK1_MC4_KU1
"""
from __future__ import annotations

import sys

import mlx.core as mx

from mlx_moe_tune import measure, tune
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem, parse_config_id

POINTS = [  # N, m, family, config (shipped H100 gemma-26b-a4b choices)
    (1408, 1, "qmv", {"FN": 2, "WN": 4, "WK": 2, "KU": 1}),
    (1408, 8, "qmm", {"BM": 8, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}),
    (1408, 16, "qmm", {"BM": 16, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}),
    (1408, 64, "qmm", {"BM": 64, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 1}),
]

if __name__ == "__main__":
    if len(sys.argv) == 5:
        N, m, fam, cfg = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], parse_config_id(sys.argv[4])
    else:
        N, m, fam, cfg = POINTS[int(sys.argv[1])]
    p = Problem(experts=128, k=2816, n=N, rows=m * 128, bits=4, group_size=64, dtype="bfloat16", m=float(m))
    case = measure.prepare_case(p, m=m, top_k=8, seed=0)
    fn = tune._op_kernel(registry.get(fam)).build(case, cfg)
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    print("bytes", case.weight_bytes)
