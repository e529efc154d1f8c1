"""The one-launch routing plan kernel (cuda/plan.cu, metal/plan.metal) on both emulators in
check mode (races, out-of-bounds, divergent barriers) against numpy, and the op's output with it
against the op with MLX's argsort plan."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import ops
from mlx_moe_tune.backend import EMULATOR_CUDA, EMULATOR_METAL
from mlx_moe_tune.kernels import plan as kplan

pytest.importorskip("mlx_moe_tune.emulator")
BACKENDS = [EMULATOR_CUDA, EMULATOR_METAL]


def _check_plan(ids: np.ndarray, E: int, pl) -> None:
    order, off = np.asarray(pl.order), np.asarray(pl.offsets)
    valid = ids[(ids >= 0) & (ids < E)]
    want = np.concatenate([[0], np.cumsum(np.bincount(valid, minlength=E))])
    np.testing.assert_array_equal(off, want)
    assert np.array_equal(np.sort(order), np.arange(ids.size)), "order is not a permutation"
    for e in range(E):
        assert (ids[order[off[e]:off[e + 1]]] == e).all(), f"expert {e}'s rows hold other pairs"
    assert ((ids[order[off[E]:]] < 0) | (ids[order[off[E]:]] >= E)).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("P,E,bad", [(1, 1, False), (37, 8, True), (2500, 40, True), (300, 100, False)])
def test_plan_kernel_matches_numpy(monkeypatch, backend, P, E, bad):
    # check mode: every access of the kernel is bounds- and race-checked
    monkeypatch.setenv("MLX_MOE_TUNE_EMULATOR_CHECK", "1")
    rng = np.random.default_rng(P + E)
    ids = rng.integers(0, E, P).astype(np.int32)
    if bad:
        ids[[0, P // 2, P - 1]] = [-3, E, E + 7]  # out of range: a bucket after offsets[E]
    if E > 1:
        ids[ids == 1] = 0  # an expert with no rows
    _check_plan(ids, E, kplan.kernel_plan(mx.array(ids), E, backend))


def test_plan_kernel_limits_and_default():
    with pytest.raises(ValueError, match="experts"):
        kplan.kernel_plan(mx.zeros((4,), mx.int32), kplan.PLAN_MAX_EXPERTS + 1, EMULATOR_CUDA)
    # on the emulator the op keeps MLX's argsort plan unless asked (a kernel costs a compile)
    assert not kplan._use_kernel(64, 8, EMULATOR_CUDA)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_op_output_identical_with_kernel_plan(backend):
    E, K, N, T, k = 8, 128, 64, 24, 2
    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((E, N, K)).astype(np.float32)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.array(rng.standard_normal((T, 1, 1, K)).astype(np.float32)).astype(mx.bfloat16)
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    common = dict(group_size=64, bits=4, backend=backend, family="qmm")
    y_sort = ops.gather_qmm(x, wq, s, b, idx, **common, plan=kplan.make_plan(idx, E, kernel=False))
    y_kern = ops.gather_qmm(x, wq, s, b, idx, **common, plan=kplan.make_plan(idx, E, kernel=True, backend=backend))
    assert mx.array_equal(y_sort, y_kern).item()
    ref = mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4)
    yk, yr = np.asarray(y_kern.astype(mx.float32)), np.asarray(ref.astype(mx.float32))
    assert np.abs(yk - yr).max() <= 3e-2 * np.abs(yr).max()  # the tuner's bfloat16 tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("P,E", [(8, 128), (2048, 128), (65536, 128), (5000, 4096)])
def test_plan_kernel_on_gpu(P, E):
    from mlx_moe_tune.backend import gpu_backend

    ids = np.random.default_rng(P).integers(0, E, P).astype(np.int32)
    ids[0] = E + 1
    _check_plan(ids, E, kplan.kernel_plan(mx.array(ids), E, gpu_backend()))


@pytest.mark.gpu
def test_op_default_plan_on_gpu_is_the_kernel_and_matches_argsort():
    from mlx_moe_tune.backend import gpu_backend

    b = gpu_backend()
    E, K, N, T, k = 128, 512, 256, 512, 8
    assert kplan._use_kernel(T * k, E, b)
    rng = np.random.default_rng(1)
    wq, s, bb = mx.quantize(mx.array(rng.standard_normal((E, N, K)).astype(np.float32)).astype(mx.bfloat16), 64, 4)
    x = mx.array(rng.standard_normal((T, 1, 1, K)).astype(np.float32)).astype(mx.bfloat16)
    idx = mx.array(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32))
    y = ops.gather_qmm(x, wq, s, bb, idx, group_size=64, bits=4, family="qmm")  # plan kernel inside
    y_sort = ops.gather_qmm(x, wq, s, bb, idx, group_size=64, bits=4, family="qmm",
                            plan=kplan.make_plan(idx, E, kernel=False))
    assert mx.array_equal(y, y_sort).item()
