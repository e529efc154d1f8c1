"""Where the op's time goes beyond its kernel, on the GPU (H100): the routing plan, the launch
floor of a custom kernel, and decode chains. Writes OUT/op-overhead.csv and .json.

    python3 scripts/h100/op_overhead.py OUT

Rows (gemma-26b-a4b gate_up: E=128, K=2816, N=1408, top-8, 4-bit gs64, bf16, balanced routing,
mlx-lm's unsorted layout x (T, 1, 1, K), indices (T, 8)), per m:
  plan.scatter   the routing plan with scatter-add counts (argsort + .at[].add + cumsum), alone
  plan.count     the routing plan with fused compare-and-count offsets (argsort + one reduction)
  kernel         the op with its plan precomputed (the kernel alone, as the tuner times it)
  plan.kernel    the one-launch plan kernel (cuda/plan.cu), alone
  op.scatter     the op end to end with the scatter plan inside (what routing.plan does)
  op.count       the op end to end with the compare-and-count plan inside
  op.kernel      the op end to end with the plan kernel inside (the op's default on a GPU)
  stock          mx.gather_qmm on the same unsorted inputs
Decode (T=1): 32 dependent calls per eval (each call's x is the previous call's output), for the
op and stock, and a floor: 32 dependent launches of a trivial custom kernel.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_moe_tune import measure, ops, routing
from mlx_moe_tune.kernels.family import Problem
from mlx_moe_tune.kernels.plan import Plan, make_plan

E, K, N, TOP_K = (16, 256, 128, 8) if os.environ.get("SMOKE") else (128, 2816, 1408, 8)
Q = dict(group_size=64, bits=4)


def _plan(indices, experts, fused):
    flat = indices.reshape(-1).astype(mx.int32)
    P = flat.size
    pair = mx.arange(P, dtype=mx.int32)
    order = mx.argsort(flat * P + pair).astype(mx.int32)
    return Plan(order, routing.expert_offsets(flat, experts, fused=fused), experts, P)


def scatter_plan(indices, experts):
    return _plan(indices, experts, False)


def count_plan(indices, experts):
    return _plan(indices, experts, True)


def kern_plan(indices, experts):
    return make_plan(indices, experts, kernel=True)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def rec(name, m, t, per=1):
        rows.append(dict(what=name, m=m, time_us=t.median_us / per, time_us_p10=t.p10_us / per,
                         time_us_p90=t.p90_us / per))
        print(f"m={m} {name}: {t.median_us / per:.1f} us", flush=True)

    p = Problem(experts=E, k=K, n=N, rows=E, bits=4, group_size=64, dtype="bfloat16")
    for m in (1, 4) if os.environ.get("SMOKE") else (1, 4, 16, 64):
        case = measure.prepare_case(p, m=m, top_k=TOP_K)
        x, idx = case.x_unsorted, case.idx_unsorted
        nxt = case.rotation()
        fixed = make_plan(idx, E, kernel=False)
        mx.eval(fixed.order, fixed.offsets)
        for name, planner in (("plan.scatter", scatter_plan), ("plan.count", count_plan), ("plan.kernel", kern_plan)):
            rec(name, m, measure.time_fn(lambda: (lambda q: q.offsets + q.order[:1])(planner(idx, E))))

        def call(plan=None, planner=None):
            def fn():
                w, s, b = nxt()
                pl = plan if plan is not None else (planner(idx, E) if planner else None)
                return ops.gather_qmm(x, w, s, b, idx, **Q, plan=pl, validate=False)
            return fn

        rec("kernel", m, measure.time_fn(call(plan=fixed)))
        rec("op.scatter", m, measure.time_fn(call(planner=scatter_plan)))
        rec("op.count", m, measure.time_fn(call(planner=count_plan)))
        rec("op.kernel", m, measure.time_fn(call(planner=kern_plan)))
        rec("stock", m, measure.time_fn(
            lambda: (lambda w, s, b: mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, **Q))(*nxt())))
        print(ops.describe(x, *case.weights(0), idx, **Q), flush=True)
        del case

    # decode chains: T=1, each call's input is the previous call's output
    case = measure.prepare_case(p, m=1, top_k=TOP_K)

    rec("decode.op", 1, measure.time_fn(measure.decode_chain(case, lambda y, w, s, b, i: ops.gather_qmm(y, w, s, b, i, **Q, validate=False))), 32)
    rec("decode.stock", 1, measure.time_fn(measure.decode_chain(case,
        lambda y, w, s, b, i: mx.gather_qmm(y, w, s, b, rhs_indices=i, transpose=True, **Q))), 32)
    if not mx.cuda.is_available():
        print("no CUDA: no launch floor")
        rows.append(dict(what="decode.floor_custom_kernel", m=1, time_us=None, time_us_p10=None, time_us_p90=None))
        tiny = None
    else:
        tiny = mx.fast.cuda_kernel(name="mmt_tiny", input_names=["a"], output_names=["o"],
                                   source="if (threadIdx.x < a_shape[0]) o[threadIdx.x] = a[threadIdx.x] + 1.0f;")

    def floor():
        a = mx.zeros((32,), mx.float32)
        for _ in range(32):
            (a,) = tiny(inputs=[a], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(32,)],
                        output_dtypes=[mx.float32])
        return a

    if tiny is not None:
        rec("decode.floor_custom_kernel", 1, measure.time_fn(floor), 32)
    rec("decode.floor_add", 1, measure.time_fn(
        lambda: __import__("functools").reduce(lambda a, _: a + 1, range(32), mx.zeros((32,)))), 32)

    measure.write_rows(out / "op-overhead.csv", rows)
    (out / "op-overhead.json").write_text(json.dumps(dict(
        device=mx.device_info(), mlx=mx.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        shape=dict(E=E, K=K, N=N, top_k=TOP_K), format=dict(mode="affine", bits=4, group_size=64, dtype="bfloat16"),
        timer="measure.time_fn (graph built outside the timed eval, ~5 ms samples, median)",
        producer="scripts/h100/op_overhead.py", doc=__doc__), indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
