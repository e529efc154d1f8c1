"""Where a patched 1-layer model's step-by-step KV-cache decode departs from stock, on one device.

tests/test_patch.py::test_decode_steps_on_gpu failed on the H200 (default and compiled alike)
while the SwitchGLU-level test on fresh inputs passed. This runs the tests' own decode
(`_decode_steps`) three ways: stock on the GPU, stock on the CPU stream (a second reference
that shares no GPU kernel), and patched on the GPU. It records every SwitchGLU call's inputs and
output, then replays each recorded call through the stock and the patched SwitchGLU: on the
arrays as recorded (views, as the router made them) and on fresh copies of them.

    python scripts/decode_diag.py [-o diag.json] [--no-cpu]

H200 result (sweeps/results/h200/mlx-cuda-bug/decode-diag.json): the same x into the MoE layer gave
different router top-k in the stock and patched runs, while every replayed SwitchGLU call matched
stock. The cause was MLX's stock quantized_matmul at 2+ rows of K=64 (scripts/qlinear_probe.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_moe_tune import patch  # noqa: E402
from tests.test_patch import _decode_steps, _model  # noqa: E402


class _Record(nn.Module):
    """A SwitchGLU stand-in that calls the real one and keeps (x, indices, y) of every call."""

    def __init__(self, glu):
        super().__init__()
        self.glu = glu
        self._calls = []

    def __call__(self, x, indices):
        y = self.glu(x, indices)
        self._calls.append((x, indices, y))
        return y


def _np(a):
    return np.array(a.astype(mx.float32)) if mx.issubdtype(a.dtype, mx.floating) else np.array(a)


def _rel(a, b) -> float:
    a, b = _np(a), _np(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _fresh(a):
    return mx.array(np.array(a.astype(mx.float32))).astype(a.dtype) if mx.issubdtype(a.dtype, mx.floating) \
        else mx.array(np.array(a))


def _steps_recorded(model):
    mlp = model.layers[0].mlp
    rec = _Record(mlp.switch_mlp)
    mlp.switch_mlp = rec
    logits = _decode_steps(model)
    mlp.switch_mlp = rec.glu
    return logits, rec._calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=None)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU-stream reference")
    args = ap.parse_args()
    out: dict = {"device": str(mx.default_device())}
    t0 = time.perf_counter()

    def stage(name, value):  # printed as it comes: a run cut by a time limit keeps what it has
        out[name] = value
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {value}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=1))

    model = _model(layers=1)
    stock_glu = model.layers[0].mlp.switch_mlp
    ref, ref_calls = _steps_recorded(model)
    stage("stock_gpu_steps", len(ref))
    patch.patch_model(model)
    tuned_glu = model.layers[0].mlp.switch_mlp
    got, got_calls = _steps_recorded(model)
    stage("logits_patched_vs_stock_gpu", [_rel(mx.array(a), mx.array(b)) for a, b in zip(got, ref)])

    calls = []
    for i, ((xs, ids, ys), (xo, ido, yo)) in enumerate(zip(ref_calls, got_calls)):
        c = {"call": i, "x_shape": list(xs.shape), "indices_shape": list(ids.shape),
             "indices_dtype": str(ids.dtype), "stock_indices": _np(ids).reshape(-1).tolist(),
             "patched_indices": _np(ido).reshape(-1).tolist(), "x_patched_vs_stock": _rel(xo, xs),
             "y_patched_vs_stock_in_model": _rel(yo, ys)}
        # replays on the stock run's inputs: as recorded (router views), then as fresh copies
        c["replay_tuned_vs_stock"] = _rel(tuned_glu(xs, ids), stock_glu(xs, ids))
        c["replay_tuned_fresh_vs_stock"] = _rel(tuned_glu(_fresh(xs), _fresh(ids)), stock_glu(xs, ids))
        c["replay_stock_fresh_vs_stock"] = _rel(stock_glu(_fresh(xs), _fresh(ids)), stock_glu(xs, ids))
        c["replay_stock_vs_recorded"] = _rel(stock_glu(xs, ids), ys)
        calls.append(c)
        stage(f"call{i}", c)
    if args.no_cpu:
        return
    for i, (xs, ids, ys) in enumerate(ref_calls):  # a reference that shares no GPU kernel
        with mx.stream(mx.cpu):
            cpu = stock_glu(xs, ids)
            mx.eval(cpu)
        stage(f"call{i}_cpu", {"stock_gpu_vs_cpu": _rel(ys, cpu), "tuned_vs_cpu": _rel(tuned_glu(xs, ids), cpu)})
    model_ref = _model(layers=1)  # the same seed on the same device: the same weights as `model`
    with mx.stream(mx.cpu):
        ref_cpu = _decode_steps(model_ref)
    stage("logits_stock_gpu_vs_cpu", [_rel(mx.array(a), mx.array(b)) for a, b in zip(ref, ref_cpu)])


if __name__ == "__main__":
    main()
