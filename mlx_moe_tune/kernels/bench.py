"""H100 benchmark + correctness run for the CUDA families (until the sweep driver covers them).

python -m mlx_moe_tune.kernels.bench --out DIR [--quick]
Checks ops.gather_qmm / gather_qmm_glu against mx.gather_qmm, then times every (m, config) on
the gemma-26b-a4b shape and writes CSV rows with the sweep's columns plus a JSON sidecar.
Weights are rotated over enough copies that every timed call streams from HBM, not L2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import mlx.core as mx
import numpy as np

from .. import ops
from ..kernels import registry
from ..kernels.family import Problem, config_id
from ..kernels.plan import make_plan

L2_BYTES = 50 * 2**20


def balanced(m: int, E: int, top_k: int, seed: int = 0) -> np.ndarray:
    """(T, top_k) expert ids: every expert exactly m rows, each token top_k distinct experts."""
    T = m * E // top_k
    perm = np.random.default_rng(seed).permutation(E)
    slots = (np.arange(T)[:, None] * top_k + np.arange(top_k)[None, :]) % E
    return perm[slots].astype(np.int32)


def skewed(T: int, E: int, top_k: int, skew: float = 1.2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, E + 1) ** skew
    p = p[rng.permutation(E)]
    p /= p.sum()
    return np.stack([rng.choice(E, top_k, replace=False, p=p) for _ in range(T)]).astype(np.int32)


def sparse(T: int, E: int, top_k: int, active: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    act = rng.choice(E, active, replace=False)
    return np.stack([act[rng.choice(active, top_k, replace=False)] for _ in range(T)]).astype(np.int32)


def nn_silu(g):
    return g * mx.sigmoid(g)


def make_weights(E, N, K, bits, gs, dtype, copies, seed=0):
    out = []
    for c in range(copies):
        w = mx.random.normal((E, N, K), key=mx.random.key(seed + c)).astype(dtype) * 0.05
        out.append(mx.quantize(w, group_size=gs, bits=bits))
        mx.eval(out[-1])
    return out


def expert_bytes(wsb, experts_active: int, E: int) -> int:
    return sum(a.nbytes for a in wsb) * experts_active // E


def timeit(fn_list, reps=5):
    """Median seconds per call of fn_list (each a zero-arg fn returning an array), all queued in
    one mx.eval so the host overhead overlaps the GPU work."""
    mx.eval([f() for f in fn_list])
    ts = []
    for _ in range(reps):
        outs = [f() for f in fn_list]  # graph building (Python) is not GPU time
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        ts.append((time.perf_counter() - t0) / len(fn_list))
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]


def rel_err(a, b) -> float:
    a = np.asarray(a.astype(mx.float32)); b = np.asarray(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(log, only=None) -> bool:
    """ops vs mx.gather_qmm: seed shape and random shapes, both layouts, every family."""
    ok = True
    rng = np.random.default_rng(1)
    cases = [  # E, K, N, bits, gs, dtype, counts-or-m
        (128, 2816, 1408, 4, 64, mx.bfloat16, 3),
        (8, 512, 200, 4, 32, mx.float16, None),
        (8, 384, 72, 8, 128, mx.bfloat16, None),
        (6, 256, 136, 2, 32, mx.bfloat16, None),
        (6, 256, 136, 2, 64, mx.float16, None),
        (6, 256, 136, 8, 32, mx.float16, None),
        (16, 1024, 256, 4, 128, mx.bfloat16, None),
    ]
    for ci, case in enumerate(cases):
        if only is not None and ci not in only:
            continue
        try:
            ok &= _check_case(log, rng, *case)
        except Exception as e:
            log(f"check case {case} crashed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            ok = False
    return ok


def _check_case(log, rng, E, K, N, bits, gs, dt, m) -> bool:
    ok = True
    if True:
        top_k = min(4, E)
        T = (m * E // top_k) if m else int(rng.integers(1, 40))
        idx_np = balanced(m, E, top_k) if m else np.stack(
            [rng.choice(E - 2, top_k, replace=False) for _ in range(T)]).astype(np.int32)  # 2 experts idle
        (wq, s, b), (wq2, s2, b2) = make_weights(E, N, K, bits, gs, dt, 2, seed=int(rng.integers(1000)))
        x = (mx.random.normal((T, 1, 1, K)) ).astype(dt)
        idx = mx.array(idx_np)
        ref = mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=gs, bits=bits)
        # unsorted (decode) layout: every family
        fams = {"qmv": registry.FAMILIES["qmv"], "qmm": registry.FAMILIES["qmm"]}
        prob = Problem(experts=E, k=K, n=N, rows=T * top_k, bits=bits, group_size=gs,
                       dtype="bfloat16" if dt == mx.bfloat16 else "float16")
        from ..backend import CUDA
        for fname, fam in fams.items():
            cfgs = fam.valid_configs(prob, CUDA)
            for cfg in cfgs[:: max(1, len(cfgs) // 2)]:
                try:
                    y = ops.gather_qmm(x, wq, s, b, idx, group_size=gs, bits=bits, family=fname, config=cfg)
                    err = rel_err(y, ref)
                    good = y.shape == ref.shape and err < 2e-2
                except Exception as e:  # report and go on
                    err, good = str(e).splitlines()[0][:200], False
                ok &= good
                log(f"check unsorted E{E} K{K} N{N} b{bits} gs{gs} {dt} T{T} {fname} {config_id(cfg)}: {err} {'ok' if good else 'FAIL'}")
        # sorted layout (mlx-lm: x (P,1,K), sorted flat indices)
        flat = idx.reshape(-1)
        order = mx.argsort(flat)
        xs = mx.broadcast_to(x, (T, top_k, 1, K)).reshape(-1, 1, K)[order]
        fs = flat[order]
        ref_s = mx.gather_qmm(xs, wq, s, b, rhs_indices=fs, transpose=True, group_size=gs, bits=bits,
                              sorted_indices=True)
        for cfg in ({"BM": 8, "FN": 1, "WN": 2, "WK": 1, "MC": 4, "KU": 2}, {"BM": 32, "FN": 2, "WN": 4, "WK": 1, "MC": 1, "KU": 2},
                    {"BM": 16, "FN": 1, "WN": 2, "WK": 2 if bits != 4 else 1, "MC": 2, "KU": 1},
                    {"BM": 64, "FN": 1, "WN": 4, "WK": 1, "MC": 1, "KU": 1}, None):
            try:
                y = ops.gather_qmm(xs, wq, s, b, fs, group_size=gs, bits=bits, sorted_indices=True,
                                   family=None if cfg is None else "qmm", config=cfg)
                err = rel_err(y, ref_s); good = y.shape == ref_s.shape and err < 2e-2
            except Exception as e:
                import traceback
                err, good = traceback.format_exc()[-600:], False
            ok &= good
            log(f"check sorted   E{E} K{K} N{N} b{bits} gs{gs} {dt} T{T} qmm {cfg}: {err} {'ok' if good else 'FAIL'}")
        # fused gate+up
        up = mx.gather_qmm(x, wq2, s2, b2, rhs_indices=idx, transpose=True, group_size=gs, bits=bits)
        ref_g = (ref.astype(mx.float32) * mx.sigmoid(ref.astype(mx.float32)) * up.astype(mx.float32))
        try:
            y = ops.gather_qmm_glu(x, wq, s, b, wq2, s2, b2, idx, group_size=gs, bits=bits)
            err = rel_err(y, ref_g); good = err < 3e-2
        except Exception as e:
            err, good = str(e).splitlines()[0][:200], False
        ok &= good
        log(f"check glu      E{E} K{K} N{N} b{bits} gs{gs} {dt} T{T}: {err} {'ok' if good else 'FAIL'}")
    # bad expert ids
    try:
        ops.gather_qmm(x, wq, s, b, idx + E, group_size=gs, bits=bits)
        log("check bad index: no error FAIL"); ok = False
    except ValueError as e:
        log(f"check bad index: ValueError ok ({e})")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--m", default="1,2,4,8,16,32,64")
    ap.add_argument("--n", default="1408")
    ap.add_argument("--stock", default="1,4")
    ap.add_argument("--routers", default="balanced")
    ap.add_argument("--check-cases", default=None)
    ap.add_argument("--auto-only", action="store_true")
    ap.add_argument("--glu", action="store_true")
    ap.add_argument("--lite-n", default="")
    ap.add_argument("--router-m", default="1,4,16,64")
    ap.add_argument("--all-configs", action="store_true")
    args = ap.parse_args(argv)
    lines = []

    def log(s):
        print(s, flush=True); lines.append(s)

    t_start = time.time()
    if not args.skip_check:
        only = None if args.check_cases is None else {int(v) for v in args.check_cases.split(",")}
        log(f"ALL CHECKS {'PASS' if check(log, only) else 'FAIL'} ({time.time() - t_start:.0f} s)")

    E, K, top_k, bits, gs, dt = 128, 2816, 8, 4, 64, mx.bfloat16
    rows = []
    from ..backend import CUDA
    routers = args.routers.split(",")
    lite = {int(v) for v in args.lite_n.split(",") if v}
    for N in [int(v) for v in args.n.split(",")]:
        copies = 4
        W = make_weights(E, N, K, bits, gs, dt, copies)
        full = sum(a.nbytes for a in W[0])
        # bandwidth probe: a full read of one weight copy (same bytes the kernels stream)
        probe = timeit([lambda i=i: mx.sum(W[i % copies][0]) for i in range(8)])
        log(f"N{N} ref.bandwidth {W[0][0].nbytes / probe[0] / 1e9:.0f} GB/s")
        rows.append(dict(kernel="ref.bandwidth", config="", n=N, k=K, time_us=probe[0] * 1e6,
                         weight_bytes=W[0][0].nbytes, gbps=W[0][0].nbytes / probe[0] / 1e9, status="ok", backend="cuda"))
        for router in routers:
          for m in [int(v) for v in (args.m if router == "balanced" else args.router_m).split(",")]:
            if router == "balanced":
                idx_np = balanced(m, E, top_k)
            elif router == "skewed":
                idx_np = skewed(m * E // top_k, E, top_k)
            else:
                idx_np = sparse(m * E // top_k, E, top_k, active=16)
            T = idx_np.shape[0]
            active = len(np.unique(idx_np))
            flat = mx.array(idx_np.reshape(-1))
            order = mx.argsort(flat)
            x = mx.random.normal((T, 1, 1, K)).astype(dt)
            xs = mx.broadcast_to(x, (T, top_k, 1, K)).reshape(-1, 1, K)[order]
            fs = flat[order]
            mx.eval(xs, fs)
            nbytes = full * active // E
            plan = make_plan(fs, E, sorted_indices=True)
            mx.eval(plan.order, plan.offsets)
            prob = Problem(experts=E, k=K, n=N, rows=T * top_k, bits=bits, group_size=gs, dtype="bfloat16")
            R = 16
            def rec(kernel, cfg, t):
                med, lo, hi = t
                r = dict(kernel=kernel, config=cfg, m=m, tokens=T, experts=E, active_experts=active, top_k=top_k,
                         k=K, n=N, mode="affine", bits=bits, group_size=gs, dtype="bfloat16", router=router,
                         time_us=med * 1e6, time_us_p10=lo * 1e6, time_us_p90=hi * 1e6, weight_bytes=nbytes,
                         gbps=nbytes / med / 1e9, status="ok", backend="cuda")
                rows.append(r)
                log(f"N{N} {router[:4]} m{m:3d} {kernel:<14} {cfg:<26} {med*1e6:8.1f} us {nbytes/med/1e9:6.0f} GB/s")
            cands = []
            for fname in (() if args.auto_only else ("qmv", "qmm")):
                fam = registry.FAMILIES[fname]
                for cfg in fam.valid_configs(prob, CUDA):
                    if router != "balanced" and not args.all_configs:
                        continue
                    if N in lite and cfg["FN"] != 2:
                        continue
                    if fname == "qmv" and m > 1:
                        continue
                    if fname == "qmv" and m > 2:
                        continue
                    if fname == "qmm" and not (cfg["BM"] >= min(m, 64) / 2 and cfg["BM"] <= max(8, 2 * m)):
                        continue
                    cands.append((fname, cfg))
            for fname, cfg in cands:
                def mk(i, fname=fname, cfg=cfg):
                    wq, s, b = W[i % copies]
                    return lambda: ops.gather_qmm(xs, wq, s, b, fs, group_size=gs, bits=bits, sorted_indices=True,
                                                  family=fname, config=cfg, plan=plan, validate=False)
                try:
                    rec(f"tuned.{fname}", config_id(cfg), timeit([mk(i) for i in range(R)]))
                except Exception as e:
                    log(f"N{N} m{m} {fname} {config_id(cfg)} FAILED {str(e).splitlines()[0][:200]}")
            # the op end to end (plan included, default choice)
            def mk_op(i):
                wq, s, b = W[i % copies]
                return lambda: ops.gather_qmm(xs, wq, s, b, fs, group_size=gs, bits=bits, sorted_indices=True,
                                              validate=False)
            rec("tuned.auto", "auto", timeit([mk_op(i) for i in range(R)]))
            if args.glu and router == "balanced":  # fused gate+up vs two calls + silu*up
                def mk_glu(i):
                    (wg, sg, bg), (wu, su, bu) = W[i % copies], W[(i + 1) % copies]
                    return lambda: ops.gather_qmm_glu(xs, wg, sg, bg, wu, su, bu, fs, group_size=gs, bits=bits,
                                                      sorted_indices=True, plan=plan, validate=False)
                def mk_two(i):
                    (wg, sg, bg), (wu, su, bu) = W[i % copies], W[(i + 1) % copies]
                    def f():
                        g = ops.gather_qmm(xs, wg, sg, bg, fs, group_size=gs, bits=bits, sorted_indices=True,
                                           plan=plan, validate=False)
                        u = ops.gather_qmm(xs, wu, su, bu, fs, group_size=gs, bits=bits, sorted_indices=True,
                                           plan=plan, validate=False)
                        return nn_silu(g) * u
                    return f
                nb = nbytes
                nbytes = 2 * nb
                rec("tuned.qmm_glu", "auto", timeit([mk_glu(i) for i in range(R)]))
                rec("tuned.auto_x2+silu", "auto", timeit([mk_two(i) for i in range(R)]))
                nbytes = nb
            if str(m) in args.stock.split(",") and router == "balanced":
                def mk_st(i):
                    wq, s, b = W[i % copies]
                    return lambda: mx.gather_qmm(xs, wq, s, b, rhs_indices=fs, transpose=True, group_size=gs,
                                                 bits=bits, sorted_indices=True)
                rec("stock.gather_qmm", "", timeit([mk_st(i) for i in range(4)], reps=3))
        # decode chain: 1 token top-8, 32 dependent calls per eval, weights rotated per call
        if N * 2 == K:
            idx_dec = [mx.array(np.random.default_rng(i).choice(E, top_k, replace=False).astype(np.int32).reshape(1, 1, top_k)) for i in range(32)]
            def chain(fn):
                x = mx.random.normal((1, 1, 1, 1, K)).astype(dt) * 0.01
                for i in range(32):
                    wq, s, b = W[i % copies]
                    y = fn(x, wq, s, b, idx_dec[i])
                    x = y.reshape(-1)[:K].reshape(1, 1, 1, 1, K)
                return x
            for name, fn in (("tuned.qmv", lambda x, wq, s, b, i: ops.gather_qmm(x, wq, s, b, i, group_size=gs, bits=bits, validate=False)),
                             ("stock.gather_qmm_unsorted", lambda x, wq, s, b, i: mx.gather_qmm(x, wq, s, b, rhs_indices=i, transpose=True, group_size=gs, bits=bits))):
                med, lo, hi = timeit([lambda: chain(fn)], reps=7)
                mx.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    mx.eval(chain(fn))
                wall = (time.perf_counter() - t0) / 5
                log(f"decode chain N{N} {name}: {med / 32 * 1e6:.1f} us per call (eval only), {wall / 32 * 1e6:.1f} us incl. Python")
                rows.append(dict(kernel=name, config="decode-chain32", m=1, tokens=1, experts=E, active_experts=top_k,
                                 top_k=top_k, k=K, n=N, time_us=med / 32 * 1e6, status="ok", router="decode"))
    import csv, os
    os.makedirs(args.out, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys); wr.writeheader(); wr.writerows(rows)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(device=mx.device_info(), mlx=mx.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       note="weights rotated over 4 copies (>= 4x L2); balanced routing"), f, indent=1, default=str)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()


def export(bench_dir: str, out_dir: str, name: str = "tuned-cuda-gemma-26b-a4b", hbm_gbps: float = 3062.0,
           matrices: dict | None = None):
    """bench.csv -> <name>.csv (sweep columns) + .json + .png (GB/s vs m: best config per m)."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    matrices = matrices or {1408: "gate_up", 704: "up"}  # the gemma-26b-a4b preset's names
    df = pd.read_csv(os.path.join(bench_dir, "bench.csv"))
    meta = json.load(open(os.path.join(bench_dir, "bench.json")))
    dev = meta.get("device", {})
    df["device"] = dev.get("device_name", "NVIDIA H100 80GB HBM3") if isinstance(dev, dict) else str(dev)
    df["backend"] = "cuda"
    # the sweep's shape columns (plot.SHAPE_COLUMNS) must be filled for every row, or the row
    # falls out of the per-shape grouping when this file is concatenated with the sweep's
    for col, val in dict(mode="affine", bits=4, group_size=64, dtype="bfloat16", experts=128, top_k=8,
                         k=2816).items():
        df[col] = df[col].fillna(val)
    df["router"] = df["router"].fillna("balanced")
    df["matrix"] = df["n"].map(lambda n: matrices.get(int(n), f"N{int(n)}"))
    df["seed"], df["iters"], df["copies"] = 0, 5, 4
    df["batch"] = df["kernel"].map(lambda k: 1 if "decode" in str(k) else 16)
    df["pct_roofline"] = df["gbps"] / hbm_gbps * 100
    P = df["tokens"] * df["top_k"]
    df["tflops"] = 2 * P * df["k"] * df["n"] / (df["time_us"] * 1e-6) / 1e12
    cols = ["kernel", "config", "matrix", "m", "tokens", "experts", "active_experts", "top_k", "k", "n", "mode", "bits",
            "group_size", "dtype", "router", "seed", "time_us", "time_us_p10", "time_us_p90", "weight_bytes", "gbps",
            "pct_roofline", "tflops", "iters", "batch", "copies", "status", "backend", "device"]
    df = df.reindex(columns=cols)
    os.makedirs(out_dir, exist_ok=True)
    df.to_csv(os.path.join(out_dir, name + ".csv"), index=False)
    meta.update(
        shape=dict(E=128, K=2816, N=[1408, 704], top_k=8), format=dict(mode="affine", bits=4, group_size=64,
                                                                        dtype="bfloat16"),
        seed=0, cache_defeat="weights rotated over 4 copies (each >= 4x the 50 MB L2); all experts active when balanced",
        timing="R=16 calls queued per mx.eval (graph built before the timed eval), median of 5 reps; "
               "time_us_p10/p90 columns hold the min/max of the 5 reps",
        pct_roofline=f"vs {hbm_gbps} GB/s HBM read measured on this H100 (DESIGN.md); ref.bandwidth rows are mx.sum",
        producer="python -m mlx_moe_tune.kernels.bench (H-cuda), pre-sweep-driver",
    )
    json.dump(meta, open(os.path.join(out_dir, name + ".json"), "w"), indent=1, default=str)

    ns = sorted(df["n"].dropna().unique(), reverse=True)
    fig, axes = plt.subplots(1, len(ns), figsize=(6.5 * len(ns), 4.5), squeeze=False)
    for ax, n in zip(axes[0], ns):
        d = df[(df["n"] == n) & (df["status"] == "ok")]
        bal = d[d["router"] == "balanced"]
        tuned = bal[bal["kernel"].isin(["tuned.qmv", "tuned.qmm"])]
        if len(tuned):
            best = tuned.loc[tuned.groupby("m")["time_us"].idxmin()].sort_values("m")
            ax.plot(best["m"], best["gbps"], "o-", label="tuned (best config per m)")
        for kern, style, lab in (("tuned.auto", "s--", "tuned.auto (op default)"), ("stock.gather_qmm", "x:", "stock mx.gather_qmm"),
                                 ("tuned.qmm_glu", "d-", "gather_qmm_glu (gate+up, 2x bytes)"),
                                 ("tuned.auto_x2+silu", "d:", "two gather_qmm + silu*up (2x bytes)")):
            s = bal[bal["kernel"] == kern].sort_values("m")
            if len(s):
                ax.plot(s["m"], s["gbps"], style, label=lab)
        for router, style in (("skewed", "^-."), ("sparse", "v-.")):
            s = d[(d["router"] == router) & (d["kernel"] == "tuned.auto")].sort_values("m")
            if len(s):
                ax.plot(s["m"], s["gbps"], style, label=f"tuned.auto, {router} router", alpha=0.7)
        ax.axhline(hbm_gbps, color="k", lw=0.8, label=f"HBM read {hbm_gbps:.0f} GB/s")
        ax.axhline(2450, color="r", lw=0.8, ls="--", label="target 2450 GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("m (rows per expert)")
        ax.set_ylabel("GB/s (active experts' bytes / time)")
        ax.set_title(f"H100, gemma-26b-a4b E=128 K=2816 N={int(n)}, 4-bit gs64 bf16", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name + ".png"), dpi=120)
    return df
