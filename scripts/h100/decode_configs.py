"""Decode (1 token, top-8: 8 pairs) per qmv config, as a chain of 32 dependent calls per eval
(each call's x is the previous call's output), for the shipped presets' shapes. The tuning
tables' m=1 bucket is measured with every expert active (T=E/top_k tokens); a decode step has
only top_k pairs, so it may want another tile. Two floor rows per shape show what any custom
kernel call costs in such a chain: `floor.cuda_kernel` (a trivial mx.fast.cuda_kernel copying the
K hand-off values) and `floor.elementwise` (y * 1, MLX's own kernel). DECODE_SHAPES=0,1 picks
shapes by index. Writes OUT/decode-configs.csv and .json.

    python3 scripts/h100/decode_configs.py OUT
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_moe_tune import measure, ops
from mlx_moe_tune.kernels.family import Problem, config_id
from mlx_moe_tune.kernels.qmv import QMV
from mlx_moe_tune.backend import get_backend

SHAPES = [(128, 2816, 1408), (128, 2816, 704), (128, 2048, 768), (128, 768, 2048)]
TOP_K, CHAIN = 8, 32
Q = dict(group_size=64, bits=4)


_FLOOR = None


def floor_copy(y: mx.array) -> mx.array:
    """A trivial custom-kernel call: the per-call floor of any mx.fast.cuda_kernel in the chain."""
    global _FLOOR
    if _FLOOR is None:
        _FLOOR = mx.fast.cuda_kernel(name="mmt_floor_copy", input_names=["x"], output_names=["y"], source=(
            "const int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < SIZE) y[i] = x[i];"))
    n = y.size
    (out,) = _FLOOR(inputs=[y], template=[("SIZE", n)], grid=((n + 255) // 256 * 256, 1, 1),
                    threadgroup=(256, 1, 1), output_shapes=[y.shape], output_dtypes=[y.dtype])
    return out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    b = get_backend(None)
    shapes = [(16, 256, 128)] if os.environ.get("SMOKE") else SHAPES
    if os.environ.get("DECODE_SHAPES"):
        shapes = [shapes[int(i)] for i in os.environ["DECODE_SHAPES"].split(",")]
    rows = []
    for E, K, N in shapes:
        p = Problem(experts=E, k=K, n=N, rows=TOP_K, bits=4, group_size=64, dtype="bfloat16", m=1.0)
        case = measure.prepare_case(p, m=1, top_k=TOP_K)

        def record(name, config, f):
            try:
                t = measure.time_fn(measure.decode_chain(case, f, CHAIN))
                r = dict(E=E, K=K, N=N, kernel=name, config=config, time_us=t.median_us / CHAIN,
                         time_us_p10=t.p10_us / CHAIN, time_us_p90=t.p90_us / CHAIN, status="ok")
            except Exception as e:  # noqa: BLE001 (recorded, the sweep goes on)
                r = dict(E=E, K=K, N=N, kernel=name, config=config, status=f"failed: {str(e)[:120]}")
            rows.append(r)
            print(r, flush=True)

        d = ops.describe(mx.zeros((1, 1, 1, K), mx.bfloat16), *case.weights(0), mx.zeros((1, TOP_K), mx.int32), **Q)
        op = lambda y, w, s, bb, i: ops.gather_qmm(y, w, s, bb, i, **Q, validate=False)  # noqa: E731
        record("op", f"{d['family']}:{d['config']}@{d['source']}", op)
        for c in QMV.valid_configs(p, b):
            record("qmv", config_id(c), lambda y, w, s, bb, i, c=c: ops.gather_qmm(
                y, w, s, bb, i, **Q, family="qmv", config=c, validate=False))
        if b.name == "cuda":
            record("floor.cuda_kernel", "", lambda y, w, s, bb, i: floor_copy(y))
        record("floor.elementwise", "", lambda y, w, s, bb, i: y * 1)
        record("op", f"{d['family']}:{d['config']}@{d['source']} (again, last)", op)
        record("stock", "", lambda y, w, s, bb, i: mx.gather_qmm(y, w, s, bb, rhs_indices=i, transpose=True, **Q))
        del case
    keys = sorted({k for r in rows for k in r})
    measure.write_rows(out / "decode-configs.csv", rows, keys)
    (out / "decode-configs.json").write_text(json.dumps(dict(
        device=mx.device_info(), mlx=mx.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        top_k=TOP_K, chain=CHAIN, format=dict(mode="affine", bits=4, group_size=64, dtype="bfloat16"),
        timer="measure.time_fn over a chain of 32 dependent calls, divided by 32",
        producer="scripts/h100/decode_configs.py", doc=__doc__), indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
