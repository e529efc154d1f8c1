"""End-to-end tokens/s of an mlx-lm MoE model, stock vs patched with our kernels.

Models are built from a config dict with random weights and quantized in memory: nothing is
downloaded. `shape_config("qwen3-30b-a3b", layers=4)` gives a real model's MoE shapes with few
layers (tokens/s then measures those layers; the patched/stock ratio is what matters).

    python -m mlx_moe_tune.e2e --model qwen3-30b-a3b --layers 4 --prompt 512 --gen 64
"""
from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn

# MoE shapes of public models (hidden, moe_intermediate, experts, top_k); attention kept small
SHAPES = {
    "tiny": dict(hidden_size=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8),
    "gemma-26b-a4b": dict(hidden_size=2816, moe_intermediate_size=704, num_experts=128,
                          num_experts_per_tok=8),
}


def shape_config(name: str = "tiny", *, layers: int = 2, vocab: int = 256,
                 model_type: str = "qwen3_moe") -> dict:
    """An mlx-lm config dict (qwen3_moe or mixtral) with the MoE shape of `name`."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    s = SHAPES[name]
    D = s["hidden_size"]
    heads = max(2, D // 128)
    common = dict(hidden_size=D, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 2), vocab_size=vocab, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False)
    if model_type == "qwen3_moe":
        return dict(common, model_type="qwen3_moe", head_dim=D // heads,
                    intermediate_size=2 * D, num_experts=s["num_experts"],
                    num_experts_per_tok=s["num_experts_per_tok"], decoder_sparse_step=1,
                    mlp_only_layers=[], moe_intermediate_size=s["moe_intermediate_size"],
                    max_position_embeddings=4096, norm_topk_prob=True)
    if model_type == "mixtral":
        return dict(common, model_type="mixtral", intermediate_size=s["moe_intermediate_size"],
                    num_local_experts=s["num_experts"],
                    num_experts_per_tok=s["num_experts_per_tok"])
    raise ValueError(f"unsupported model_type {model_type!r} (qwen3_moe or mixtral)")


def build_model(config: dict, *, bits: int = 4, group_size: int = 64, mode: str = "affine",
                dtype=mx.bfloat16, seed: int = 0, experts_only: bool = False) -> nn.Module:
    """Random-weight mlx-lm model from `config`, cast to `dtype` and quantized: all layers, or with
    `experts_only` just the MoE experts' SwitchLinear layers (what the patch replaces). The GPU
    tests use that: MLX 0.32.4 CUDA's quantized_matmul is wrong at some small shapes
    (scripts/qlinear_probe.py), and a test of our kernels must not hinge on it."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import _get_classes, quantize_model

    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(dtype)
    pred = (lambda path, m: isinstance(m, SwitchLinear)) if experts_only else None
    model, _ = quantize_model(model, dict(config), group_size=group_size, bits=bits, mode=mode,
                              quant_predicate=pred)
    mx.eval(model.parameters())
    return model


def measure(model: nn.Module, *, prompt: int = 128, gen: int = 32, iters: int = 3,
            seed: int = 0) -> dict:
    """Median prefill and decode tokens/s over `iters` runs (after one warm-up run).

    Prefill runs the whole prompt in one forward (the sorted gather_qmm path); decode runs
    `gen` single-token steps on the KV cache (the unsorted path), as mlx_lm.generate does.
    """
    from mlx_lm.models.cache import make_prompt_cache

    vocab = model.args.vocab_size if hasattr(model, "args") else 256
    tokens = mx.random.randint(0, vocab, (1, prompt), key=mx.random.key(seed))
    pre, dec = [], []
    for it in range(iters + 1):
        cache = make_prompt_cache(model)
        mx.synchronize()
        t0 = time.perf_counter()
        logits = model(tokens, cache=cache)
        y = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(y)
        t1 = time.perf_counter()
        for _ in range(gen):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(y)  # one token at a time, like generation
        t2 = time.perf_counter()
        if it:  # the first run compiles kernels
            pre.append(prompt / (t1 - t0))
            dec.append(gen / (t2 - t1))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"prefill_tps": med(pre), "decode_tps": med(dec), "prompt": prompt, "gen": gen,
            "iters": iters}


def compare(model: nn.Module, *, backend=None, table=None, fuse: bool = True, prompt: int = 128,
            gen: int = 32, iters: int = 3, compile: bool = True) -> dict:
    """Stock vs patched tokens/s and the largest logit difference on one model (patched for
    the measurement, unpatched again on return)."""
    from . import patch

    vocab = model.args.vocab_size if hasattr(model, "args") else 256
    probe = mx.random.randint(0, vocab, (1, 8), key=mx.random.key(1))
    stock = measure(model, prompt=prompt, gen=gen, iters=iters)
    ref, ref1 = model(probe), model(probe[:, :1])  # 8 tokens (batch path), 1 token (decode path)
    n = patch.patch_model(model, backend=backend, table=table, fuse=fuse, compile=compile)
    try:
        tuned = measure(model, prompt=prompt, gen=gen, iters=iters)
        diff = mx.abs(model(probe).astype(mx.float32) - ref.astype(mx.float32)).max().item()
        diff1 = mx.abs(model(probe[:, :1]).astype(mx.float32) - ref1.astype(mx.float32)).max().item()
        reasons = {p: r for p, r in patch.patched_layers(model).items() if r}
    finally:
        patch.unpatch(model)
    return {
        "patched_layers": n,
        "stock": stock,
        "patched": tuned,
        "prefill_speedup": tuned["prefill_tps"] / stock["prefill_tps"],
        "decode_speedup": tuned["decode_tps"] / stock["decode_tps"],
        "max_logit_diff": diff,
        "max_logit_diff_1_token": diff1,
        "unpatched_reasons": reasons,
        "device": str(mx.default_device()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_moe_tune.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--model-type", default="qwen3_moe", choices=["qwen3_moe", "mixtral"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--mode", default="affine")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--table", default=None, help="tuning-table directory")
    ap.add_argument("--no-fuse", action="store_true", help="separate gate and up kernels")
    ap.add_argument("--no-compile", action="store_true", help="patch_model(compile=False): decode without mx.compile")
    ap.add_argument("-o", "--output", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    cfg = shape_config(a.model, layers=a.layers, model_type=a.model_type)
    model = build_model(cfg, bits=a.bits, group_size=a.group_size, mode=a.mode,
                        dtype=getattr(mx, a.dtype))
    res = compare(model, backend=a.backend, table=a.table, fuse=not a.no_fuse,
                  prompt=a.prompt, gen=a.gen, iters=a.iters, compile=not a.no_compile)
    res["config"] = {"model": a.model, "model_type": a.model_type, "layers": a.layers, "compile": not a.no_compile,
                     "bits": a.bits, "group_size": a.group_size, "mode": a.mode, "dtype": a.dtype}
    text = json.dumps(res, indent=2)
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
