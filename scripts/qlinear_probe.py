"""Stock MLX layers of the tests' tiny model on this device against the CPU stream, same weights.

decode_diag.py found the tiny model's stock decode differing between the GPU and the CPU stream
(relative logit error 1.56) while every SwitchGLU call agreed. This checks each stock quantized
linear (mx.quantized_matmul), the router (gate -> softmax -> top-k) and the whole model, for
1 and 2 tokens, three times each (is the GPU run to run stable?), against the CPU stream.

    python scripts/qlinear_probe.py [-o probe.json]            # the tiny model's layers
    python scripts/qlinear_probe.py --shapes [-o probe.json]   # mx.quantized_matmul over M, K, N
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_patch import _decode_steps, _model  # noqa: E402


def _np(a):
    return np.array(a.astype(mx.float32))


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=None)
    ap.add_argument("--shapes", action="store_true", help="mx.quantized_matmul over M, K, N instead")
    args = ap.parse_args()
    rows = []

    def check(name, fn, x, **extra):
        gpu = [_np(fn(x)) for _ in range(3)]
        with mx.stream(mx.cpu):
            cpu = _np(fn(x))
        row = dict(layer=name, shape=list(x.shape), **extra, gpu_vs_cpu=_rel(gpu[0], cpu),
                   gpu_run_to_run=max(_rel(g, gpu[0]) for g in gpu[1:]))
        rows.append(row)
        print(row, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))

    if args.shapes:
        for K in (64, 256, 2816):
            for N in (8, 256):
                w = mx.random.normal((N, K), key=mx.random.key(K + N)).astype(mx.bfloat16)
                wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
                for M in (1, 2, 3, 4, 6, 8, 16, 40):
                    x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.bfloat16)
                    check("quantized_matmul 4-bit gs64", lambda a: mx.quantized_matmul(
                        a, wq, sc, bi, transpose=True, group_size=64, bits=4), x, M=M, K=K, N=N)
        return
    model = _model(layers=1)

    for L in (1, 2):
        for name, m in model.named_modules():
            if isinstance(m, nn.QuantizedLinear):
                x = (mx.random.normal((1, L, m.weight.shape[1] * 32 // m.bits), key=mx.random.key(L))).astype(mx.bfloat16)
                check(f"{name} ({m.bits}-bit gs{m.group_size}, {m.weight.shape[0]} out)", m, x)
        moe = model.layers[0].mlp
        x = mx.random.normal((1, L, 64), key=mx.random.key(7 + L)).astype(mx.bfloat16)
        check("router softmax(gate(x))", lambda v: mx.softmax(moe.gate(v), axis=-1, precise=True), x)
        check("router top-k (as float)", lambda v: mx.sort(mx.argpartition(
            mx.softmax(moe.gate(v), axis=-1, precise=True), kth=-moe.top_k, axis=-1)[..., -moe.top_k:], axis=-1
        ).astype(mx.float32), x)
        toks = mx.random.randint(0, 256, (1, L), key=mx.random.key(3))
        check("whole model logits (no cache)", model, toks)
        v = mx.random.normal((1, L, 64), key=mx.random.key(11)).astype(mx.bfloat16)
        check("fast.rms_norm", lambda a: mx.fast.rms_norm(a, mx.ones((64,), mx.bfloat16), 1e-6), v)
        q = mx.random.normal((1, 2, L, 32), key=mx.random.key(12)).astype(mx.bfloat16)
        check("fast.rope offset 2", lambda a: mx.fast.rope(a, 32, traditional=False, base=10000.0,
                                                           scale=1.0, offset=2), q)
        kv = mx.random.normal((1, 1, L + 2, 32), key=mx.random.key(13)).astype(mx.bfloat16)
        check("fast.sdpa GQA 2:1 over L+2 keys", lambda a: mx.fast.scaled_dot_product_attention(
            a, kv, kv, scale=32 ** -0.5, mask="causal" if L > 1 else None), q)
    steps = [np.concatenate([s.reshape(-1) for s in _decode_steps(model)]) for _ in range(2)]
    with mx.stream(mx.cpu):
        cpu = np.concatenate([s.reshape(-1) for s in _decode_steps(model)])
    row = dict(layer="stock decode steps with KV cache (tests' _decode_steps)", gpu_vs_cpu=_rel(steps[0], cpu),
               gpu_run_to_run=_rel(steps[1], steps[0]))
    rows.append(row)
    print(row, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
