"""Decode cost of one mlx-lm SwitchGLU layer (gemma-26b-a4b MoE shape: E=128, top-8, D=2816,
H=704, 4-bit gs64 bf16), stock vs patched (fused qmv_glu, and separate kernels): the host time
to build one call's graph, and the time per call in a chain of 32 dependent calls per mx.eval
(each call's input is the previous output, as in generation). Writes OUT/decode-layer.json.
    python3 scripts/h200/decode_layer.py OUT
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_moe_tune import patch, random_model

CHAIN, ROUNDS = int(os.environ.get("CHAIN", 32)), int(os.environ.get("ROUNDS", 15))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = random_model.shape_config("gemma-26b-a4b", layers=1)
    model = random_model.build_model(cfg)
    stock = next(m for _, m in model.named_modules() if type(m) is SwitchGLU)
    D, E, k = cfg["hidden_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    rng = np.random.default_rng(0)
    idx = [mx.array(rng.choice(E, k, replace=False).reshape(1, 1, k).astype(np.uint32)) for _ in range(CHAIN)]
    x0 = (mx.random.normal((1, 1, D)) * 0.1).astype(mx.bfloat16)
    mx.eval(x0, *idx)
    layers = {"stock": stock, "patched": patch.TunedSwitchGLU.from_module(stock, compile=True),
              "patched-nocompile": patch.TunedSwitchGLU.from_module(stock, compile=False),
              "patched-nofuse-nocompile": patch.TunedSwitchGLU.from_module(stock, fuse=False, compile=False)}
    res, outs = {}, {}
    for name, layer in layers.items():
        def chain():
            y = x0
            for i in range(CHAIN):  # rms-normalize so values stay finite along the chain
                y = layer(y, idx[i]).sum(axis=-2)
                y = (y * mx.rsqrt(mx.mean(mx.square(y.astype(mx.float32))) + 1e-6) * 0.1).astype(mx.bfloat16)
            return y
        mx.eval(chain())
        builds, runs = [], []
        for _ in range(ROUNDS):
            mx.synchronize()
            t0 = time.perf_counter()
            y = chain()
            t1 = time.perf_counter()
            mx.eval(y)
            mx.synchronize()
            t2 = time.perf_counter()
            builds.append((t1 - t0) / CHAIN * 1e6)
            runs.append((t2 - t0) / CHAIN * 1e6)
        ref = chain()
        mx.eval(ref)
        res[name] = dict(build_us=statistics.median(builds), per_call_us=statistics.median(runs),
                         per_call_us_min=min(runs), compiled=bool(getattr(layer, "_mmt_compile", False)),
                         compile_error=getattr(layer, "_mmt_compile_error", None))
        outs[name] = np.asarray(ref.astype(mx.float32))
        print(name, res[name], flush=True)
    for name in outs:  # the same chain through every variant: outputs must agree
        res[name]["max_rel_diff_vs_stock"] = float(np.abs(outs[name] - outs["stock"]).max() / np.abs(outs["stock"]).max())
    print({n: r["max_rel_diff_vs_stock"] for n, r in res.items()}, flush=True)
    (out / "decode-layer.json").write_text(json.dumps(dict(
        device=mx.device_info(), mlx=mx.__version__, shape=dict(E=E, D=D, H=cfg["moe_intermediate_size"], top_k=k),
        chain=CHAIN, rounds=ROUNDS, results=res,
        note="per_call_us: graph building + eval of a chain of dependent layer calls, per call"), indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
