"""Why do table GB/s move up to 20% between processes? Re-measure three table choices over fresh
weight allocations (4 seeds), with the default cache-defeat copies (1-2 for these shapes) and with
4 copies forced: if the spread is per allocation, more copies average it out.
Writes OUT/repro-noise.csv.   python3 scripts/h100/repro_noise.py OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

from mlx_moe_tune import measure, tune
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem

POINTS = [  # E, K, N, m, family, config: the worst separate-process reruns of the shipped tables
    (128, 768, 2048, 1, "qmv", {"FN": 2, "WN": 2, "WK": 4, "KU": 2}),
    (128, 2816, 704, 8, "qmm", {"BM": 8, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}),
    (128, 2816, 1408, 16, "qmm", {"BM": 16, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}),
]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    default_copies = measure.copies_for
    for forced in (None, 4):
        measure.copies_for = default_copies if forced is None else (lambda nbytes, available=None: forced)
        for E, K, N, m, fam, cfg in POINTS:
            for seed in range(4):
                measure._WEIGHTS.clear()
                p = Problem(experts=E, k=K, n=N, rows=m * E, bits=4, group_size=64, dtype="bfloat16", m=float(m))
                case = measure.prepare_case(p, m=m, top_k=8, seed=seed)
                fn = tune._op_kernel(registry.get(fam)).build(case, cfg)
                t = measure.time_fn(fn, iters=30)
                r = dict(K=K, N=N, m=m, family=fam, copies=case.copies, seed=seed, time_us=t.median_us,
                         gbps=case.weight_bytes / t.median_us / 1e3)
                rows.append(r)
                print(r, flush=True)
                del case, fn
    measure.write_rows(out / "repro-noise.csv", rows)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
