"""`mlx-moe-tune profile-step`: where one decode step's time goes, stock vs patched.

A decode step is one token per sequence through the whole model with a KV cache, as
generate_step / BatchGenerator run it. For each batch size and variant it measures:

- `step_ms`: steps pipelined as mlx-lm pipelines them (the next step's graph is built while
  the GPU runs this one; `mx.async_eval`), per step: what generation tokens/s sees;
- `build_ms`: the host time to build one step's graph (the model call, no evaluation);
- `sync_ms`: one step built and evaluated with nothing overlapping: host + device in series;
- the same three with every MoE block replaced by a module that returns zeros (`no_moe`), so
  `moe_ms` = `step_ms` - `no_moe.step_ms` is what the MoE layers cost the step, router included;
- on CUDA, with PyTorch's profiler (CUPTI sees every kernel in the process, MLX's included):
  kernels per step, the summed kernel time per step and the ten kernels that take most of it.

The variants are the same arrays under two sets of modules (bench-model's `Variants`).

    mlx-moe-tune profile-step --arch qwen3_moe --random --layers 16 -b 1,8,64 --json step.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bench_model import add_model_arguments

    add_model_arguments(p)
    p.add_argument("-b", "--batch-sizes", default="1,8,64", help="sequences per step, comma-separated (default 1,8,64)")
    p.add_argument("--context", type=int, default=128, help="tokens already in the KV cache (default 128)")
    p.add_argument("-n", "--steps", type=int, default=32, help="timed steps per measurement (default 32)")
    p.add_argument("--trials", type=int, default=3, help="interleaved stock/patched rounds (default 3); medians reported")
    p.add_argument("--no-kernels", action="store_true", help="skip the CUPTI kernel timeline (PyTorch's profiler)")
    p.add_argument("--json", help="write the results here")


class _NoMoE(nn.Module):
    """Stands in for an MoE block: zeros of the input's shape, no launches beyond one fill."""

    def __call__(self, x, *args, **kwargs):
        return mx.zeros_like(x)


def _moe_paths(model) -> list[str]:
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    mods = dict(model.named_modules())
    out = []
    for path, m in mods.items():
        if isinstance(m, (SwitchGLU, SwitchMLP)) and "." in path:
            parent = path.rsplit(".", 1)[0]
            if parent not in out and not isinstance(mods.get(parent), (SwitchGLU, SwitchMLP)):
                out.append(parent)
    return out


def _cache(model, batch: int, context: int, vocab: int, seed: int):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    toks = mx.random.randint(0, vocab, (batch, context), key=mx.random.key(seed))
    mx.eval(model(toks, cache=cache))
    mx.eval([c.state for c in cache])
    return cache


def _measure(model, cache, batch: int, steps: int) -> dict:
    """step_ms (pipelined), build_ms, sync_ms of `steps` decode steps on `cache`; `ran`: the steps
    it evaluated in all (one warm-up, `steps` in series, `steps` + 1 pipelined)."""
    y = mx.zeros((batch, 1), dtype=mx.int32)

    def step(tok):
        logits = model(tok, cache=cache)
        return mx.argmax(logits[:, -1, :], axis=-1, keepdims=True).astype(mx.int32)

    nxt = step(y)  # warm: this shape traced/compiled
    mx.eval(nxt)
    builds, syncs = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step(nxt)
        t1 = time.perf_counter()
        mx.eval(out)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        syncs.append(t2 - t0)
        nxt = out
    # pipelined as generate_step: build step t+1 while step t runs
    mx.synchronize()
    t0 = time.perf_counter()
    cur = step(nxt)
    mx.async_eval(cur)
    for _ in range(steps):
        nxt = step(cur)
        mx.async_eval(nxt)
        mx.eval(cur)  # generate_step waits on the previous token the same way
        cur = nxt
    mx.eval(cur)
    pipelined = (time.perf_counter() - t0) / (steps + 1)
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"step_ms": 1e3 * pipelined, "build_ms": ms(builds), "sync_ms": ms(syncs), "ran": 2 * steps + 2}


def _kernels(run) -> dict:
    """CUPTI kernel records of `run()` (PyTorch's profiler; CUDA only)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:
        return {"error": f"PyTorch is not importable: {e}"}
    if not torch.cuda.is_available():
        return {"error": "PyTorch sees no CUDA device"}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        mx.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by = {}
    for e in evs:
        d = by.setdefault(e.name, [0, 0.0])
        d[0] += 1
        d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in by.values())
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:10]
    return {"kernels": len(evs), "kernel_us": total,
            "top": [{"name": n[:160], "count": c, "us": round(t, 1)} for n, (c, t) in top]}


def profile(args, say=print) -> dict:
    from .bench_model import Variants, _int_list, check_model_args, load_model

    check_model_args(args)
    batch_sizes = _int_list("--batch-sizes", args.batch_sizes)
    for flag, v in (("--context", args.context), ("--steps", args.steps), ("--trials", args.trials)):
        if v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1")
    model, vocab, desc = load_model(args)
    variants = Variants(model, backend=args.backend, table=args.table, fuse=not args.no_fuse,
                        compile=not args.no_compile)
    paths = _moe_paths(model)
    doc = {"tool": "mlx-moe-tune profile-step", "argv": sys.argv, "model": desc,
           "moe_blocks": len(paths), "context": args.context, "steps": args.steps,
           "device": str(mx.default_device()), "results": []}
    say(f"{len(paths)} MoE blocks; context {args.context}; {args.steps} steps x {args.trials} trials")

    for B in batch_sizes:
        try:
            row = _profile_batch(args, model, variants, paths, vocab, B, say)
        except Exception as e:  # noqa: BLE001 - one batch size's failure is data; the others run
            row = {"batch_size": B, "error": f"{type(e).__name__}: {e}"}
            say(f"batch {B:3d}: failed: {row['error']}")
            variants.use("patched")
        doc["results"].append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    return doc


def _profile_batch(args, model, variants, paths, vocab: int, B: int, say) -> dict:
    from mlx.utils import tree_unflatten

    row = {"batch_size": B}
    samples: dict[str, list[dict]] = {}
    for t in range(args.trials):
        order = ("stock", "patched") if t % 2 == 0 else ("patched", "stock")
        for v in order:
            variants.use(v)
            cache = _cache(model, B, args.context, vocab, args.seed)
            samples.setdefault(v, []).append(_measure(model, cache, B, args.steps))
    # everything else: the MoE blocks gone (the same for both variants)
    variants.use("stock")
    saved = dict(model.named_modules())
    model.update_modules(tree_unflatten([(p, _NoMoE()) for p in paths]))
    try:
        cache = _cache(model, B, args.context, vocab, args.seed)
        samples["no_moe"] = [_measure(model, cache, B, args.steps) for _ in range(args.trials)]
    finally:
        model.update_modules(tree_unflatten([(p, saved[p]) for p in paths]))
    for v, ss in samples.items():
        row[v] = {k: statistics.median(s[k] for s in ss) for k in ss[0]}
        row[v]["spread_step_ms"] = [min(s["step_ms"] for s in ss), max(s["step_ms"] for s in ss)]
    if not args.no_kernels and mx.cuda.is_available():
        for v in ("stock", "patched"):
            variants.use(v)
            cache = _cache(model, B, args.context, vocab, args.seed)
            measured = {}
            k = _kernels(lambda: measured.update(_measure(model, cache, B, 8)))
            if "kernels" in k:
                ran = measured["ran"]
                k["per_step"] = {"steps": ran, "kernels": k["kernels"] / ran, "kernel_us": k["kernel_us"] / ran}
            row[v]["kernel_timeline"] = k
    variants.use("patched")
    row["moe_ms"] = {v: row[v]["step_ms"] - row["no_moe"]["step_ms"] for v in ("stock", "patched")}
    s, p, n = row["stock"], row["patched"], row["no_moe"]
    say(f"batch {B:3d}: step stock {s['step_ms']:.2f} ms, patched {p['step_ms']:.2f} ms "
        f"({s['step_ms'] / p['step_ms']:.2f}x); build {s['build_ms']:.2f} / {p['build_ms']:.2f} ms; "
        f"sync {s['sync_ms']:.2f} / {p['sync_ms']:.2f} ms; no MoE: step {n['step_ms']:.2f} ms "
        f"-> MoE costs {row['moe_ms']['stock']:.2f} / {row['moe_ms']['patched']:.2f} ms")
    for v in ("stock", "patched"):
        k = row[v].get("kernel_timeline")
        if k and "per_step" in k:
            say(f"           {v}: {k['per_step']['kernels']:.0f} kernels, {k['per_step']['kernel_us'] / 1e3:.2f} ms of "
                f"kernel time per step; top: " + ", ".join(f"{e['name'][:40]} {e['us'] / k['per_step']['steps']:.0f}us"
                                                      for e in k["top"][:4]))
        elif k:
            say(f"           {v}: kernel timeline unavailable: {k.get('error')}")
    return row


def run(args) -> int:
    profile(args)
    return 0
