"""The Metal tile validator and launch rules (pure Python, no compile)."""
from __future__ import annotations

import itertools
import re

import pytest

from mlx_moe_tune.backend import EMULATOR_METAL, METAL, Backend
from mlx_moe_tune.kernels import metal_tiles as mt
from mlx_moe_tune.kernels.family import Problem
from mlx_moe_tune.sources import read_source

PROBLEM = Problem(experts=128, k=2816, n=1408, rows=128 * 8, bits=4, group_size=64, dtype="bfloat16")


def configs(space):
    return [dict(zip(space, v)) for v in itertools.product(*space.values())]


def qmm(**kw):
    return {"BM": 16, "BN": 32, "BK": 32, "WM": 1, "WN": 2, **kw}


def qmv(**kw):
    return {"RPS": 4, "SG": 2, "VPT": 8, "PR": 1, **kw}


def _declared_threadgroup_bytes(body: str, problem: Problem, config: dict) -> int:
    """Sum of the `threadgroup` arrays a Metal body declares, evaluated for this config:
    the validator's formula is checked against the source, not against itself."""
    tb = mt.dtype_bytes(problem.dtype)
    env = dict(config, T=None)
    total = 0
    for typ, expr in re.findall(r"^threadgroup (\w+) \w+\[(.+)\];", body, flags=re.M):
        size = eval(expr.replace("sizeof(T)", str(tb)).replace("/", "//"), {}, env)  # noqa: S307
        total += size * (tb if typ == "T" else 4)
    return total


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("body,glu", [("metal/qmm.metal", False), ("metal/qmm_glu.metal", True)])
def test_threadgroup_bytes_match_the_source(body, glu, dtype):
    src = read_source(body)
    problem = Problem(8, 256, 256, 64, dtype=dtype)
    for cfg in configs(mt.QMM_SPACE):
        assert mt.qmm_threadgroup_bytes(problem, cfg, glu) == _declared_threadgroup_bytes(src, problem, cfg)


def test_apple_limits():
    # 32 KB of threadgroup memory: float32 GLU with 32x64x64 tiles needs ~43 KB
    big = qmm(BM=32, BN=64, BK=64, WM=2, WN=2)
    f32 = Problem(8, 256, 256, 64, dtype="float32")
    assert "threadgroup memory" in mt.check_qmm_glu(f32, big, METAL)
    assert mt.check_qmm(f32, big, METAL) is None
    # 1024 threads per threadgroup
    assert "threads" in mt.check_qmm(PROBLEM, qmm(BM=64, BN=256, WM=8, WN=8), METAL)
    assert "threads" in mt.check_qmv(PROBLEM, qmv(SG=64), METAL)
    small = Backend("tiny", "metal", max_threads=64, max_shared_bytes=4096)
    assert "threads" in mt.check_qmm(PROBLEM, qmm(WM=2, WN=2), small)
    assert "threadgroup memory" in mt.check_qmm(PROBLEM, qmm(BM=32, BN=64), small)


def test_tile_shape_rules():
    assert "8*WM" in mt.check_qmm(PROBLEM, qmm(BM=8, WM=2), METAL)
    assert "8*WN" in mt.check_qmm(PROBLEM, qmm(BN=32, WN=8), METAL)
    two_bit = Problem(8, 256, 256, 64, bits=2, group_size=32)
    assert "packed word" in mt.check_qmm(two_bit, qmm(BK=8), METAL)
    assert "packed words" in mt.check_qmv(two_bit, qmv(VPT=8), METAL)
    assert mt.check_qmv(two_bit, qmv(VPT=16), METAL) is None
    assert "group size" in mt.check_qmv(Problem(8, 256, 256, 64, group_size=32), qmv(VPT=64), METAL)
    assert "one must divide" in mt.check_qmm(Problem(8, 256, 256, 64, group_size=64), qmm(BK=48), METAL)
    assert "accumulator" in mt.check_qmm_glu(PROBLEM, qmm(BM=64, BN=64, WM=1, WN=2), METAL)


@pytest.mark.parametrize(
    "problem,why",
    [
        (Problem(8, 256, 256, 64, bits=3), "bits"),
        (Problem(8, 256, 256, 64, mode="mxfp4", group_size=32), "affine"),
        (Problem(8, 250, 256, 64), "multiple of the group size"),
        (Problem(8, 256, 256, 64, group_size=16), "group size"),
    ],
)
def test_unsupported_problems_are_rejected(problem, why):
    assert why in mt.check_qmm(problem, qmm(), METAL)
    assert why in mt.check_qmv(problem, qmv(), METAL)


def test_bad_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="dtype"):
        mt.check_qmm(Problem(8, 256, 256, 64, dtype="int8"), qmm(), METAL)


def test_shipped_spaces_are_mostly_valid_on_a_real_shape():
    qmv_glu = lambda p, c, b: mt.check_qmv(p, c, b, glu=True)  # noqa: E731
    for space, check in ((mt.QMV_SPACE, mt.check_qmv), (mt.QMV_SPACE, qmv_glu), (mt.QMM_SPACE, mt.check_qmm),
                         (mt.QMM_SPACE, mt.check_qmm_glu)):
        valid = [c for c in configs(space) if check(PROBLEM, c, EMULATOR_METAL) is None]
        assert len(valid) >= len(configs(space)) // 2


@pytest.mark.parametrize("rows,n", [(1, 8), (7, 72), (1000, 1408), (70000, 704)])
def test_launch_covers_the_problem_with_whole_threadgroups(rows, n):
    p = Problem(16, 512, n, rows)
    for cfg in configs(mt.QMV_SPACE):
        grid, tg = mt.launch_qmv(p, cfg)
        assert tg == (32 * cfg["SG"], 1, 1)
        assert grid[0] % tg[0] == 0 and grid[1] >= 1 and grid[2] == 1
        assert (grid[0] // tg[0]) * cfg["PR"] >= rows > (grid[0] // tg[0] - 1) * cfg["PR"]
        assert grid[1] * cfg["SG"] * cfg["RPS"] >= n > (grid[1] - 1) * cfg["SG"] * cfg["RPS"]
    for cfg in configs(mt.QMM_SPACE):
        grid, tg = mt.launch_qmm(p, cfg)
        assert tg == (32 * cfg["WM"] * cfg["WN"], 1, 1)
        # one row of threadgroups per expert, plus row E that zeroes the rows of bad ids
        assert grid[0] % tg[0] == 0 and grid[1] == p.experts + 1 and grid[2] == 1
        assert (grid[0] // tg[0]) * cfg["BN"] >= n > (grid[0] // tg[0] - 1) * cfg["BN"]
