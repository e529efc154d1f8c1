"""Does a process's allocation history slow later measurements? Measure one qwen3 gate/up point
(the buckets the separate-process check found 11-18% faster than the tune), then build and drop the
cases of other shapes as the tuner does before it reaches that shape, then measure the same
point again on freshly allocated weights. Writes OUT/alloc-history.csv.
    python3 scripts/h100/alloc_history.py OUT
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import mlx.core as mx

from mlx_moe_tune import measure, tune
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem

POINT = (128, 2048, 768, 4, "qmm", {"BM": 8, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2})
OTHER = [(128, 2816, 1408), (128, 2816, 704)]


def measure_point(seed: int, label: str, rows: list) -> None:
    E, K, N, m, fam, cfg = POINT
    p = Problem(experts=E, k=K, n=N, rows=m * E, bits=4, group_size=64, dtype="bfloat16", m=float(m))
    case = measure.prepare_case(p, m=m, top_k=8, seed=seed)
    fn = tune._op_kernel(registry.get(fam)).build(case, cfg)
    for rnd in range(3):
        t = measure.time_fn(fn, iters=30)
        r = dict(label=label, seed=seed, round=rnd, time_us=round(t.median_us, 2),
                 gbps=round(case.weight_bytes / t.median_us / 1e3, 1), active_mb=round(mx.get_active_memory() / 1e6),
                 cache_mb=round(mx.get_cache_memory() / 1e6))
        rows.append(r)
        print(r, flush=True)


def churn(keep: list) -> None:
    """What the tuner does to other shapes: cases at every m, several seeds; some kept alive."""
    for E, K, N in OTHER:
        for m in (1, 2, 4, 8, 16, 32, 64):
            p = Problem(experts=E, k=K, n=N, rows=m * E, bits=4, group_size=64, dtype="bfloat16", m=float(m))
            case = measure.prepare_case(p, m=m, top_k=8, seed=0)
            keep.append(measure.case_reference(case))
            del case


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    measure_point(1, "fresh process", rows)
    measure._WEIGHTS.clear()
    keep: list = []
    churn(keep)
    measure._WEIGHTS.clear()
    measure_point(2, "after other shapes (references kept)", rows)
    del keep
    gc.collect()
    measure._WEIGHTS.clear()
    mx.clear_cache()
    measure_point(3, "after gc + clear_cache", rows)
    measure.write_rows(out / "alloc-history.csv", rows)
