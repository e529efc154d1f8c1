"""Every config of the shipped Metal search space vs the numpy reference, on the emulator in
check mode (out-of-bounds accesses and threadgroup races fail the run).

Shapes are ragged on purpose (see mlx_moe_tune/selftest.py: N=72 is no multiple of any BN,
experts with 0, 1 and more-than-BM rows, K of a single group, the per-token decode layout).
The comparison and the reference (H-formats' numpy `reference_gather_qmm`) are the selftest's,
so CI and `mlx-moe-tune selftest` check exactly the same thing.
"""
from __future__ import annotations

import dataclasses

import pytest

from mlx_moe_tune import selftest
from mlx_moe_tune.backend import EMULATOR_METAL
from mlx_moe_tune.emulator import EmulatorCheckError

FAMILY_NAMES = ("qmv", "qmv_glu", "qmm", "qmm_glu", "qmm.sorted", "qmm_glu.sorted")
CASES = {c.name: c for c in selftest.default_cases()}


@pytest.fixture(scope="module")
def families():
    fams = {f.label: f for f in selftest.shipped_families("metal")}
    missing = [n for n in FAMILY_NAMES if n not in fams]
    assert not missing, f"families without a Metal source: {missing}"
    return fams


def _assert_all_pass(results, expected: int):
    assert len(results) == expected
    failures = [selftest.format_row(r) for r in results if not r.ok]
    assert not failures, "\n".join(failures)


JOBS = selftest.default_jobs(EMULATOR_METAL)  # one compile per config: use every core


def test_every_shipped_config_on_ragged_shape(families):
    case = CASES["ragged"]
    fams = [families[n] for n in FAMILY_NAMES]
    expected = {}
    for fam in fams:
        configs = fam.valid_configs(case.problem(), EMULATOR_METAL)
        # the validator must leave a real search space, not one or two survivors (qmv_glu: its
        # doubled accumulators rule out the largest register tiles)
        assert len(configs) >= (8 if fam.name == "qmv_glu" else 12), (fam.label, [selftest.config_id(c) for c in configs])
        expected[fam.label] = len(configs)
    results = selftest.selftest(fams, EMULATOR_METAL, [case], check=True, jobs=JOBS)
    assert {n: sum(r.family == n for r in results) for n in expected} == expected
    _assert_all_pass(results, sum(expected.values()))


def test_formats_and_layouts(families):
    """bits 2/4/8 x group size x dtype at K = one group, and the decode layout (X_DIV = 2,
    inputs small enough to become `constant` buffers)."""
    cases = [c for c in CASES.values() if c.name != "ragged"]
    fams = [families[n] for n in FAMILY_NAMES]
    results = selftest.selftest(fams, EMULATOR_METAL, cases, check=True, jobs=JOBS)
    expected = sum(len(selftest.select_configs(f, EMULATOR_METAL, c)) for f in fams for c in cases)
    assert expected >= len(fams) * len(cases)
    assert {r.case for r in results} == {c.name for c in cases}
    _assert_all_pass(results, expected)


def test_wrong_layout_is_caught(families):
    """The comparison is not vacuous: reading x with the wrong row map must fail."""
    case = CASES["decode"]
    inputs = selftest.build_inputs(case)
    wrong = dataclasses.replace(case, x_div=1)  # x has P/2 rows, the kernel now reads P rows
    fam = families["qmv"]
    cfg = selftest.select_configs(fam, EMULATOR_METAL, wrong)[0]
    # check mode flags the read past x's last row, naming the buffer
    with pytest.raises(EmulatorCheckError, match="out-of-bounds read of buffer 'x'"):
        selftest.run_config(fam, EMULATOR_METAL, wrong, cfg, inputs, check=True)
    # the converse stays in bounds (x has P rows, the kernel reads rows p / 2) but is wrong:
    # the comparison with the reference must say so
    per_pair = selftest.build_inputs(wrong)
    err, _ = selftest.run_config(fam, EMULATOR_METAL, case, cfg, per_pair, check=True)
    assert err > selftest.TOLERANCE[case.dtype]


@pytest.mark.parametrize("layout", ["decode", "sorted"])
def test_op_runs_the_metal_kernels(layout):
    """`mlx_moe_tune.gather_qmm` / `gather_qmm_glu` on the Metal dialect (emulated), with no
    tuning table: Metal's own default tiles, both mlx-lm call layouts, vs the numpy reference."""
    import mlx.core as mx
    import numpy as np

    from mlx_moe_tune import formats, ops

    E, K, N, gs, bits = 4, 128, 40, 64, 4
    rng = np.random.default_rng(1)
    wq, s, b = (mx.array(a) for a in formats.quantize(rng.standard_normal((E, N, K)).astype(np.float32),
                                                      group_size=gs, bits=bits))
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    if layout == "decode":  # mlx-lm unsorted: x (B, L, 1, 1, K) with (B, L, k): qmv
        T, k = 3, 2
        idx = mx.array(rng.integers(0, E, (1, T, k)).astype(np.uint32))
        x = mx.array(rng.standard_normal((1, T, 1, 1, K)).astype(np.float32)).astype(mx.bfloat16)
        x_rows = np.repeat(np.asarray(x.astype(mx.float32)).reshape(T, K), k, axis=0)
        sorted_indices = False
    else:  # mlx-lm's sorted layout: (P, 1, K) with sorted (P,), several rows per expert: qmm
        P = 40
        idx = mx.array(np.sort(rng.integers(0, E, P)).astype(np.uint32))
        x = mx.array(rng.standard_normal((P, 1, K)).astype(np.float32)).astype(mx.bfloat16)
        x_rows = np.asarray(x.astype(mx.float32)).reshape(P, K)
        sorted_indices = True
    flat = np.asarray(idx).reshape(-1)
    ref = formats.reference_gather_qmm(x_rows, np.asarray(wq), np.asarray(s.astype(mx.float32)),
                                       np.asarray(b.astype(mx.float32)), flat, group_size=gs, bits=bits)
    y = ops.gather_qmm(x, wq, s, b, idx, group_size=gs, bits=bits, sorted_indices=sorted_indices,
                       backend="emulator-metal")
    assert y.shape == (*idx.shape, 1, N)
    got = np.asarray(y.astype(mx.float32)).reshape(-1, N)
    assert np.abs(got - ref).max() <= selftest.TOLERANCE["bfloat16"] * np.abs(ref).max()
    d = ops.describe(x, wq, s, b, idx, group_size=gs, bits=bits, sorted_indices=sorted_indices,
                     backend="emulator-metal", w_up=(wq, s, b))
    assert d["family"] == ("qmv_glu" if layout == "decode" else "")  # fused decode / two calls
    yg = ops.gather_qmm_glu(x, wq, s, b, wq, s, b, idx, group_size=gs, bits=bits,
                            sorted_indices=sorted_indices, backend="emulator-metal")
    ref_glu = ref / (1 + np.exp(-ref)) * ref
    got = np.asarray(yg.astype(mx.float32)).reshape(-1, N)
    assert np.abs(got - ref_glu).max() <= selftest.TOLERANCE["bfloat16"] * np.abs(ref_glu).max()
