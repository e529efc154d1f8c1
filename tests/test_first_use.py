"""First use of a kernel on a (pretended) real GPU: a failing kernel sends the op to
mx.gather_qmm with one warning, and the verdict is cached on disk (mlx_moe_tune.first_use)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import emulator, first_use, ops
from mlx_moe_tune.backend import Backend


@dataclass(frozen=True)
class FakeGPU(Backend):
    """The emulator pretending to be a GPU backend, with a planted fault in the qmv kernels."""

    fault: str = ""  # "" (none), "wrong" (wrong output) or "raise" (the factory raises)
    calls: list = None  # kernel launches, to see what the first-use check ran

    @property
    def emulated(self) -> bool:
        return False

    def kernel_factory(self):
        def factory(**kw):
            if kw["name"].startswith("mmt_qmv") and self.fault == "raise":
                raise RuntimeError("planted: the Metal compiler rejected the kernel")
            k = emulator.metal_kernel(**kw)

            def call(**c):
                self.calls.append((kw["name"], [v for n, v in c["template"] if n in ("K", "N")]))
                out = k(**c)
                return [o * 0 + 1 for o in out] if self.fault == "wrong" and kw["name"].startswith("mmt_qmv") else out
            return call
        return factory


def _backend(name, fault=""):
    return FakeGPU(name, "metal", 1024, 32 * 1024, fault=fault, calls=[])


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(first_use, "cache_dir", lambda: tmp_path)
    monkeypatch.setenv(first_use.ENV, "1")
    first_use.clear_memo()
    yield
    first_use.clear_memo()


def _decode_call(K=128, N=40, T=3, E=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((E, N, K)).astype(np.float32)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.array(rng.standard_normal((T, 1, 1, K)).astype(np.float32)).astype(mx.bfloat16)
    idx = mx.array(rng.integers(0, E, (T, k)).astype(np.int32))
    stock = mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4)
    return (x, wq, s, b, idx), stock


def _run(args, backend):
    return ops.gather_qmm(*args, group_size=64, bits=4, backend=backend)


@pytest.mark.parametrize("fault", ["wrong", "raise"])
def test_a_failing_kernel_falls_back_to_stock_with_one_warning(fault):
    be = _backend(f"fake-gpu-{fault}", fault)
    args, stock = _decode_call()
    with pytest.warns(first_use.FirstUseWarning) as rec:
        y = _run(args, be)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "qmv" in msg and "first-use check" in msg and "mx.gather_qmm" in msg
    assert ("planted" in msg) if fault == "raise" else ("error" in msg)
    assert y.shape == stock.shape and mx.allclose(y, stock).item()  # the stock result
    launches = len(be.calls)
    # the same kernel at another shape: no second warning, no second check
    args2, stock2 = _decode_call(K=192, N=24, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", first_use.FirstUseWarning)
        y2 = _run(args2, be)
    assert mx.allclose(y2, stock2).item() and len(be.calls) == launches
    (r,) = first_use.records()
    assert not r["ok"] and r["kernel"] == "qmv" and r["dtype"] == "bfloat16" and r["bits"] == 4


def test_the_verdict_is_read_from_disk_the_second_time():
    be = _backend("fake-gpu-ok")
    args, stock = _decode_call()
    with warnings.catch_warnings():
        warnings.simplefilter("error", first_use.FirstUseWarning)
        y = _run(args, be)
    a, ref = np.array(y.astype(mx.float32)), np.array(stock.astype(mx.float32))
    assert np.abs(a - ref).max() / np.abs(ref).max() < 3e-2  # our kernel ran (bf16 rounding apart)
    tiny = [c for c in be.calls if c[1] != [128, 40]]
    assert len(tiny) == 1  # the check ran once, on its tiny problem; then the call itself
    (r,) = first_use.records()
    assert r["ok"] and r["mlx"] == mx.__version__ and r["source"] and r["device"].startswith("fake-gpu-ok")
    # a new process (memo cleared, specs forgotten): the disk verdict, no tiny run
    first_use.clear_memo()
    ops._SPECS.clear()
    n = len(be.calls)
    _run(args, be)
    assert len(be.calls) == n + 1  # the call only


def test_emulator_backends_skip_the_check():
    args, _ = _decode_call()
    ops.gather_qmm(*args, group_size=64, bits=4, backend="emulator-metal")
    assert first_use.records() == []


def test_selftest_prints_the_cache(capsys):
    from mlx_moe_tune.cli import main

    be = _backend("fake-gpu-cli", "wrong")
    args, _ = _decode_call()
    with pytest.warns(first_use.FirstUseWarning):
        _run(args, be)
    assert main(["selftest", "--cache"]) == 0
    out = capsys.readouterr().out
    assert "first-use verdicts" in out and "FAIL" in out and "fake-gpu-cli" in out and "qmv" in out


def test_first_met_inside_mx_compile_records_no_verdict(monkeypatch):
    """Where MLX refuses an eval inside a trace, the check waits for a call outside one (a
    verdict recorded there would disable a good kernel for good)."""
    from mlx_moe_tune import selftest
    from mlx_moe_tune.kernels import registry
    from mlx_moe_tune.kernels.family import Problem

    be = _backend("fake-gpu-trace")
    fam = registry.get("qmv")
    problem = Problem(experts=4, k=128, n=40, rows=6, bits=4, group_size=64, dtype="bfloat16", m=1.5)
    cfg = fam.valid_configs(problem, be)[0]
    real = selftest.build_inputs

    def refuse(case, seed=0):
        raise RuntimeError("[eval] Attempting to eval an array during function transformations like "
                           "compile or vmap is not allowed.")

    monkeypatch.setattr(selftest, "build_inputs", refuse)
    rec = first_use.check(fam, problem, cfg, be, 2)
    assert rec["ok"] and "not checked inside a trace" in rec["message"]
    assert first_use.records() == []
    monkeypatch.setattr(selftest, "build_inputs", real)
    assert first_use.check(fam, problem, cfg, be, 2)["ok"]  # outside the trace: checked, recorded
    assert len(first_use.records()) == 1
