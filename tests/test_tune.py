"""The tuner's search logic on the CPU: verification gate, cache/resume, budgets, table output.

The kernels here are fake families built from MLX ops (so a planted wrong or failing candidate
is easy to make); their outputs are checked against a float64 numpy reference of the dequantized
weights. The timer is a cost model (a candidate's time is a known function of its config) so
the best choice is known exactly; the real timer and real kernel families are exercised in
tests/test_tune_emulator.py.
"""
from __future__ import annotations

import json
import math
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_tune import tables, tune
from mlx_moe_tune.backend import EMULATOR_CUDA


class Case:
    """The prepared inputs of one (shape, m): mlx-lm's sorted layout, balanced routing."""

    def __init__(self, problem, m, top_k, seed):
        rng = np.random.default_rng(seed)
        E, K, N = problem.experts, problem.k, problem.n
        self.x = mx.array(rng.standard_normal((m * E, 1, K)).astype(np.float32)).astype(mx.bfloat16)
        w = mx.array(rng.standard_normal((E, N, K)).astype(np.float32))
        self.w, self.scales, self.biases = mx.quantize(w, group_size=problem.group_size, bits=problem.bits)
        self.indices = mx.array(np.repeat(np.arange(E, dtype=np.uint32), m))
        self.problem = problem
        self.weight_bytes = self.w.nbytes + self.scales.nbytes + self.biases.nbytes

    def stock(self):
        return mx.gather_qmm(self.x, self.w, self.scales, self.biases, rhs_indices=self.indices, transpose=True,
                             group_size=self.problem.group_size, bits=self.problem.bits, sorted_indices=True)


class FakeBench(tune.Bench):
    """Inputs and a numpy reference; time = the fn's `cost` (a cost model, deterministic)."""

    def __init__(self, sleep=0.0):
        super().__init__("emulator-cuda")
        self.timed = []  # (cost, iters) per real timing
        self.verified = 0
        self.sleep = sleep

    def prepare(self, problem, m, top_k, router, seed, backend):
        return Case(problem, m, top_k, seed)

    def reference(self, case):
        wd = mx.dequantize(case.w, case.scales, case.biases, group_size=case.problem.group_size,
                           bits=case.problem.bits).astype(mx.bfloat16)
        x = np.asarray(case.x.astype(mx.float32), np.float64)[:, 0, :]
        wd = np.asarray(wd.astype(mx.float32), np.float64)
        e = np.asarray(case.indices)
        return np.einsum("rk,rnk->rn", x, wd[e])

    def stock(self):
        return None  # bench_with_stock() adds one

    def time(self, fn, iters):
        mx.eval(fn())
        self.timed.append((fn.cost, iters))
        if self.sleep:
            time.sleep(self.sleep)
        # cheap timings are noisy in a known way: rung 0 sees cost * (1 + noise/iters)
        noisy = fn.cost * (1 + getattr(fn, "noise", 0.0) / iters)
        return (noisy, noisy * 0.9, noisy * 1.1)


class Fn:
    def __init__(self, f, cost, noise=0.0):
        self.f, self.cost, self.noise = f, cost, noise

    def __call__(self):
        return self.f()


class FakeKernel:
    """A SweepKernel-like family. Config R: a correct kernel costing R; config BAD: a wrong answer
    (a row shifted) that would be the fastest; FAIL: raises at run time, also 'fastest'."""

    def __init__(self, name="tuned.fake", rs=(3, 1, 2, 4), planted=True, version="v1", noise=None):
        self.name, self.rs, self.planted, self.version = name, rs, planted, version
        self.noise = noise or {}
        self.built = 0

    def configs(self, case):
        out = [{"R": r} for r in self.rs]
        if self.planted:
            out += [{"BAD": 1}, {"FAIL": 1}]
        return out

    def build(self, case, config):
        self.built += 1
        if "BAD" in config:
            return Fn(lambda: mx.roll(case.stock(), 1, axis=0), cost=0.1)
        if "FAIL" in config:
            def fail():
                raise RuntimeError("planted launch failure")
            return Fn(fail, cost=0.05)
        return Fn(case.stock, cost=float(config["R"]), noise=self.noise.get(config["R"], 0.0))


class StockKernel:
    name = "stock.gather_qmm"
    version = "stock"

    def configs(self, case):
        return [None]

    def build(self, case, config):
        return Fn(case.stock, cost=10.0)


SHAPE = tune.Shape(E=4, K=128, N=32, top_k=2)


def run(tmp_path, kernels, bench=None, cache="cache.jsonl", **kw):
    bench = bench or FakeBench()
    kw.setdefault("ms", (1, 4))
    rep = tune.tune(SHAPE, families=kernels, backend=EMULATOR_CUDA, bench=bench,
                    cache=tmp_path / cache if cache else None, table_dir=tmp_path / "tables", iters=9, **kw)
    return rep, bench


def bench_with_stock():
    b = FakeBench()
    b.stock = lambda: StockKernel()
    return b


def test_picks_valid_best_and_records_wrong_and_failing(tmp_path):
    k = FakeKernel()
    rep, bench = run(tmp_path, [k], bench=bench_with_stock())
    for br in rep.buckets[(4, 128, 32)]:
        by = {r.config_id: r for r in br.results}
        assert by["BAD1"].status == "wrong" and by["BAD1"].error > 0.1
        assert by["FAIL1"].status == "error" and "planted launch failure" in by["FAIL1"].message
        assert by["BAD1"].time_us is None and by["FAIL1"].time_us is None  # never timed
        assert br.best.config == {"R": 1}
        assert br.best.error < tune.TOLERANCE["bfloat16"]
        assert br.stock.time_us == 10.0
    # nothing wrong was ever timed
    assert {c for c, _ in bench.timed} <= {1.0, 2.0, 3.0, 4.0, 10.0}
    # the table holds the winner per bucket, GB/s from the weight bytes, the stock speedup
    (t,) = rep.tables
    assert [b.m for b in t.buckets] == [1, 4]
    for b in t.buckets:
        assert (b.family, b.config) == ("fake", {"R": 1})
        wb = Case(SHAPE.problem(b.m), b.m, 2, 0).weight_bytes
        assert b.gbps == pytest.approx(wb / 1e-6 / 1e9, rel=1e-3)
        assert b.speedup == pytest.approx(10.0, rel=1e-3)
    # ... and lookup finds it
    tables.clear_cache()
    p = SHAPE.problem(4)
    assert tables.lookup(p, EMULATOR_CUDA, table_dir=tmp_path / "tables") == ("fake", {"R": 1})
    # the candidate rows keep every status for reports
    rows = rep.rows()
    assert {r["status"] for r in rows} == {"ok", "wrong", "error"}
    assert sum(r["chosen"] for r in rows) == 2


def test_no_valid_candidate_writes_no_bucket(tmp_path):
    class OnlyBad(FakeKernel):
        def configs(self, case):
            return [{"BAD": 1}, {"FAIL": 1}]

    rep, _ = run(tmp_path, [OnlyBad()])
    assert all(br.best is None for br in rep.buckets[(4, 128, 32)])
    assert rep.tables[0].buckets == [] and rep.paths == []


def test_second_run_costs_nothing(tmp_path):
    rep1, b1 = run(tmp_path, [FakeKernel()])
    assert rep1.measured > 0 and b1.timed
    k2 = FakeKernel()
    rep2, b2 = run(tmp_path, [k2])
    assert rep2.measured == 0 and rep2.cached == rep1.measured + rep1.cached
    assert b2.timed == [] and k2.built == 0  # not even compiled
    assert rep2.tables[0].to_json()["buckets"] == rep1.tables[0].to_json()["buckets"]


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    full, _ = run(tmp_path, [FakeKernel()], cache="full.jsonl")
    total = full.measured

    class Crash(FakeBench):
        def time(self, fn, iters):
            if len(self.timed) == 3:
                raise KeyboardInterrupt
            return super().time(fn, iters)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [FakeKernel()], bench=Crash())
    path = tmp_path / "cache.jsonl"
    done = len(path.read_text().splitlines())
    assert 0 < done < total
    with open(path, "a") as f:  # a line cut short by the crash
        f.write('{"id": "abc", "key": {"trunc')
    rep, bench = run(tmp_path, [FakeKernel()])
    assert rep.measured == total - done
    assert rep.tables[0].to_json()["buckets"] == full.tables[0].to_json()["buckets"]


def test_edited_kernel_is_reverified(tmp_path):
    run(tmp_path, [FakeKernel(version="v1")])
    rep, _ = run(tmp_path, [FakeKernel(version="v2")])
    assert rep.cached == 0 and rep.measured > 0


def test_config_budget_samples_and_halves(tmp_path):
    rs = tuple(range(40, 0, -1))  # 40 correct configs, cost = R, plus the two planted ones
    k = FakeKernel(rs=rs)
    rep, bench = run(tmp_path, [k], budget="12", ms=(1, 4))
    for br in rep.buckets[(4, 128, 32)]:
        tried = [r for r in br.results if r.status != "skipped"]
        assert len(tried) <= 12
        sampled = [r.config["R"] for r in tried if r.config and "R" in r.config]
        assert br.best.config["R"] == min(sampled)  # exact costs: halving keeps the true best
    # both buckets drew the same sample (one compile per config per shape)
    a, b = ({r.config_id for r in br.results} for br in rep.buckets[(4, 128, 32)])
    assert a == b
    # successive halving: rungs of 1, 3, 9 iters (iters=9), each keeping ceil(n/3)
    per_bucket = [it for _, it in bench.timed]
    assert sorted(set(per_bucket)) == [1, 3, 9]
    n0 = per_bucket.count(1) // 2
    assert per_bucket.count(3) // 2 == math.ceil(n0 / 3)
    last = math.ceil(math.ceil(n0 / 3) / 3)  # timed at full iterations by the halving
    # ... then the best FINALISTS are re-timed FINAL_ROUNDS times each (interleaved)
    assert per_bucket.count(9) // 2 == last + min(tune.FINALISTS, last) * tune.FINAL_ROUNDS


def test_final_rounds_overrule_a_lucky_timing(tmp_path):
    """Config R=2's first timing is a lucky outlier (0.3x); the interleaved re-timings of the
    finalists expose it, and R=1 (really the fastest) wins with the median of its timings."""
    class Lucky(FakeBench):
        seen = set()

        def time(self, fn, iters):
            t = super().time(fn, iters)
            if fn.cost == 2.0 and 2.0 not in self.seen:
                self.seen.add(2.0)
                return (0.6, 0.5, 0.7)
            return t

    rep, bench = run(tmp_path, [FakeKernel(rs=(1, 2, 5), planted=False)], bench=Lucky(), ms=(1,))
    (br,) = rep.buckets[(4, 128, 32)]
    assert br.best.config == {"R": 2 - 1} and br.best.rounds == 1 + tune.FINAL_ROUNDS
    r2 = next(r for r in br.results if r.config == {"R": 2})
    assert r2.time_us == 2.0 and r2.time_us_p10 == 0.6  # median of [0.6, 2, 2]; the spread kept


def test_halving_survives_noisy_cheap_rung(tmp_path):
    """A config that looks best at 1 iteration but is not (noise) loses at full iterations."""
    k = FakeKernel(rs=tuple(range(1, 31)), planted=False, noise={3: -2.5})  # R=3 looks like 0.5 at 1 iter
    rep, _ = run(tmp_path, [k], budget="30", ms=(1,))
    (br,) = rep.buckets[(4, 128, 32)]
    assert br.best.config["R"] == 1 and br.best.iters == 9


def test_exhaustive_when_space_fits(tmp_path):
    rep, bench = run(tmp_path, [FakeKernel()], budget="100", ms=(1,))
    assert {it for _, it in bench.timed} == {9}  # one rung at full iterations
    assert len([r for r in rep.buckets[(4, 128, 32)][0].results if r.status == "ok"]) == 4


def test_seconds_budget_is_respected(tmp_path):
    bench = FakeBench(sleep=0.05)
    t0 = time.perf_counter()
    rep, _ = run(tmp_path, [FakeKernel(rs=tuple(range(60, 0, -1)), planted=False)], bench=bench,
                 budget="0.6s", ms=(1,))
    elapsed = time.perf_counter() - t0
    (br,) = rep.buckets[(4, 128, 32)]
    # one measurement plus a verification of slack, with room for a loaded CI machine; all 60
    # candidates would take >= 3 s
    assert br.seconds <= 0.6 + 0.5
    assert elapsed < 10
    skipped = [r for r in br.results if r.status == "skipped"]
    assert skipped, "60 candidates x 50 ms cannot all fit in 0.6 s"
    assert br.best is not None and br.best.status == "ok"


def test_family_names_and_errors(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        tune.Budget.parse("abc")
    with pytest.raises(ValueError, match="budget"):
        tune.Budget.parse("0")
    assert tune.Budget.parse("90s") == tune.Budget(seconds=90.0)
    assert tune.Budget.parse("12") == tune.Budget(configs=12)
    with pytest.raises(ValueError, match="m buckets"):
        run(tmp_path, [FakeKernel()], ms=(0, 1))


def test_recheck_reproduces_recorded_gbps(tmp_path):
    bench = FakeBench()
    rep, _ = run(tmp_path, [FakeKernel()], bench=bench)
    rows = tune.recheck(rep, [SHAPE], backend=EMULATOR_CUDA, bench=bench, kernels=[FakeKernel()], iters=9)
    assert [r["m"] for r in rows] == [1, 4]
    assert all(r["within_10pct"] and r["ratio"] == pytest.approx(1.0) for r in rows)

    class Slower(FakeBench):  # the rerun finds the kernel 2x slower: the check must say so
        def time(self, fn, iters):
            t = super().time(fn, iters)
            return tuple(2 * x for x in t)

    rows = tune.recheck(rep, [SHAPE], backend=EMULATOR_CUDA, bench=Slower(), kernels=[FakeKernel()], iters=9)
    assert all(not r["within_10pct"] and r["ratio"] == pytest.approx(0.5) for r in rows)


class CostByN(FakeBench):
    """Cost model where the best R depends on N: R == N // 32 is fastest (1.0), others cost R+1."""

    def time(self, fn, iters):
        mx.eval(fn())
        self.timed.append((fn.cost, iters))
        c = 1.0 if fn.cost == self.n // 32 else fn.cost + 1
        return (c, c, c)

    def prepare(self, problem, m, top_k, router, seed, backend):
        self.n = problem.n
        return super().prepare(problem, m, top_k, router, seed, backend)


def test_heuristic_gap_on_held_back_shapes(tmp_path, monkeypatch):
    """Three shapes; each held back in turn, the heuristic borrows the nearest other shape's
    choice. The gap is computed from measurements of that borrowed choice on the held-back shape."""

    class Fam:
        def check(self, problem, config, backend):
            return None

    monkeypatch.setattr(tables, "_families", lambda: {"fake": Fam()})
    shapes = [tune.Shape(E=4, K=128, N=n, top_k=2) for n in (32, 64, 128)]
    bench = CostByN()
    k = FakeKernel(rs=(1, 2, 3, 4), planted=False)
    cache = tune.Cache(tmp_path / "c.jsonl")
    rep = tune.tune(shapes, ms=(1,), families=[k], backend=EMULATOR_CUDA, bench=bench, cache=cache,
                    table_dir=tmp_path / "t", iters=9)
    assert [t.buckets[0].config["R"] for t in rep.tables] == [1, 2, 4]
    rows = tune.heuristic_gap(rep, shapes, backend=EMULATOR_CUDA, bench=bench, kernels=[k], cache=cache, iters=9)
    by_n = {r["N"]: r for r in rows}
    # N=32 borrows from N=64 (R=2 costs 3 on N=32 -> gap 2/3); N=64 from N=32 or 128 (tie in log
    # distance: the first in the pool, N=32, R=1 costs 2 -> gap 1/2); N=128 from N=64 (R=2 costs 3)
    assert by_n[32]["heuristic_config"] == "R2" and by_n[32]["heuristic_gap"] == pytest.approx(2 / 3, abs=1e-3)
    assert by_n[64]["heuristic_gap"] == pytest.approx(0.5, abs=1e-3)
    assert by_n[128]["heuristic_config"] == "R2" and by_n[128]["heuristic_gap"] == pytest.approx(2 / 3, abs=1e-3)
    assert all(r["heuristic_source"] == "heuristic:nearest-shape" for r in rows)
    assert all(r["rule_gap"] is None for r in rows)  # the rule knows only qmv/qmm


def test_errors_are_cached_and_retried_on_request(tmp_path):
    run(tmp_path, [FakeKernel()], ms=(1,))
    k = FakeKernel()
    rep, _ = run(tmp_path, [k], ms=(1,))
    assert rep.measured == 0 and k.built == 0
    k = FakeKernel()
    rep, _ = run(tmp_path, [k], ms=(1,), retry_errors=True)
    assert rep.measured == 1 and k.built == 1  # only the failing candidate runs again


def test_package_level_tune_is_callable(tmp_path):
    import mlx_moe_tune

    rep = mlx_moe_tune.tune(SHAPE, ms=(1,), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=FakeBench(),
                            cache=None, table_dir=tmp_path, iters=9)
    assert rep.tables[0].buckets[0].config == {"R": 1}
    assert mlx_moe_tune.tune.Budget is tune.Budget


def test_cli_errors(capsys):
    from mlx_moe_tune import cli

    assert cli.main(["tune", "--shape", "4,64,32,3", "--m", "1", "--backend", "emulator-cuda"]) == 2
    assert "divisible by top_k" in capsys.readouterr().err
    assert cli.main(["tune", "--preset", "tiny", "--shape", "4,64,32,2"]) == 2
    assert cli.main(["tune", "--shape", "4,64,32,2", "--families", "nope", "--backend", "emulator-cuda"]) == 2
    assert "unknown kernel family" in capsys.readouterr().err


def test_deadline_keeps_what_is_done(tmp_path):
    bench = FakeBench(sleep=0.05)
    rep, _ = run(tmp_path, [FakeKernel(planted=False)], bench=bench, ms=(1, 2, 4, 8), deadline_s=0.1)
    done = [br.m for br in rep.buckets[(4, 128, 32)]]
    assert done and len(done) < 4 and [m for _, m in rep.skipped] == [m for m in (1, 2, 4, 8) if m not in done]
    assert [b.m for b in rep.tables[0].buckets] == done
