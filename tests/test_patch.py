"""patch.py on tiny random-weight mlx-lm models (offline), patched vs unpatched logits.

Most tests replace `mlx_moe_tune.ops` with a stand-in that computes mx.gather_qmm and records
what it is called with: they check the patch's own plumbing (layouts, one shared plan, bias,
fallbacks, unpatch, weight loading) whatever state the kernels are in. `test_real_kernels`
runs the real op where a backend for it exists here and skips with the reason otherwise.
"""
from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchMLP

from mlx_moe_tune import patch, random_model

pytest.importorskip("mlx_moe_tune.kernels.plan", reason="kernels/plan.py (H-cuda) not present")


class FakeOps:
    """mx.gather_qmm with ops' signature; refuses non-affine modes like a format gap would."""

    def __init__(self):
        self.calls = []

    def _check(self, x, indices, mode, plan):
        if mode != "affine":
            raise ValueError(f"mode {mode!r} is not supported (affine only)")
        if plan is not None:  # the plan must describe exactly this call's pairs
            flat = np.array(indices).reshape(-1)
            np.testing.assert_array_equal(np.array(plan.order), np.argsort(flat, kind="stable"))
            assert plan.pairs == flat.size

    def gather_qmm(self, x, w, scales, biases, indices, *, group_size, bits, mode="affine",
                   sorted_indices=False, plan=None, backend=None, validate=True, family=None,
                   config=None, m=None):
        self._check(x, indices, mode, plan)
        self.calls.append(("gather_qmm", plan, x.shape, family, config))
        return mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, transpose=True,
                             group_size=group_size, bits=bits, mode=mode)

    def gather_qmm_glu(self, x, wg, sg, bg, wu, su, bu, indices, *, group_size, bits,
                       mode="affine", sorted_indices=False, plan=None, backend=None,
                       validate=True, config=None, m=None):
        self._check(x, indices, mode, plan)
        self.calls.append(("gather_qmm_glu", plan, x.shape))
        kw = dict(rhs_indices=indices, transpose=True, group_size=group_size, bits=bits)
        g = mx.gather_qmm(x, wg, sg, bg, **kw).astype(mx.float32)
        u = mx.gather_qmm(x, wu, su, bu, **kw).astype(mx.float32)
        return (nn.silu(g) * u).astype(x.dtype)


@pytest.fixture
def fake_ops(monkeypatch):
    f = FakeOps()
    monkeypatch.setattr(patch, "_ops", lambda: f)
    # the plumbing tests count the op's calls per forward: eager, also on a GPU (a compiled
    # decode would call the op only while tracing); test_compiled_decode_* cover compile
    monkeypatch.setattr(patch, "_traceable", lambda backend: False)
    return f


def _model(model_type="qwen3_moe", layers=2, **kw):
    return random_model.build_model(random_model.shape_config("tiny", layers=layers, model_type=model_type), **kw)


def _logits(model, L, seed=0):
    toks = mx.random.randint(0, 256, (1, L), key=mx.random.key(seed))
    return np.array(model(toks).astype(mx.float32))


def _on_cpu(fn, *args):
    """fn(*args) on the CPU stream: the reference of the GPU tests. It shares no GPU kernel with
    what is under test, and MLX 0.32.4 CUDA's own quantized_matmul is wrong at some small shapes
    (scripts/qlinear_probe.py: 2 rows of K=64 differ between runs), so stock on the GPU is not one."""
    with mx.stream(mx.cpu):
        out = fn(*args)
        if isinstance(out, mx.array):
            out = np.array(out.astype(mx.float32))
    return out


def _stock_fallbacks(glu) -> dict:
    """Projections of a patched SwitchGLU whose last call fell back to mx.gather_qmm, and why."""
    return {n: glu[n].__dict__["_mmt_fallback"] for n in ("gate_proj", "up_proj", "down_proj")
            if "_mmt_fallback" in glu[n].__dict__}


def _rel_err(a, b) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _assert_close(a, b, tol=0.05):
    assert a.shape == b.shape
    err = _rel_err(a, b)
    assert err < tol, f"relative max error {err:.3g}"


@pytest.mark.parametrize("model_type,where", [("qwen3_moe", "mlp.switch_mlp"),
                                              ("mixtral", "block_sparse_moe.switch_mlp")])
@pytest.mark.parametrize("fuse", [True, False])
def test_patched_logits_match(fake_ops, model_type, where, fuse):
    # fused rounds once in float32 where mlx-lm rounds gate and up to bf16: in a 2-layer model
    # that can flip layer 2's top-k choice, so the fused comparison uses one layer
    layers = 1 if fuse else 2
    model = _model(model_type, layers=layers)
    # L=3: 6 pairs (mlx-lm's unsorted path); L=40: 80 pairs (mlx-lm sorts); k=2
    ref = {L: _logits(model, L) for L in (1, 3, 40)}
    params = {k: id(v) for k, v in tree_flatten(model.parameters())}
    assert patch.patch_model(model, fuse=fuse) == 3 * layers  # gate/up/down per layer
    glu = model.layers[0]
    for part in where.split("."):
        glu = getattr(glu, part)
    assert type(glu) is patch.TunedSwitchGLU and isinstance(glu, SwitchGLU)
    assert glu._mmt_fuse is fuse
    # the same arrays under the same names
    assert {k: id(v) for k, v in tree_flatten(model.parameters())} == params
    for L, r in ref.items():
        fake_ops.calls.clear()
        _assert_close(_logits(model, L), r, tol=0.05 if fuse else 1e-6)  # bf16 roundings
        kinds = [c[0] for c in fake_ops.calls]
        assert kinds == (["gather_qmm_glu", "gather_qmm"] if fuse else ["gather_qmm"] * 3) * layers
        # one plan per layer, shared by its projections
        plans = [c[1] for c in fake_ops.calls]
        per_layer = len(plans) // layers
        assert None not in plans
        firsts = plans[::per_layer]
        assert all(p is firsts[i // per_layer] for i, p in enumerate(plans))
        assert len({id(p) for p in firsts}) == layers


def test_only_moe_layers_are_patched(fake_ops):
    cfg = random_model.shape_config("tiny", layers=3)
    cfg["mlp_only_layers"] = [0, 2]  # dense MLPs around one MoE layer (deepseek-like layouts)
    model = random_model.build_model(cfg)
    ref = _logits(model, 40)
    assert patch.patch_model(model, fuse=False) == 3
    assert [type(layer.mlp).__name__ for layer in model.layers] == \
        ["MLP", "Qwen3MoeSparseMoeBlock", "MLP"]
    assert type(model.layers[1].mlp.switch_mlp) is patch.TunedSwitchGLU
    _assert_close(_logits(model, 40), ref, tol=1e-6)


def test_unsupported_format_stays_stock(fake_ops):
    model = _model(mode="mxfp4", group_size=32)
    ref = _logits(model, 5)
    assert patch.patch_model(model) == 0
    reasons = patch.patched_layers(model)
    assert len(reasons) == 6 and all("mxfp4" in r for r in reasons.values())
    np.testing.assert_array_equal(_logits(model, 5), ref)  # exactly mlx-lm's path
    assert fake_ops.calls == []


def test_unpatch_restores_stock_classes(fake_ops):
    model = _model()
    ref = _logits(model, 40)
    patch.patch_model(model)
    assert patch.unpatch(model) == 2
    kinds = {type(m) for _, m in model.named_modules()}
    assert patch.TunedSwitchGLU not in kinds and patch.TunedSwitchLinear not in kinds
    assert SwitchGLU in kinds and QuantizedSwitchLinear in kinds
    np.testing.assert_array_equal(_logits(model, 40), ref)
    assert patch.patch_model(model) == 6  # and it can be patched again


def test_load_weights_into_patched_model(fake_ops):
    src = _model(seed=1)
    dst = _model(seed=2)
    patch.patch_model(dst, fuse=False)
    dst.load_weights(tree_flatten(src.parameters()), strict=True)
    _assert_close(_logits(dst, 40), _logits(src, 40), tol=1e-6)


class _MLPBlock(nn.Module):
    """A SwitchMLP with per-expert bias (phixtral-like), routed by a fixed top-2 gate."""

    def __init__(self, D=64, H=128, E=4):
        super().__init__()
        self.gate = nn.Linear(D, E)
        self.switch_mlp = SwitchMLP(D, H, E, bias=True)

    def __call__(self, x):
        idx = mx.argpartition(-self.gate(x), kth=1, axis=-1)[..., :2]
        return self.switch_mlp(x, mx.stop_gradient(idx)).sum(-2)


def test_switch_mlp_with_bias(fake_ops):
    mx.random.seed(3)
    block = _MLPBlock()
    block.switch_mlp.fc1.bias = mx.random.normal(block.switch_mlp.fc1.bias.shape)
    block.switch_mlp.fc2.bias = mx.random.normal(block.switch_mlp.fc2.bias.shape)
    nn.quantize(block, group_size=64, bits=4, class_predicate=lambda p, m: p.startswith("switch") and hasattr(m, "to_quantized"))
    x = mx.random.normal((1, 40, 64))
    ref = np.array(block(x))
    assert patch.patch_model(block) == 2
    fake_ops.calls.clear()  # patching probes the op once per layer
    assert type(block.switch_mlp.fc1) is patch.TunedSwitchLinear
    assert "bias" in block.switch_mlp.fc1
    _assert_close(np.array(block(x)), ref, tol=1e-6)
    assert len(fake_ops.calls) == 2


def test_runtime_value_error_falls_back(fake_ops, monkeypatch):
    model = _model()
    ref = _logits(model, 3)
    patch.patch_model(model, fuse=False)

    def refuse(*a, **k):
        raise ValueError("no tile for this shape")

    monkeypatch.setattr(fake_ops, "gather_qmm", refuse)
    _assert_close(_logits(model, 3), ref, tol=1e-6)
    assert model.layers[0].mlp.switch_mlp.up_proj._mmt_fallback == "no tile for this shape"


def test_table_directory_picks_the_config(fake_ops, tmp_path):
    from mlx_moe_tune import tables
    from mlx_moe_tune.backend import get_backend

    b = get_backend(None)
    cfg = {"BM": 16, "FN": 2, "WN": 4, "WK": 1, "MC": 4}
    t = tables.Table(backend=b.name, device=tables.device_name(b.name), mode="affine", bits=4,
                     group_size=64, dtype="bfloat16", E=8, K=64, N=64, mlx_version=mx.__version__,
                     buckets=[tables.Bucket(m=1, family="qmm", config=cfg)])
    tables.write_table(t, tmp_path)
    tables.clear_cache()
    model = _model(layers=1)  # tiny: gate, up and down are all (E=8, N=64, K=64)
    ref = _logits(model, 40)
    assert patch.patch_model(model, table=tmp_path) == 3
    fake_ops.calls.clear()
    _assert_close(_logits(model, 40), ref, tol=1e-6)
    assert [c[3:] for c in fake_ops.calls] == [("qmm", cfg)] * 3


def test_real_kernels():
    """The real op: on a GPU if there is one, else the CPU emulator (CUDA dialect)."""
    ops = pytest.importorskip("mlx_moe_tune.ops", reason="mlx_moe_tune.ops (H-cuda) not present")
    from mlx_moe_tune.backend import gpu_backend

    backend = None if gpu_backend() else "emulator-cuda"
    # experts-only quantization: the rest of the model runs no stock quantized_matmul on the GPU
    model = _model(layers=1, experts_only=True)
    ref = {L: _on_cpu(_logits, model, L) for L in (1, 40)}
    n = patch.patch_model(model, backend=backend)
    if n == 0:
        pytest.skip(f"kernels cannot run here: {next(iter(patch.patched_layers(model).values()))}")
    assert isinstance(ops, types.ModuleType) and n == 3
    for L, r in ref.items():
        _assert_close(_logits(model, L), r, tol=0.05)
    glu = model.layers[0].mlp.switch_mlp
    # decode compiles by default on a GPU; the emulator cannot be traced and falls back
    assert ("_mmt_compiled" in glu.__dict__) == (backend is None), getattr(glu, "_mmt_compile_error", None)
    assert not _stock_fallbacks(glu)  # our kernels ran, not mx.gather_qmm


def _decode_steps(model):
    """Logits of 4 one-token steps with the KV cache after a 2-token prompt, as generation runs."""
    from mlx_lm.models.cache import make_prompt_cache

    toks = mx.random.randint(0, 256, (1, 6), key=mx.random.key(3))
    cache = make_prompt_cache(model)
    model(toks[:, :2], cache=cache)
    return [np.array(model(toks[:, i:i + 1], cache=cache).astype(mx.float32)) for i in range(2, 6)]


def test_decode_steps_on_emulator():
    """The decode path (qmv_glu + qmv; the emulator cannot be traced, so uncompiled) step by step
    with the KV cache, on the emulator running the CUDA sources, against stock logits. One MoE
    layer: with two, a rounding difference in layer 1 can flip layer 2's top-k choice (see
    test_patched_logits_match)."""
    pytest.importorskip("mlx_moe_tune.ops", reason="mlx_moe_tune.ops (H-cuda) not present")
    model = _model(layers=1)
    ref = _decode_steps(model)
    patch.patch_model(model, backend="emulator-cuda")
    for g, r in zip(_decode_steps(model), ref):
        _assert_close(g, r, tol=0.05)
    assert not _stock_fallbacks(model.layers[0].mlp.switch_mlp)


def _switchglu_decode_errors(compile: bool, backend=None) -> list[float]:
    """Relative max error of a patched SwitchGLU against the stock one on the same inputs and
    expert ids (so no routing flip can hide or fake a difference): decode-sized calls of 1 and 2
    tokens, each shape called twice (a compiled function replays on the second call)."""
    stock = _model(layers=1, experts_only=True).layers[0].mlp.switch_mlp
    tuned = patch.TunedSwitchGLU.from_module(stock, backend=backend, compile=compile)
    E, k = stock["gate_proj"]["weight"].shape[0], 2
    D = stock["gate_proj"].input_dims
    errs = []
    for i, L in enumerate((1, 1, 2, 2)):
        x = (mx.random.normal((1, L, D), key=mx.random.key(10 + i)) * 0.5).astype(mx.bfloat16)
        idx = mx.array(np.stack([np.random.default_rng(i * 7 + t).choice(E, k, replace=False)
                                 for t in range(L)]).reshape(1, L, k).astype(np.uint32))
        r = _on_cpu(stock, x, idx)
        g = np.array(tuned(x, idx).astype(mx.float32))
        errs.append(_rel_err(g, r))
    assert ("_mmt_compiled" in tuned.__dict__) == compile, getattr(tuned, "_mmt_compile_error", None)
    return errs


def test_switchglu_decode_on_emulator():
    pytest.importorskip("mlx_moe_tune.ops", reason="mlx_moe_tune.ops (H-cuda) not present")
    errs = _switchglu_decode_errors(False, backend="emulator-cuda")
    assert max(errs) < 0.05, errs


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["uncompiled", "compiled"])
def test_switchglu_decode_on_gpu(compile):
    """The patched decode path of one SwitchGLU, uncompiled and through mx.compile (the default),
    against stock on the CPU stream with the same inputs and expert ids (no routing involved)."""
    errs = _switchglu_decode_errors(compile)
    assert max(errs) < 0.05, errs


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["uncompiled", "compiled"])
def test_decode_steps_on_gpu(compile):
    """The patched decode path on a GPU, uncompiled and through mx.compile (the default), against
    stock logits on the CPU stream step by step with the KV cache; one MoE layer (no routing flips
    downstream), only the experts quantized (see _on_cpu)."""
    model = _model(layers=1, experts_only=True)
    ref = _on_cpu(_decode_steps, model)
    patch.patch_model(model, compile=compile)
    got = _decode_steps(model)
    glu = model.layers[0].mlp.switch_mlp
    assert ("_mmt_compiled" in glu.__dict__) == compile, getattr(glu, "_mmt_compile_error", None)
    assert not _stock_fallbacks(glu)
    for g, r in zip(got, ref):
        _assert_close(g, r, tol=0.05)


class _TraceableOps(FakeOps):
    """FakeOps without its host-side plan check, so a compile trace can run through it."""

    def _check(self, x, indices, mode, plan):
        if mode != "affine":
            raise ValueError(f"mode {mode!r} is not supported (affine only)")


def test_compiled_decode_follows_live_weights(monkeypatch):
    """Decode-sized SwitchGLU calls replay through mx.compile (compile=True, the default; meant for a
    real GPU): same logits as stock, no fallback, and weights replaced after the first call are the
    ones used (the compiled function reads the module state at every call)."""
    ops_ = _TraceableOps()
    monkeypatch.setattr(patch, "_ops", lambda: ops_)
    monkeypatch.setattr(patch, "_traceable", lambda backend: True)  # the stand-in traces anywhere
    model = _model("qwen3_moe", layers=1)
    ref = _logits(model, 1)
    patch.patch_model(model, compile=True)
    glu = model.layers[0].mlp.switch_mlp
    _assert_close(_logits(model, 1), ref, tol=0.05)
    assert glu._mmt_compile and "_mmt_compiled" in glu.__dict__, getattr(glu, "_mmt_compile_error", None)
    traced = len(ops_.calls)
    _logits(model, 1)
    assert len(ops_.calls) == traced  # replayed: no Python op calls on the second decode step
    # new down-projection weights (a different quantized matrix) must change the output
    d = glu["down_proj"]
    w = mx.random.normal((d["weight"].shape[0], d["weight"].shape[1], d.input_dims), key=mx.random.key(7))
    wq, s, b = mx.quantize(w, group_size=d.group_size, bits=d.bits)
    d.update({"weight": wq, "scales": s.astype(d["scales"].dtype), "biases": b.astype(d["biases"].dtype)})
    patched_new = _logits(model, 1)
    patch.unpatch(model)
    _assert_close(patched_new, _logits(model, 1), tol=0.05)


def test_compiled_moe_block(monkeypatch):
    """With compile on, the MoE block around a TunedSwitchGLU (router, experts, weighted sum)
    replays one compiled graph for decode-sized calls, runs mlx-lm's code for larger ones, and
    gives stock's logits either way; unpatch and bench-model's stock variant get mlx-lm's
    modules back, untouched."""
    from mlx_lm.models.qwen3_moe import Qwen3MoeSparseMoeBlock

    from mlx_moe_tune.bench_model import Variants

    ops_ = _TraceableOps()
    monkeypatch.setattr(patch, "_ops", lambda: ops_)
    monkeypatch.setattr(patch, "_traceable", lambda backend: True)
    model = _model("qwen3_moe", layers=2)
    big = patch.COMPILE_MAX_TOKENS + 8
    ref = {L: _logits(model, L) for L in (1, 4, big)}
    stock_blocks = [layer.mlp for layer in model.layers]
    variants = Variants(model, fuse=False)
    blocks = [layer.mlp for layer in model.layers]
    assert all(type(b).__name__ == "CompiledQwen3MoeSparseMoeBlock" and isinstance(b, Qwen3MoeSparseMoeBlock)
               for b in blocks)
    assert all(type(b.switch_mlp) is patch.TunedSwitchGLU for b in blocks)
    assert all(type(b.switch_mlp) is SwitchGLU for b in stock_blocks)  # the stock blocks are untouched
    for L in (1, 4):
        _assert_close(_logits(model, L), ref[L], tol=1e-5)
    assert all("_mmt_compiled" in b.__dict__ for b in blocks), [getattr(b, "_mmt_compile_error", None) for b in blocks]
    traced = len(ops_.calls)
    _logits(model, 4)
    assert len(ops_.calls) == traced  # replayed: the op is not called from Python again
    _assert_close(_logits(model, big), ref[big], tol=1e-5)
    assert len(ops_.calls) > traced  # a prefill-sized call ran eagerly
    variants.use("stock")
    assert [layer.mlp for layer in model.layers] == stock_blocks
    np.testing.assert_array_equal(_logits(model, 4), ref[4])
    variants.use("patched")
    assert patch.unpatch(model) == 4  # 2 blocks + 2 SwitchGLUs (their projections inside)
    kinds = {type(m) for _, m in model.named_modules()}
    assert Qwen3MoeSparseMoeBlock in kinds and not any(issubclass(k, patch.CompiledMoEBlock) for k in kinds)
    assert patch.TunedSwitchGLU not in kinds
    np.testing.assert_array_equal(_logits(model, 4), ref[4])
