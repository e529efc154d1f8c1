"""`mlx-moe-tune bench-model`: tokens/s of an mlx-lm MoE model, stock vs patched.

Like `mlx_lm.benchmark`, through mlx-lm's own generation paths: one sequence runs
`mlx_lm.generate.generate_step` (what `generate` / `stream_generate` run, timed as
stream_generate times it); a batch runs `mlx_lm.generate.BatchGenerator` (what `batch_generate`
runs, read through its `stats()`), with `completion_batch_size` = the batch so that all of it
decodes together.

    mlx-moe-tune bench-model --arch qwen3_moe --random --layers 16 -p 512,2048 -b 1,8,32,64 -n 8
    mlx-moe-tune bench-model --model path/to/mlx-model -p 2048 -g 128 --json out.json

Every cell (prompt length, batch size) first warms both variants up (a new batch size or prompt
length compiles new kernels; the warm-up's greedy tokens say whether the variants agree). Then
`--trials` rounds run over all cells, each timing both variants on the same model object,
alternating which goes first (the host is noisy and drifts; a run cut short keeps some trials of
every cell). The variants are the same arrays under two sets of modules,
swapped in place: `patch_model` runs once, so the patched layers' compiled decode functions
survive the toggle (patch_model / unpatch would rebuild them, and re-trace inside the timing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

VARIANTS = ("stock", "patched")
METRICS = ("prompt_tps", "generation_tps", "peak_memory_gb")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and patch flags, shared with profile-step."""
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="local mlx-lm model directory (or a Hugging Face repo: mlx_lm.load downloads it)")
    src.add_argument("--arch", help="a real architecture's shapes with random weights, quantized in memory: "
                                    "qwen3_moe (Qwen3-30B-A3B), gemma-26b-a4b, tiny (CI); needs --random")
    src.add_argument("--random", action="store_true", help="random weights (with --arch; nothing is downloaded)")
    src.add_argument("--layers", type=int, help="decoder layers of the --arch model (default 4)")
    q = p.add_argument_group("quantization of the --arch model")
    q.add_argument("--bits", type=int, help="default 4")
    q.add_argument("--group-size", type=int, help="default 64")
    q.add_argument("--mode", help="default affine")
    q.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16")
    pt = p.add_argument_group("the patch")
    pt.add_argument("--backend", default=None, help="patch_model backend (default: the GPU, else the emulator)")
    pt.add_argument("--table", default=None, help="tuning-table directory searched first")
    pt.add_argument("--no-fuse", action="store_true", help="separate gate and up kernels")
    pt.add_argument("--no-compile", action="store_true", help="patch_model(compile=False)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt tokens")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    r = p.add_argument_group("what is timed")
    r.add_argument("-p", "--prompt-tokens", default="512", help="prompt lengths, comma-separated (default 512)")
    r.add_argument("-g", "--gen-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    r.add_argument("-b", "--batch-sizes", default="1", help="batch sizes, comma-separated (default 1)")
    r.add_argument("--batch-prompt-tokens", type=int, default=None,
                   help="prompt length of the batch > 1 cells (default: each of --prompt-tokens); "
                        "a batch prefills batch x prompt tokens, which dominates the cost")
    r.add_argument("-n", "--trials", type=int, default=5, help="timed trials per variant and cell (default 5)")
    r.add_argument("--prefill-step-size", type=int, default=2048, help="mlx-lm's prompt chunk (default 2048)")
    r.add_argument("--prefill-batch-size", type=int, default=8,
                   help="sequences BatchGenerator prefills together (mlx-lm's default 8)")
    r.add_argument("--deadline", type=float, default=None,
                   help="seconds since start after which no new warm-up or trial starts; the rest is "
                        "recorded as skipped")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write every trial, the environment and the summary here (after every round)")
    o.add_argument("--plot", help="PNG: tokens/s vs batch size, stock and patched")
    o.add_argument("--quiet", action="store_true", help="no per-trial lines")


# --- arguments ---------------------------------------------------------------------------------

def _int_list(flag: str, text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} {text!r}: every value must be >= 1")
    return list(dict.fromkeys(vals))


def check_model_args(args) -> None:
    """One-line errors for the flags of add_model_arguments."""
    if bool(args.model) == bool(args.arch):
        raise ValueError("give one of --model DIR or --arch NAME --random")
    if args.arch and not args.random:
        raise ValueError(f"--arch {args.arch}: needs --random (an architecture name has no weights; "
                         f"--model DIR loads a real model)")
    if args.model:
        given = [f for f, v in (("--random", args.random), ("--layers", args.layers), ("--bits", args.bits),
                                ("--group-size", args.group_size), ("--mode", args.mode),
                                ("--dtype", args.dtype)) if v]
        if given:
            raise ValueError(f"{given[0]}: applies to --arch models only (a --model directory has its own)")
        if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().is_dir():
            raise ValueError(f"--model {args.model}: no such directory")
    if args.layers is not None and args.layers < 1:
        raise ValueError(f"--layers {args.layers}: must be >= 1")


def _check(args) -> None:
    check_model_args(args)
    for flag, v, low in (("--gen-tokens", args.gen_tokens, 2), ("--trials", args.trials, 1),
                         ("--prefill-step-size", args.prefill_step_size, 1),
                         ("--prefill-batch-size", args.prefill_batch_size, 1),
                         ("--batch-prompt-tokens", args.batch_prompt_tokens, 1), ("--layers", args.layers, 1)):
        if v is not None and v < low:
            why = " (generation tokens/s needs a step after the first token)" if flag == "--gen-tokens" else ""
            raise ValueError(f"{flag} {v}: must be >= {low}{why}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: its directory does not exist")
        if path and Path(path).is_dir():
            raise ValueError(f"{flag} {path}: is a directory")


def cells(prompt_tokens: list[int], batch_sizes: list[int], batch_prompt_tokens: int | None) -> list[tuple[int, int]]:
    """(prompt length, batch size) pairs in run order."""
    out = []
    for P in prompt_tokens:
        for B in batch_sizes:
            cell = (batch_prompt_tokens if (B > 1 and batch_prompt_tokens) else P, B)
            if cell not in out:
                out.append(cell)
    return out


# --- the model and its two variants --------------------------------------------------------------

def load_model(args) -> tuple:
    """(model, vocab size, description for the JSON)."""
    if args.model:
        from mlx_lm import load

        model, _, config = load(args.model, return_config=True)
        vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
        desc = {"source": "directory", "path": args.model, "model_type": config.get("model_type"),
                "num_hidden_layers": config.get("num_hidden_layers"),
                "quantization": config.get("quantization")}
        return model, vocab, desc
    from . import random_model

    cfg = random_model.arch_config(args.arch, args.layers or 4)
    fmt = dict(bits=args.bits or 4, group_size=args.group_size or 64, mode=args.mode or "affine")
    dtype = args.dtype or "bfloat16"
    model = random_model.build_model(cfg, dtype=getattr(mx, dtype), seed=args.seed, **fmt)
    return model, cfg["vocab_size"], {"source": "random", "arch": args.arch, "config": cfg,
                                      "dtype": dtype, "quantization": fmt}


class Variants:
    """The stock and patched modules of one model (same arrays), swapped in place by `use`."""

    def __init__(self, model, **patch_kw):
        from .patch import patch_model, patched_layers

        self.model = model
        # every module: patch_model also replaces the MoE blocks around the SwitchGLUs
        before = dict(model.named_modules())
        self.projections = patch_model(model, **patch_kw)
        after = dict(model.named_modules())
        changed = [p for p, m in before.items() if after.get(p) is not m]
        top = [p for p in changed if not any(p.startswith(q + ".") for q in changed)]
        self._mods = {"stock": [(p, before[p]) for p in top], "patched": [(p, after[p]) for p in top]}
        self.reasons = {p: r for p, r in patched_layers(model).items() if r}
        self.current = "patched"

    def use(self, name: str) -> None:
        from mlx.utils import tree_unflatten

        if name != self.current and self._mods[name]:
            self.model.update_modules(tree_unflatten(self._mods[name]))
        self.current = name


# --- one run through mlx-lm -------------------------------------------------------------------

def _run_single(model, prompt: list[int], gen_tokens: int, prefill_step_size: int) -> dict:
    """One sequence through generate_step, timed as stream_generate times it (prompt: time to the
    first token; generation: tokens / time since the first token)."""
    from mlx_lm.generate import generate_step, generation_stream, wired_limit

    tokens = []
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        for n, (tok, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=gen_tokens,
                                                   prefill_step_size=prefill_step_size)):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            tokens.append(int(tok))
        gen_time = time.perf_counter() - tic
    return {"prompt_tps": len(prompt) / prompt_time, "generation_tps": len(tokens) / gen_time,
            "prompt_tokens": len(prompt), "generation_tokens": len(tokens), "tokens": [tokens]}


def _run_batch(model, prompts: list[list[int]], gen_tokens: int, prefill_step_size: int,
               prefill_batch_size: int) -> dict:
    """A batch through BatchGenerator, as batch_generate drives it (no stop tokens)."""
    from mlx_lm.generate import BatchGenerator

    B = len(prompts)
    gen = BatchGenerator(model, max_tokens=gen_tokens, completion_batch_size=B,
                         prefill_batch_size=min(B, prefill_batch_size), prefill_step_size=prefill_step_size)
    try:
        uids = gen.insert(prompts, [gen_tokens] * B)
        out = {u: [] for u in uids}
        with gen.stats() as stats:
            while responses := gen.next_generated():
                for r in responses:
                    if r.finish_reason != "stop":
                        out[r.uid].append(int(r.token))
    finally:
        gen.close()
    return {"prompt_tps": stats.prompt_tps, "generation_tps": stats.generation_tps,
            "prompt_tokens": stats.prompt_tokens, "generation_tokens": stats.generation_tokens,
            "tokens": [out[u] for u in uids]}


def run_once(model, prompts: list[list[int]], args) -> dict:
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if len(prompts) == 1:
        r = _run_single(model, prompts[0], args.gen_tokens, args.prefill_step_size)
    else:
        r = _run_batch(model, prompts, args.gen_tokens, args.prefill_step_size, args.prefill_batch_size)
    mx.synchronize()
    r["wall_s"] = time.perf_counter() - t0
    r["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return r


# --- statistics, agreement ----------------------------------------------------------------------

def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    i = (len(s) - 1) * q
    lo = int(i)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (i - lo)


def spread(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"median": _pct(xs, 0.5), "min": min(xs), "max": max(xs), "p10": _pct(xs, 0.1),
            "p90": _pct(xs, 0.9), "n": len(xs)}


def agreement(stock: list[list[int]], patched: list[list[int]]) -> dict:
    """Whether the variants' greedy tokens agree, per sequence; where the first one differs."""
    firsts = []
    for s, t in zip(stock, patched):
        i = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), None)
        firsts.append(i if i is not None or len(s) == len(t) else min(len(s), len(t)))
    diverged = [i for i in firsts if i is not None]
    return {"agree": not diverged and len(stock) == len(patched),
            "sequences": len(firsts), "sequences_agreeing": firsts.count(None),
            "first_divergence": min(diverged) if diverged else None,
            "stock_tokens": stock[0] if stock else None, "patched_tokens": patched[0] if patched else None}


def summarize(cell: dict) -> None:
    cell["summary"] = {v: {m: spread([t[m] for t in cell["trials"][v]]) for m in METRICS} for v in VARIANTS}
    cell["ratio"] = {}
    for m in METRICS:
        s, p = cell["summary"]["stock"][m], cell["summary"]["patched"][m]
        cell["ratio"][m] = p["median"] / s["median"] if s and p and s["median"] else None


# --- output -----------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _with_spread(s: dict | None, missing: str = "-") -> str:
    return missing if s is None else f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"


HEADER = (f"{'prompt':>6} {'batch':>5}  {'prompt tok/s stock':>24} {'patched':>24} {'x':>6}  "
          f"{'gen tok/s stock':>22} {'patched':>22} {'x':>6}  {'peak GB s/p':>11}  greedy")


def table_row(cell: dict) -> str:
    s, r = cell["summary"], cell["ratio"]
    peak = "/".join(f"{s[v]['peak_memory_gb']['median']:.3g}" if s[v]["peak_memory_gb"] else "-" for v in VARIANTS)
    g = cell.get("greedy")
    greedy = ("-" if g is None else "same" if g["agree"] else
              f"differ at token {g['first_divergence']} ({g['sequences_agreeing']}/{g['sequences']} same)")
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    col = lambda v, m: _with_spread(s[v][m], "failed" if v in cell["errors"] else "-")  # noqa: E731
    line = (f"{cell['prompt_tokens']:>6} {cell['batch_size']:>5}  {col('stock', 'prompt_tps'):>24} "
            f"{col('patched', 'prompt_tps'):>24} {x(r['prompt_tps']):>6}  "
            f"{col('stock', 'generation_tps'):>22} {col('patched', 'generation_tps'):>22} "
            f"{x(r['generation_tps']):>6}  {peak:>11}  {greedy}")
    if cell["status"] != "ok":
        line += f"  [{cell['status']}]"
    return line


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    from .sweep import _git_commit

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()},
        "device": str(mx.default_device()),
        "versions": {"mlx": mx.__version__, "mlx_lm": ver("mlx-lm"), "mlx_moe_tune": __version__,
                     "python": sys.version.split()[0]},
        "git_commit": _git_commit(),
    }


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a run cut short leaves the last complete file


def plot(doc: dict, out: str) -> None:
    """Tokens/s vs batch size: prompt and generation panels, one line per variant and prompt length."""
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    prompts = sorted({c["prompt_tokens"] for c in doc["cells"]})
    colors = dict(zip(prompts, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for ax, metric, title in ((axes[0], "prompt_tps", "prompt"), (axes[1], "generation_tps", "generation")):
        for P in prompts:
            for v, style in (("stock", "--"), ("patched", "-")):
                pts = [(c["batch_size"], c["summary"][v][metric]) for c in doc["cells"]
                       if c["prompt_tokens"] == P and c.get("summary") and c["summary"][v][metric]]
                if not pts:
                    continue
                bs = [b for b, _ in pts]
                med = [s["median"] for _, s in pts]
                err = [[m - s["min"] for m, (_, s) in zip(med, pts)], [s["max"] - m for m, (_, s) in zip(med, pts)]]
                ax.errorbar(bs, med, yerr=err, fmt="o" + style, color=colors[P], capsize=3,
                            label=f"{v}, prompt {P}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the patched/stock ratio reads as a distance
        batches = sorted({c["batch_size"] for c in doc["cells"]})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{title} tokens/s (median, min-max)")
        ax.set_title(f"{title} tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = doc["model"]
    name = m.get("arch") or Path(str(m.get("path"))).name
    fig.suptitle(f"{name} ({m.get('source')}), {doc['environment']['device_info'].get('device_name', '')}: "
                 f"stock (dashed) vs patched (solid)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------------

def bench(args, say=print) -> dict:
    _check(args)
    start = time.perf_counter()
    prompt_tokens = _int_list("--prompt-tokens", args.prompt_tokens)
    batch_sizes = _int_list("--batch-sizes", args.batch_sizes)
    if args.arch:  # fail on a bad name before the JSON and the plot are touched
        from .random_model import arch_config

        arch_config(args.arch, args.layers or 4)
    model, vocab, desc = load_model(args)
    variants = Variants(model, backend=args.backend, table=args.table, fuse=not args.no_fuse,
                        compile=not args.no_compile)
    doc = {
        "tool": "mlx-moe-tune bench-model",
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "restart_argv")},
        "environment": environment(),
        "model": desc,
        "patch": {"projections": variants.projections, "unpatched": variants.reasons,
                  "backend": args.backend, "table": args.table, "fuse": not args.no_fuse,
                  "compile": not args.no_compile},
        "method": ("batch 1: mlx_lm.generate.generate_step timed as stream_generate (prompt_tps = prompt "
                   "tokens / time to the first token, generation_tps = tokens / time since it); batch > 1: "
                   "mlx_lm.generate.BatchGenerator as batch_generate drives it, completion_batch_size = batch, "
                   "prefill_batch_size = min(batch, --prefill-batch-size), its stats() prompt_tps / "
                   "generation_tps (decode steps before every sequence has joined run at a smaller batch). "
                   "Per cell: one warm-up per variant (its greedy tokens -> `greedy`); then rounds over all cells, "
                   "each running both variants once per cell, alternating which goes first; the variants are the same arrays under stock / patched modules "
                   "swapped in place. peak_memory_gb: mx.get_peak_memory() after mx.reset_peak_memory()."),
        "cells": [],
        "complete": False,
    }
    if variants.projections == 0:
        say(f"note: no projection runs the tuned kernels ({next(iter(variants.reasons.values()), 'no MoE layers')}): "
            f"patched = stock")
    say(f"{desc.get('arch') or desc.get('path')}: {variants.projections} MoE projections patched; "
        f"gen {args.gen_tokens} tokens, {args.trials} trials; device {doc['environment']['device']}")
    deadline = None if args.deadline is None else start + args.deadline
    late = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731
    plan = []  # (cell, prompts, warm-up result per variant that runs)
    for ci, (P, B) in enumerate(cells(prompt_tokens, batch_sizes, args.batch_prompt_tokens)):
        prompts = mx.random.randint(0, vocab, (B, P), key=mx.random.key(args.seed + ci)).tolist()
        cell = {"prompt_tokens": P, "batch_size": B, "status": "ok", "trials": {v: [] for v in VARIANTS},
                "errors": {}}
        doc["cells"].append(cell)
        plan.append((cell, prompts, {}))

    def attempt(cell, prompts, v):
        variants.use(v)
        try:
            return run_once(model, prompts, args)
        except Exception as e:  # noqa: BLE001 - e.g. stock CUDA gather_qmm at >= 65536 pairs: data
            cell["errors"][v] = _error(e)
            return None

    def log(cell, v, what, r):
        if not args.quiet:
            say(f"  [{cell['prompt_tokens']}x{cell['batch_size']}] {v:7s} {what}: prompt_tps={r['prompt_tps']:.1f}, "
                f"generation_tps={r['generation_tps']:.1f}, peak_memory={r['peak_memory_gb']:.3f}, "
                f"total_time={r['wall_s']:.2f}", file=sys.stderr)

    # every (variant, cell) once first: a new shape compiles kernels, and the greedy tokens compare
    for cell, prompts, warm in plan:
        for v in VARIANTS:
            if not late() and (r := attempt(cell, prompts, v)) is not None:
                warm[v] = r
                log(cell, v, "warm-up", r)
        cell["warmup"] = {v: {k: x for k, x in r.items() if k != "tokens"} for v, r in warm.items()}
        if len(warm) == 2:
            cell["greedy"] = agreement(warm["stock"]["tokens"], warm["patched"]["tokens"])
    # rounds over all cells: a cut run leaves every cell some trials, and drift spreads over all
    for t in range(args.trials):
        order = VARIANTS if t % 2 == 0 else VARIANTS[::-1]
        for cell, prompts, warm in plan:
            for v in order:
                if v not in warm or late():
                    continue
                r = attempt(cell, prompts, v)
                if r is None:
                    warm.pop(v)
                    continue
                same = r.pop("tokens") == warm[v]["tokens"]
                cell["trials"][v].append(dict(r, trial=t, first=order[0] == v, same_tokens_as_warmup=same))
                log(cell, v, f"trial {t + 1}", r)
        for cell, _, _ in plan:
            summarize(cell)
        if args.json:
            _write_json(args.json, doc)
    say(HEADER)
    for cell, _, warm in plan:
        if any(len(cell["trials"][v]) < args.trials for v in VARIANTS if v not in cell["errors"]):
            cell["status"] = "cut by --deadline"
        summarize(cell)
        say(table_row(cell))
        for v, err in cell["errors"].items():
            say(f"{'':>13}{v} failed: {err}")
    doc["complete"] = all(c["status"] == "ok" for c in doc["cells"])
    doc["wall_s"] = time.perf_counter() - start
    if args.json:
        _write_json(args.json, doc)
    if args.plot:
        plot(doc, args.plot)
    return doc


def run(args) -> int:
    bench(args)
    return 0
