"""Tuning tables: schema round trip, atomic write, lookup order, nearest m bucket, heuristic."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mlx_moe_tune import tables
from mlx_moe_tune.backend import EMULATOR_CUDA, EMULATOR_METAL, Backend
from mlx_moe_tune.kernels.family import Problem


def make_table(family="qmm", tag=1, *, E=8, K=256, N=128, backend="emulator-cuda", device="cpu", ms=(1, 4, 16)):
    return tables.Table(
        backend=backend, device=device, mode="affine", bits=4, group_size=64, dtype="bfloat16",
        E=E, K=K, N=N, mlx_version="0.32.4",
        buckets=[tables.Bucket(m=m, family=family, config={"BM": m, "BN": 32, "TAG": tag}, gbps=100.0 * m,
                               time_us=10.0, stock_gbps=50.0, speedup=2.0 * m) for m in ms],
        meta={"router": "balanced"},
    )


def problem(E=8, K=256, N=128, m=None, rows=64):
    return Problem(experts=E, k=K, n=N, rows=rows, bits=4, group_size=64, mode="affine", dtype="bfloat16", m=m)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    monkeypatch.setattr(tables, "SHIPPED_DIR", shipped)
    monkeypatch.setenv(tables.ENV_VAR, str(user))
    tables.clear_cache()
    yield user, shipped
    tables.clear_cache()


def test_round_trip_and_file_name(tmp_path):
    t = make_table(device="NVIDIA H100 80GB HBM3", backend="cuda", E=128, K=2816, N=1408)
    path = tables.write_table(t, tmp_path)
    assert path.name == ("E=128,K=2816,N=1408,device=NVIDIA_H100_80GB_HBM3,backend=cuda,"
                         "mode=affine,bits=4,gs=64,dtype=bfloat16.json")
    data = json.loads(path.read_text())
    assert data["schema"] == tables.SCHEMA and data["version"] == tables.VERSION
    assert data["key"]["device"] == "NVIDIA H100 80GB HBM3"
    assert [b["m"] for b in data["buckets"]] == [1, 4, 16]
    assert data["buckets"][1]["config_id"] == "BM4_BN32_TAG1"
    back = tables.read_table(path)
    assert back.to_json() == t.to_json()
    assert back.key == t.key


def test_reader_rejects_other_schema_and_version(tmp_path):
    data = make_table().to_json()
    p = tmp_path / "a.json"
    p.write_text(json.dumps(dict(data, version=99)))
    with pytest.raises(ValueError, match="version"):
        tables.read_table(p)
    p.write_text(json.dumps(dict(data, schema="something-else")))
    with pytest.raises(ValueError, match="not a tuning table"):
        tables.read_table(p)
    bad_key = dict(data, key={k: v for k, v in data["key"].items() if k != "N"})
    p.write_text(json.dumps(bad_key))
    with pytest.raises(ValueError, match="lacks"):
        tables.read_table(p)


def test_write_is_atomic(tmp_path, monkeypatch):
    """A crash mid-write leaves the previous table intact and no temp file behind."""
    t1 = make_table(tag=1)
    path = tables.write_table(t1, tmp_path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tables.json, "dump", boom)
    with pytest.raises(OSError):
        tables.write_table(make_table(tag=2), tmp_path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    # and os.replace is what publishes it: the file is never opened for writing in place
    monkeypatch.undo()
    replaced = []
    real = os.replace
    monkeypatch.setattr(tables.os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b)))
    tables.write_table(make_table(tag=3), tmp_path)
    assert replaced and Path(replaced[0][1]) == path and Path(replaced[0][0]).parent == tmp_path
    assert tables.read_table(path).buckets[0].config["TAG"] == 3


@pytest.mark.parametrize(
    "m, want",
    [(1, 1), (1.4, 1), (2, 1), (2.1, 4), (3, 4), (4, 4), (7, 4), (8, 4), (9, 16), (100, 16), (0.2, 1)],
)
def test_nearest_m_bucket_log2(m, want):
    # buckets 1, 4, 16: m=2 (and m=8) is equally far (log2) from its neighbours: the smaller wins
    t = make_table(ms=(16, 1, 4))
    assert t.bucket(m).m == want
    # brute force: nearest in log2, ties to the smaller m
    lm = math.log2(max(m, 1e-9))
    best = min((1, 4, 16), key=lambda b: (abs(math.log2(b) - lm), b))
    assert best == want


def test_lookup_order_user_then_shipped_then_heuristic(dirs, monkeypatch):
    user, shipped = dirs
    p = problem(m=4)
    calls = []
    monkeypatch.setattr(tables, "heuristic", lambda *a, **k: calls.append(1) or tables.Choice("rule", None, "heuristic:rule"))
    # nothing anywhere: the heuristic answers
    assert tables.lookup(p, EMULATOR_CUDA) == ("rule", None)
    assert calls == [1]
    # shipped only
    tables.write_table(make_table("shipped_fam", 2), shipped)
    tables.clear_cache()
    c = tables.choose(p, EMULATOR_CUDA)
    assert (c.family, c.config["TAG"], c.source) == ("shipped_fam", 2, "shipped")
    # user beats shipped
    tables.write_table(make_table("user_fam", 3), user)
    tables.clear_cache()
    c = tables.choose(p, EMULATOR_CUDA)
    assert (c.family, c.config["TAG"], c.source) == ("user_fam", 3, "user")
    # an explicit directory beats the environment variable
    other = user.parent / "other"
    tables.write_table(make_table("arg_fam", 4), other)
    assert tables.lookup(p, EMULATOR_CUDA, table_dir=other)[0] == "arg_fam"
    # another backend or shape does not match the user's table
    assert tables.choose(p, EMULATOR_METAL).source == "heuristic:rule"
    assert tables.choose(problem(N=96, m=4), EMULATOR_CUDA).source == "heuristic:rule"
    assert tables.lookup(problem(N=96, m=4), EMULATOR_CUDA, heuristic_fallback=False) is None


def test_lookup_memo_follows_env_and_clear(dirs):
    """A memoized choice is not stale: another $MLX_MOE_TUNE_TABLES or a written table is seen."""
    user, shipped = dirs
    tables.write_table(make_table("a"), user)
    assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "a"
    other = user.parent / "other"
    tables.write_table(make_table("b"), other)  # write_table clears the memo
    os.environ[tables.ENV_VAR] = str(other)
    try:
        assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "b"
    finally:
        os.environ[tables.ENV_VAR] = str(user)
    tables.write_table(make_table("c"), user)
    assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "c"


def test_lookup_is_cached_no_io_after_first(dirs, monkeypatch):
    user, _ = dirs
    tables.write_table(make_table("qmm", 1), user)
    tables.clear_cache()
    p = problem(m=1)
    assert tables.lookup(p, EMULATOR_CUDA)[0] == "qmm"
    opened = []
    monkeypatch.setattr(tables, "read_table", lambda path: opened.append(path))
    for name in ("glob", "exists", "is_dir", "resolve", "stat", "open"):
        monkeypatch.setattr(Path, name, lambda self, *a, _n=name, **k: opened.append((_n, self)))
    monkeypatch.setattr(tables.os, "stat", lambda *a, **k: opened.append(("os.stat", a)))
    for m in (1, 2, 4, 16, 64):
        assert tables.lookup(problem(m=m), EMULATOR_CUDA)[0] == "qmm"
    assert opened == []


def test_lookup_prefers_matching_mlx_version(dirs):
    """Two tables for one key (e.g. a user kept an old one under another name): the one measured
    with the running MLX wins; a table from another MLX version still beats the heuristic."""
    user, _ = dirs
    old = make_table("old", 1)
    old.mlx_version = "0.0.1"
    p = tables.write_table(old, user)
    p.rename(user / "kept-from-an-older-mlx.json")
    tables.clear_cache()
    assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "old"
    cur = make_table("cur", 2)
    cur.mlx_version = tables.mlx_version()
    tables.write_table(cur, user)
    tables.clear_cache()
    assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "cur"


def test_broken_user_table_is_skipped(dirs):
    user, shipped = dirs
    user.mkdir(parents=True)
    (user / "E=8,broken.json").write_text("{not json")
    tables.write_table(make_table("shipped_fam"), shipped)
    tables.clear_cache()
    assert tables.lookup(problem(m=1), EMULATOR_CUDA)[0] == "shipped_fam"
    errs = [e for t, e in tables.load_dir(user) if e]
    assert len(errs) == 1 and "broken" in errs[0]


@pytest.mark.parametrize(
    "rows, top_k, E, m, want",
    [
        (8, 8, 128, None, 1.0),  # decode: one token, 8 distinct experts
        (128 * 64, 8, 128, None, 64.0),  # 1024 tokens: every expert active, 64 rows each
        (64, None, 8, None, 8.0),  # no top_k: rows / min(E, rows)
        (64, 8, 128, 3.0, 3.0),  # the caller knows m
    ],
)
def test_estimate_m_from_shapes(rows, top_k, E, m, want):
    p = Problem(experts=E, k=64, n=64, rows=rows, m=m)
    assert tables.estimate_m(p, top_k) == pytest.approx(want, rel=1e-3)


def test_estimate_m_matches_uniform_routing_on_average():
    """The expected-active-experts formula agrees with simulated uniform top-k routing."""
    import numpy as np

    rng = np.random.default_rng(0)
    E, k = 128, 8
    for T in (2, 16, 64):
        active = np.mean([len(np.unique(np.concatenate([rng.choice(E, k, replace=False) for _ in range(T)])))
                          for _ in range(200)])
        est = tables.estimate_m(Problem(experts=E, k=64, n=64, rows=T * k), top_k=k)
        assert est == pytest.approx(T * k / active, rel=0.03)


class FakeFamily:
    """Just enough of KernelFamily for the heuristic: a check and a tile space."""

    def __init__(self, name, space, need_div=True):
        self.name, self.space, self.need_div = name, space, need_div

    def check(self, problem, config, backend):
        if self.need_div and problem.n % config["BN"]:
            return f"N={problem.n} not a multiple of BN={config['BN']}"
        return None

    def valid_configs(self, problem, backend):
        import itertools

        keys = list(self.space)
        cs = [dict(zip(keys, v)) for v in itertools.product(*self.space.values())]
        return [c for c in cs if self.check(problem, c, backend) is None]


def test_heuristic_nearest_shape_then_rule(dirs, monkeypatch):
    user, shipped = dirs
    fams = {"qmm": FakeFamily("qmm", {"BM": (1, 4, 16, 64), "BN": (32, 64), "BK": (32, 64)}),
            "qmv": FakeFamily("qmv", {"BN": (8, 16)})}
    monkeypatch.setattr(tables, "_families", lambda: fams)
    near = make_table("qmm", 7, K=512, N=256)  # nearest in K,N to (K=512, N=192)
    far = make_table("qmm", 9, K=4096, N=4096)
    for t in (near, far):
        for b in t.buckets:
            b.config = {"BM": b.m, "BN": 64, "BK": 64, "TAG": t.buckets[0].config["TAG"]}
    tables.write_table(near, shipped)
    tables.write_table(far, shipped)
    tables.clear_cache()
    c = tables.choose(problem(K=512, N=192, m=4), EMULATOR_CUDA)
    assert c.source == "heuristic:nearest-shape" and c.config["TAG"] == 7 and c.config["BM"] == 4
    # N=160 is not a multiple of the borrowed BN=64 in either table: the rule picks a valid one
    c = tables.choose(problem(K=512, N=160, m=16), EMULATOR_CUDA)
    assert c.source == "heuristic:rule" and c.family == "qmm"
    assert 160 % c.config["BN"] == 0 and c.config["BM"] == 16
    # small m: the no-reuse family
    c = tables.choose(problem(K=512, N=160, m=1), EMULATOR_CUDA)
    assert c.source == "heuristic:rule" and c.family == "qmv"
    # another device of the same backend is borrowed from only after this device's tables
    monkeypatch.setattr(tables, "device_name", lambda b: "other-gpu")
    tables.clear_cache()  # choices are memoized: the device does not change in a real process
    c = tables.choose(problem(K=512, N=192, m=4), EMULATOR_CUDA)
    assert c.source == "heuristic:other-device" and c.config["TAG"] == 7


def test_rule_without_families_is_none(monkeypatch):
    monkeypatch.setattr(tables, "_families", lambda: {})
    assert tables.rule(problem(m=1), EMULATOR_CUDA) is None


def test_shipped_tables_are_valid():
    """Every table shipped in the package parses, and its key matches its file name."""
    for t, err in tables.load_dir(Path(tables.__file__).parent / "tables"):
        assert err is None, err
        assert t.path.name == t.filename
        assert t.buckets and all(b.gbps and b.gbps > 0 for b in t.buckets)


@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_rule_is_the_ops_default_when_valid(m):
    """With no table anywhere, the rule is what the op itself would run (measured defaults)."""
    from mlx_moe_tune import ops

    p = problem(E=8, K=256, N=128, m=m, rows=8 * m)
    c = tables.rule(p, EMULATOR_CUDA, m=m)
    import dataclasses

    want = ops.default_choice(dataclasses.replace(p, m=float(m)), True)
    assert (c.family, c.config) == (want[0], dict(want[1]))
    assert c.source == "heuristic:rule"


def test_shipped_h100_tables_cover_the_issue_shapes_with_valid_configs():
    """gemma-26b-a4b (N=1408, 704) and qwen3-30b-a3b (gate/up, down), affine 4-bit gs64 bf16,
    every m bucket 1..64, each chosen config valid for its family on a CUDA-dialect backend."""
    from mlx_moe_tune.kernels import registry

    shipped = [t for t, _ in tables.load_dir(tables.SHIPPED_DIR) if t is not None and t.backend == "cuda"]
    got = {(t.E, t.K, t.N) for t in shipped if t.device == "NVIDIA H100 80GB HBM3"}
    assert {(128, 2816, 1408), (128, 2816, 704), (128, 2048, 768), (128, 768, 2048)} <= got
    for t in shipped:
        assert (t.mode, t.bits, t.group_size, t.dtype) == ("affine", 4, 64, "bfloat16")
        assert [b.m for b in t.buckets] == [1, 2, 4, 8, 16, 32, 64]
        for b in t.buckets:
            p = Problem(experts=t.E, k=t.K, n=t.N, rows=b.m * t.E, bits=4, group_size=64, dtype="bfloat16",
                        m=float(b.m))
            assert registry.get(b.family).check(p, b.config, EMULATOR_CUDA) is None, (t.filename, b)
            assert b.speedup and b.speedup > 1 and b.stock_gbps


@pytest.mark.gpu
def test_op_picks_the_shipped_table_on_its_device(monkeypatch, tmp_path):
    import mlx.core as mx
    from mlx_moe_tune import ops
    from mlx_moe_tune.backend import get_backend, gpu_backend

    monkeypatch.setenv("MLX_MOE_TUNE_TABLES", str(tmp_path / "no-user-tables"))
    b = get_backend(gpu_backend())
    key = (128, 2816, 1408)
    dev = tables.device_name(b.name)  # tables of several devices ship side by side (H100, H200)
    (t,) = [t for t, _ in tables.load_dir(tables.SHIPPED_DIR) if t is not None and (t.E, t.K, t.N) == key
            and t.backend == b.name and t.device == dev] or [None]
    if t is None:
        pytest.skip(f"no shipped table for {dev}")
    w = mx.zeros((128, 1408, 2816 // 8), mx.uint32)
    s = mx.zeros((128, 1408, 44), mx.bfloat16)
    for m in (1, 16, 64):
        T = m * 128 // 8
        x = mx.zeros((T, 1, 1, 2816), mx.bfloat16)
        idx = (mx.arange(T * 8, dtype=mx.int32) % 128).reshape(T, 8)
        d = ops.describe(x, w, s, s, idx, group_size=64, bits=4, m=float(m))
        bk = t.bucket(m)
        assert d == dict(family=bk.family, config=bk.to_json()["config_id"], source="table")


def test_shipped_cuda_picks_fit_the_fused_kernel():
    """The fused SwiGLU op takes a table's single-set tile (ops._fit_glu): for every shipped CUDA
    bucket that tile, or the one with the N tile halved, is a valid qmm_glu / qmv_glu config.
    Halved: the BM64 FN2 picks (two accumulator sets: 128 floats per lane; before _fit_glu the
    fused op raised on them) and, since the W-in-flight check, FN2 KU2 (ptxas: 124-636 B of
    spills in the fused kernel)."""
    from mlx_moe_tune import ops
    from mlx_moe_tune.kernels import registry

    halved = []
    for t, _ in tables.load_dir(tables.SHIPPED_DIR):
        if t is None or t.backend != "cuda":
            continue
        for b in t.buckets:
            p = Problem(experts=t.E, k=t.K, n=t.N, rows=b.m * t.E, bits=4, group_size=64, dtype="bfloat16",
                        m=float(b.m))
            glu = registry.get(b.family + "_glu")
            fit = ops._fit_glu(glu, p, dict(b.config), EMULATOR_CUDA)
            assert glu.check(p, fit, EMULATOR_CUDA) is None, (t.filename, b.m, b.config)
            if fit != b.config:
                assert fit == {**b.config, "FN": 1}, (t.filename, b.m, b.config, fit)
                halved.append((t.device, t.N, b.m))
    assert ("NVIDIA H200", 704, 32) in halved and ("NVIDIA H200", 1408, 64) in halved


def test_fused_op_takes_a_table_pick_that_spills_as_the_halved_tile(dirs):
    """A table whose m=32 pick is BM32 FN2 KU2 (valid for qmm, not for qmm_glu): the fused op runs
    BM32 FN1 KU2 from the table instead of raising."""
    import mlx.core as mx

    from mlx_moe_tune import ops

    user, _ = dirs
    cfg = {"BM": 32, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}
    t = tables.Table(backend="emulator-cuda", device=tables.device_name("emulator-cuda"), mode="affine", bits=4,
                     group_size=64, dtype="bfloat16", E=8, K=256, N=128, mlx_version="0.32.4",
                     buckets=[tables.Bucket(m=32, family="qmm", config=cfg, gbps=1.0)])
    tables.write_table(t, user)
    T = 32 * 8 // 2
    x = mx.zeros((T, 1, 1, 256), mx.bfloat16)
    idx = (mx.arange(T * 2, dtype=mx.int32) % 8).reshape(T, 2)
    w, s = mx.zeros((8, 128, 256 // 8), mx.uint32), mx.zeros((8, 128, 4), mx.bfloat16)
    single = ops.describe(x, w, s, s, idx, backend="emulator-cuda", m=32.0)
    fused = ops.describe(x, w, s, s, idx, backend="emulator-cuda", m=32.0, w_up=(w, s, s))
    assert single == dict(family="qmm", config="BM32_FN2_WN4_WK1_MC4_KU2_PF0_WS0", source="table")
    assert fused == dict(family="qmm_glu", config="BM32_FN1_WN4_WK1_MC4_KU2_PF0_WS0", source="table")
