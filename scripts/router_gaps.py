"""Router top-k margins of the 2-layer test model (tests/test_patch.py::_model) in the step-by-step
KV-cache decode that test_decode_steps_* run: per MoE call, the smallest gap between the k-th and
(k+1)-th router probability over its tokens. A gap this small lets a rounding difference in an
earlier layer's MoE output flip a later layer's expert choice (stock weights, CPU is enough).

    python scripts/router_gaps.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_patch import _decode_steps, _model  # noqa: E402


class _Gaps:
    def __init__(self, gate, layer, k, out):
        self.gate, self.layer, self.k, self.out = gate, layer, k, out

    def __call__(self, x):
        y = self.gate(x)
        p = np.sort(np.array(mx.softmax(y.astype(mx.float32), axis=-1)).reshape(-1, y.shape[-1]), axis=-1)[:, ::-1]
        self.out.append(dict(layer=self.layer, tokens=int(x.shape[1]), gap=float((p[:, self.k - 1] - p[:, self.k]).min())))
        return y


def main() -> None:
    model = _model(layers=2)
    gaps: list[dict] = []
    for i, layer in enumerate(model.layers):
        layer.mlp.gate = _Gaps(layer.mlp.gate, i, layer.mlp.top_k, gaps)
    _decode_steps(model)  # the tests' prompt and steps
    for g in gaps:
        print(g)


if __name__ == "__main__":
    main()
