"""Where does the rerun-to-rerun spread of H100 timings come from? For DURATION seconds, measure in
turn the stream-read roofline and two shipped-table points (short time_fn windows), with a
timestamp each, while `nvidia-smi` logs clocks, power and throttle reasons every 100 ms. If the
kernels' GB/s move together with the roofline or with the SM clock, the spread is the device's
state, not our timer. Writes OUT/noise-trace.csv (+ the nvidia-smi log written by the caller).
    python3 scripts/h100/noise_trace.py OUT [DURATION]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from mlx_moe_tune import measure, tune
from mlx_moe_tune.kernels import registry
from mlx_moe_tune.kernels.family import Problem

POINTS = [  # name, N, m, family, config (shipped gemma-26b-a4b choices)
    ("qmv_m1", 1408, 1, "qmv", {"FN": 2, "WN": 4, "WK": 2, "KU": 1}),
    ("qmm_m16", 1408, 16, "qmm", {"BM": 16, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}),
]


def main(out: Path, duration: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fns = []
    for name, N, m, fam, cfg in POINTS:
        p = Problem(experts=128, k=2816, n=N, rows=m * 128, bits=4, group_size=64, dtype="bfloat16", m=float(m))
        case = measure.prepare_case(p, m=m, top_k=8, seed=0)
        fns.append((name, tune._op_kernel(registry.get(fam)).build(case, cfg), case.weight_bytes))
    sfn, sbytes = measure.bandwidth_fn("stream")
    fns.append(("stream", sfn, sbytes))
    t_start = time.time()
    rows = []
    while time.time() - t_start < duration:
        for name, fn, nbytes in fns:
            t = measure.time_fn(fn, iters=10)
            best = min(t.samples_us)
            r = dict(t=round(time.time() - t_start, 3), wall=time.time(), point=name, median_us=t.median_us,
                     min_us=best, p90_us=t.p90_us, batch=t.batch, gbps=nbytes / t.median_us / 1e3,
                     gbps_best=nbytes / best / 1e3)
            rows.append(r)
            print(r, flush=True)
    measure.write_rows(out / "noise-trace.csv", rows)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"), float(sys.argv[2]) if len(sys.argv) > 2 else 60)
