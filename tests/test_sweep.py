"""Sweep end to end on the CPU: CSV + JSON contents, GB/s arithmetic, resume, failures as data,
and the prepared inputs (`measure.Case`) against the numpy reference of formats.py."""
from __future__ import annotations

import csv
import json
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import measure, sweep
from mlx_moe_tune.cli import main
from mlx_moe_tune.kernels.family import Problem

REQUIRED = ("kernel, config, m, tokens, experts, active_experts, top_k, k, n, mode, bits, group_size, dtype, "
            "router, time_us, time_us_p10, time_us_p90, weight_bytes, gbps, pct_roofline, tflops, status, "
            "backend, device").split(", ")


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(tmp_path, *extra, name="s.csv"):
    out = tmp_path / name
    rc = main(["sweep", "--quiet", "-o", str(out), *extra])
    return rc, out


# --- argument forms -------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("1..6", [1, 2, 3, 4, 5, 6]),
    ("1..64x2", [1, 2, 4, 8, 16, 32, 64]),
    ("1,3,16", [1, 3, 16]),
    ("3..30x3,5", [3, 5, 9, 27]),
    ("16,1,1", [1, 16]),
])
def test_parse_m(text, want):
    assert sweep.parse_m(text) == want


@pytest.mark.parametrize("text", ["0", "5..2", "1..8x1", "a", "1..", ""])
def test_parse_m_rejects(text):
    with pytest.raises(ValueError):
        sweep.parse_m(text)


# --- the tiny sweep end to end ---------------------------------------------------------------


def test_tiny_sweep_csv_json_and_gbps(tmp_path):
    rc, out = _sweep(tmp_path, "--m", "1,4", "--iters", "3")
    assert rc == 0
    rows = _rows(out)
    assert set(REQUIRED) <= set(rows[0])
    # tiny preset: E=8, top-2, K=256, N=128, affine 4-bit gs64 with bf16 scales and biases
    E, top_k, K, N, gs = 8, 2, 256, 128, 64
    expert_bytes = N * K * 4 // 8 + 2 * (N * K // gs) * 2
    kernels = {r["kernel"] for r in rows}
    assert {"stock.gather_qmm", "stock.gather_qmm_unsorted", "stock.quantized_matmul", "ref.bandwidth"} <= kernels
    for r in rows:
        assert int(r["m"]) in (1, 4)
        assert (r["backend"], r["dtype"], r["mode"]) == ("cpu", "bfloat16", "affine")
        if r["status"] != "ok":  # only the bf16 reference may not run here (CPU gather_mm is float32-only)
            assert r["kernel"] == "ref.gather_mm_bf16" and r["status"].startswith("skipped: "), r
            continue
        t, gbps, nbytes = float(r["time_us"]), float(r["gbps"]), int(r["weight_bytes"])
        assert gbps == pytest.approx(nbytes / (t * 1e-6) / 1e9, rel=1e-4)
        assert float(r["time_us_p10"]) <= t <= float(r["time_us_p90"])
        if r["kernel"].startswith("stock.gather_qmm"):
            m = int(r["m"])
            assert int(r["tokens"]) == m * E // top_k
            assert int(r["active_experts"]) == E  # balanced: every expert has m rows
            assert nbytes == E * expert_bytes
            assert float(r["tflops"]) == pytest.approx(2 * m * E * K * N / (t * 1e-6) / 1e12, rel=1e-4)
        if r["kernel"] == "stock.quantized_matmul":
            assert nbytes == expert_bytes
    # pct_roofline: against the better read probe (sum, rowsum) of the same m
    for m in ("1", "4"):
        probe = [float(r["gbps"]) for r in rows if r["kernel"] == "ref.bandwidth" and r["config"] in ("sum", "rowsum")
                 and r["m"] == m]
        assert len(probe) == 2
        for r in rows:
            if r["m"] == m and r["status"] == "ok" and r["kernel"] != "ref.bandwidth":
                assert float(r["pct_roofline"]) == pytest.approx(100 * float(r["gbps"]) / max(probe), rel=1e-3)
        copy = [r for r in rows if r["kernel"] == "ref.bandwidth" and r["config"] == "copy" and r["m"] == m][0]
        assert int(copy["weight_bytes"]) == 2 * measure.CPU_PROBE_BYTES  # read + write
    meta = json.loads(out.with_suffix(".json").read_text())
    for key in ("device_info", "backend", "mlx_version", "package_version", "git_commit", "date", "shape",
                "format", "router", "seed", "cache_defeat", "iters", "points"):
        assert key in meta, key
    assert meta["mlx_version"] == mx.__version__
    assert meta["shape"]["experts"] == E and meta["format"]["group_size"] == gs
    assert "rotate" in meta["points"]["w/m=1"]


def test_default_tiny_sweep_covers_the_m_grid(tmp_path):
    """The README's command on a CPU: the default preset (tiny) over 1..64x2. (How long it
    takes is reported by the sweep's own log, not asserted: no speed targets in unit tests.)"""
    rc, out = _sweep(tmp_path)
    assert rc == 0
    assert sorted({int(r["m"]) for r in _rows(out)}) == [1, 2, 4, 8, 16, 32, 64]


def test_resume_skips_done_rows(tmp_path):
    rc, out = _sweep(tmp_path, "--m", "1,2", "--iters", "2", "--kernels", "stock.gather_qmm,ref.bandwidth")
    first = _rows(out)
    assert rc == 0 and len(first) == 2 * 4  # 2 m x (gather_qmm + probes sum, rowsum, copy)
    # a sweep killed halfway: header and the first rows survive
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    rc, out = _sweep(tmp_path, "--m", "1,2,4", "--iters", "2", "--kernels", "stock.gather_qmm,ref.bandwidth",
                     "--resume")
    rows = _rows(out)
    keys = [(r["kernel"], r["config"], r["m"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * 4
    assert rows[:2] == first[:2]  # kept as they were, not re-measured
    # a CSV with other columns is refused rather than mixed
    other = tmp_path / "other.csv"
    other.write_text("kernel,m,gbps\nx,1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        sweep._read_done(other)
    # nothing left to do: no new rows
    _sweep(tmp_path, "--m", "1,2,4", "--iters", "2", "--kernels", "stock.gather_qmm,ref.bandwidth", "--resume")
    assert len(_rows(out)) == 12


@pytest.fixture
def planted():
    def boom(case, config):
        raise RuntimeError("planted failure\nsecond line")

    def build_ok(case, config):
        return sweep.KERNELS["stock.gather_qmm"].build(case, None)

    def check(case, config):
        return None if config["BM"] <= 16 else f"BM={config['BM']} exceeds the test limit 16"

    sweep.register(sweep.SweepKernel("test.boom", lambda case: [None], boom))
    sweep.register(sweep.SweepKernel("tuned.test", lambda case: [{"BM": 8}, {"BM": 32}], build_ok, check=check))
    yield
    sweep.KERNELS.pop("test.boom", None)
    sweep.KERNELS.pop("tuned.test", None)


def test_failing_kernel_is_recorded_and_sweep_goes_on(tmp_path, planted):
    rc, out = _sweep(tmp_path, "--m", "1,2", "--iters", "2", "--kernels", "test.boom,tuned.test,stock.gather_qmm")
    assert rc == 0
    rows = _rows(out)
    by = {(r["kernel"], r["config"], r["m"]): r["status"] for r in rows}
    for m in ("1", "2"):
        assert by[("test.boom", "", m)] == "failed: RuntimeError: planted failure"
        assert by[("tuned.test", "BM8", m)] == "ok"
        assert by[("tuned.test", "BM32", m)] == "skipped: BM=32 exceeds the test limit 16"
        assert by[("stock.gather_qmm", "", m)] == "ok"
    # --configs picks a subset of a tuned kernel's configs
    rc, out = _sweep(tmp_path, "--m", "1", "--iters", "2", "--kernels", "tuned.test", "--configs", "BM8",
                     name="c.csv")
    assert [(r["kernel"], r["config"]) for r in _rows(out)] == [("tuned.test", "BM8")]


# --- prepared inputs and the timer ------------------------------------------------------------


def _case(m=2, router="balanced", E=8, K=128, N=64, top_k=2):
    p = Problem(experts=E, k=K, n=N, rows=m * E, bits=4, group_size=64, dtype="float32")
    return measure.prepare_case(p, m=m, top_k=top_k, router=router, seed=3)


def test_case_layouts_match_numpy_reference():
    from mlx_moe_tune import formats

    case = _case()
    w, s, b = case.weights(0)
    q = dict(group_size=64, bits=4, mode="affine")
    ref_sorted = formats.reference_gather_qmm(case.x_sorted, w, s, b, case.idx_sorted, **q)[:, 0, :]
    np.testing.assert_allclose(measure.case_reference(case), ref_sorted, rtol=1e-4, atol=1e-4)
    # the sorted layout is x[order // top_k] with experts ascending
    idx = np.asarray(case.idx_sorted)
    assert (np.diff(idx) >= 0).all() and np.bincount(idx, minlength=8).tolist() == [2] * 8
    y = sweep.KERNELS["stock.gather_qmm"].build(case, None)()
    np.testing.assert_allclose(np.asarray(y).reshape(case.rows, -1), ref_sorted, rtol=2e-2, atol=2e-2)
    # unsorted (decode) layout: (T, top_k, N) in token order
    ref_uns = formats.reference_gather_qmm(case.x_unsorted, w, s, b, case.idx_unsorted, **q)
    y = sweep.KERNELS["stock.gather_qmm_unsorted"].build(case, None)()
    np.testing.assert_allclose(np.asarray(y).reshape(ref_uns.shape), ref_uns, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(measure.case_reference(case, "unsorted"),
                               ref_uns.reshape(case.tokens, 2, -1), rtol=1e-4, atol=1e-4)


def test_rotation_cycles_identical_copies(monkeypatch):
    monkeypatch.setattr(measure, "llc_bytes", lambda: 1 << 20)
    case = _case(m=1)
    want = -(-measure.CACHE_FACTOR * (1 << 20) // case.weight_bytes)  # ceil
    assert case.copies == min(want, measure.max_copies())
    nxt = case.rotation()
    seen = [nxt() for _ in range(case.copies + 1)]
    assert seen[0] is seen[-1] and len({id(c[0]) for c in seen[:-1]}) == case.copies
    for c in seen:
        for a, a0 in zip(c, seen[0]):
            assert mx.array_equal(a, a0).item()


def test_sparse_router_counts_active_experts():
    case = _case(m=4, router="sparse", E=16, top_k=2)
    active = np.unique(np.asarray(case.indices)).size
    assert case.active_experts == active < 16
    assert case.weight_bytes == active * case.wset.expert_bytes


def test_time_fn_against_direct_wall_clock():
    a = mx.random.normal((384, 384))
    mx.eval(a)

    def fn():
        y = a
        for _ in range(8):
            y = y @ a * 1e-3
        return y

    direct = []
    for _ in range(7):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        direct.append((time.perf_counter() - t0) * 1e6)
    t = measure.time_fn(fn, iters=5, warmup=1)
    # wide bounds: this checks what is timed (the eval, per call), not how fast the CPU is
    assert 0.25 * min(direct) <= t.median_us <= 3.0 * max(direct)
    assert t.p10_us <= t.median_us <= t.p90_us and t.iters == 5


def test_time_fn_excludes_python_graph_building():
    """Host-side work while the lazy graph is built is outside the timed region. The sleep is
    long (50 ms) against what the timed region holds (one scalar add), so the bound has a wide
    margin on a loaded 2-core CI machine: a 3 ms sleep against a 1 ms bound once read 1.3 ms."""
    host_s = 0.05

    def fn():
        time.sleep(host_s)
        return mx.array(1.0) + 1

    t = measure.time_fn(fn, iters=3, warmup=1, batch=1)
    assert t.median_us < 0.5 * host_s * 1e6


@pytest.mark.gpu
def test_case_reference_on_gpu_matches_numpy():
    """The tuner's large-problem reference on the GPU (several rows per expert: the case where
    MLX-CUDA's float32 gather_mm went wrong) against the numpy reference."""
    from mlx_moe_tune import formats

    p = Problem(experts=16, k=512, n=256, rows=64, bits=4, group_size=64, dtype="bfloat16")
    case = measure.prepare_case(p, m=4, top_k=4, seed=5)
    w, s, b = case.weights(0)
    ref = formats.reference_gather_qmm(case.x_sorted, w, s, b, case.idx_sorted, group_size=64, bits=4)[:, 0, :]
    # MLX-CUDA runs float32 matmuls in TF32 (10-bit mantissa): ~5e-3 of max on the H100 at K=512,
    # well inside the tuner's bfloat16 tolerance (3e-2)
    np.testing.assert_allclose(measure.case_reference(case), ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_decode_chain_feeds_each_call_the_previous_output():
    case = _case(m=1, E=8, top_k=2)
    seen = []

    def f(y, w, s, b, idx):
        seen.append((tuple(idx.shape), int(np.unique(np.asarray(idx)).size)))
        return y + 1.0

    y = measure.decode_chain(case, f, calls=5)()
    assert seen == [((1, 2), 2)] * 5  # one token, top_k distinct experts per call
    y0 = mx.random.normal((1, 1, 1, case.problem.k), key=mx.random.key(0)).astype(case.dtype) * 0.01
    np.testing.assert_allclose(np.asarray(y - y0), 5.0, atol=0.05)


def test_git_commit_marks_a_working_tree_that_differs_from_head(tmp_path, monkeypatch):
    """The commit recorded in sweep and table metadata says "-dirty" when tracked files differ
    from HEAD (a device machine runs a copied working tree whose HEAD can lag)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git here")
    monkeypatch.delenv("MLX_MOE_TUNE_COMMIT", raising=False)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert sweep._git_commit(tmp_path) == head
    (tmp_path / "b.txt").write_text("untracked files do not count\n")
    assert sweep._git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2\n")
    assert sweep._git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv("MLX_MOE_TUNE_COMMIT", "abc1234")
    assert sweep._git_commit(tmp_path) == "abc1234"
