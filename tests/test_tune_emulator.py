"""The tuner end to end on the CPU: real kernel families on the SIMT emulator, the real timer,
the numpy reference, the command line, and the op picking the tuned config from the table."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import cli, formats, tables, tune
from mlx_moe_tune.backend import get_backend

emulator = pytest.importorskip("mlx_moe_tune.emulator")



def _cuda_kernels_run() -> bool:
    """Whether the emulator runs the CUDA kernel sources (its own tests and H-cuda's prove them;
    here the tuner only needs them to run)."""
    from mlx_moe_tune import ops

    x = mx.zeros((2, 1, 64), dtype=mx.bfloat16)
    w, s, b = mx.quantize(mx.zeros((2, 32, 64)), group_size=64, bits=4)
    try:
        mx.eval(ops.gather_qmm(x, w, s.astype(mx.bfloat16), b.astype(mx.bfloat16), mx.array([0, 1]), group_size=64,
                               bits=4, family="qmv", backend="emulator-cuda"))
        return True
    except Exception:
        return False


BACKENDS = ["emulator-metal",
            pytest.param("emulator-cuda", marks=pytest.mark.skipif(not _cuda_kernels_run(),
                                                                   reason="the emulator cannot run the CUDA kernels here"))]
SHAPE = tune.Shape(E=4, K=64, N=32, top_k=2)


class WrongQmm:
    """The real qmm family with its output rows rolled by one: a planted wrong candidate."""

    def __init__(self, inner):
        self.inner, self.name, self.family = inner, "tuned.qmm_wrong", inner.family

    def configs(self, case):
        return list(self.inner.configs(case))[:1]

    def build(self, case, config):
        fn = self.inner.build(case, config)
        return lambda: mx.roll(fn(), 1, axis=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tune_real_families_on_emulator(tmp_path, backend):
    BACKEND = get_backend(backend)
    bench = tune.Bench(BACKEND.name)
    real = bench.kernels(["qmv", "qmm"])
    rep = tune.tune(SHAPE, ms=(1, 4), families=real + [WrongQmm(real[0])], backend=BACKEND, budget=3, iters=1,
                    cache=tmp_path / "cache.jsonl", table_dir=tmp_path / "tables")
    (t,) = rep.tables
    assert [b.m for b in t.buckets] == [1, 4]
    for br in rep.buckets[(4, 64, 32)]:
        statuses = {r.family: r.status for r in br.results}
        assert statuses["tuned.qmm_wrong"] == "wrong"
        assert br.best is not None and br.best.family in ("tuned.qmv", "tuned.qmm")
        ok = [r for r in br.results if r.status == "ok"]
        assert br.best.time_us == min(r.time_us for r in ok if r.iters == br.best.iters)
    # the chosen kernel really computes gather_qmm: run it through the op with the table's
    # config and compare with the independent numpy reference
    for b in t.buckets:
        case = tune.Point(bench, SHAPE.problem(b.m), b.m, SHAPE.top_k, "balanced", 7, BACKEND).case
        w, s, bi = case.weights(0)
        from mlx_moe_tune import ops

        y = ops.gather_qmm(case.x_sorted, w, s, bi, case.idx_sorted, group_size=64, bits=4, sorted_indices=True,
                           family=b.family, config=b.config, backend=BACKEND)
        ref = formats.reference_gather_qmm(case.x_sorted, w, s, bi, case.idx_sorted, group_size=64, bits=4)
        y = np.asarray(y.astype(mx.float32), np.float64)
        assert np.abs(y - ref).max() / np.abs(ref).max() < tune.TOLERANCE["bfloat16"]
    # resume: nothing measured again
    rep2 = tune.tune(SHAPE, ms=(1, 4), families=real + [WrongQmm(real[0])], backend=BACKEND, budget=3, iters=1,
                     cache=tmp_path / "cache.jsonl", table_dir=tmp_path / "tables")
    assert rep2.measured == 0


def test_cli_tune_then_op_uses_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_MOE_TUNE_TABLES", str(tmp_path / "tables"))
    argv = ["tune", "--shape", "4,64,32,2", "--m", "2", "--backend", "emulator-metal", "--budget", "2",
            "--iters", "1", "--cache", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "out"), "-q"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote" in out
    (path,) = (tmp_path / "tables").glob("*.json")
    data = json.loads(path.read_text())
    assert data["key"]["backend"] == "emulator-metal" and data["buckets"][0]["m"] == 2
    rows = (tmp_path / "out" / "tune.csv").read_text().splitlines()
    assert rows[0].startswith("kernel,config,m") and len(rows) >= 3
    assert cli.main(argv) == 0
    assert "0 measurements" in capsys.readouterr().out
    # the op's lookup now returns the tuned choice for this shape
    tables.clear_cache()
    from mlx_moe_tune.kernels.family import Problem

    p = Problem(experts=4, k=64, n=32, rows=8, m=2.0)
    want = data["buckets"][0]
    assert tables.lookup(p, "emulator-metal") == (want["family"], want["config"])
    # --check re-measures the table's choice (emulated timings are noise: only statuses asserted)
    code = cli.main(["tune", "--check", "--backend", "emulator-metal", "--iters", "1", "-q",
                     "-o", str(tmp_path / "chk")])
    assert code in (0, 1)
    (row,) = json.loads((tmp_path / "chk" / "tune-check.json").read_text())
    assert row["status"] == "ok" and row["m"] == 2 and row["config"] == tune.config_id(want["config"])
    assert row["recorded_gbps"] == want["gbps"] and row["rerun_gbps"] > 0
    from mlx_moe_tune import ops

    # and the op says so: describe() (what the sweep's tuned.auto row records) names the table
    wq, sq, bq = mx.quantize(mx.random.normal((4, 32, 64)).astype(mx.bfloat16), group_size=64, bits=4)
    xs = mx.random.normal((8, 1, 64)).astype(mx.bfloat16)
    d = ops.describe(xs, wq, sq, bq, mx.array([0, 0, 1, 1, 2, 2, 3, 3], mx.int32), group_size=64, bits=4,
                     sorted_indices=True, backend="emulator-metal", m=2.0)
    assert d == dict(family=want["family"], config=tune.config_id(want["config"]), source="table")


def test_cli_isolated_tune_and_check(tmp_path, monkeypatch, capsys):
    """--isolate yes: every shape is tuned in a child process that fills the shared cache (the
    parent's own pass then measures nothing), and --check re-measures each table in a child."""
    monkeypatch.setenv("MLX_MOE_TUNE_TABLES", str(tmp_path / "tables"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    common = ["--backend", "emulator-metal", "--budget", "1", "--iters", "1", "--families", "qmv"]
    argv = ["tune", "--preset", "tiny", "--m", "2", "--cache", str(tmp_path / "c.jsonl"), "--isolate", "yes", *common]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    shapes = len(tune.shapes_from_args(argparse.Namespace(preset="tiny", shape=None, mode=None, bits=None,
                                                          group_size=None, dtype=None)))
    assert out.count("in a child process") == shapes
    assert "\n0 measurements" in out or out.startswith("0 measurements")
    assert len(list((tmp_path / "tables").glob("*.json"))) == shapes
    code = cli.main(["tune", "--check", "--backend", "emulator-metal", "--iters", "1", "--isolate", "yes",
                     "-o", str(tmp_path / "chk")])
    assert code in (0, 1)
    rows = json.loads((tmp_path / "chk" / "tune-check.json").read_text())
    assert len(rows) == shapes and all(r["status"] == "ok" and r["rerun_gbps"] > 0 for r in rows)
    assert capsys.readouterr().out.count("[child] check:") == shapes
