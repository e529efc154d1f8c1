"""Fault injection (issue 18): bad input, faults inside kernels, killed and concurrent runs,
memory limits. Each test plants a fault and asserts what the run records and that nothing is
lost: every (kernel, config, m) row exactly once, earlier rows byte-identical, caches and tables
readable. Run with `-s` to see the summary (inputs tried, faults injected, rows lost).

Kept lean for CI: the tiny preset, the stock and reference kernels only (`--kernels 'stock.*,ref.*'`),
1-2 timing iterations, the tuner's fake kernels and cost-model bench from test_tune.py.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_moe_tune import measure, sweep, tables, tune
from mlx_moe_tune.backend import EMULATOR_CUDA, gpu_backend
from mlx_moe_tune.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tune import SHAPE, FakeBench, FakeKernel, Fn  # noqa: E402  (the tuner's fakes)

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quiet", "--iters", "1", "--kernels", "stock.*,ref.*"]
SUMMARY = Counter()  # inputs, faults, rows_lost


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print(f"\nfault-injection summary: {SUMMARY['inputs']} bad inputs tried, {SUMMARY['faults']} faults injected, "
          f"{SUMMARY['rows_lost']} rows lost")


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _keys(rows):
    return [(r["kernel"], r["config"], r["m"]) for r in rows]


def _err(capsys, argv):
    rc = main(argv)
    return rc, capsys.readouterr().err.strip()


# --- bad input: one line naming the argument -------------------------------------------------

NO_GPU = gpu_backend() is None


@pytest.mark.skipif(not NO_GPU, reason="asks for a GPU backend this machine lacks")
@pytest.mark.parametrize("command", ["sweep", "tune", "selftest"])
@pytest.mark.parametrize("backend, words", [("cuda", ["no cuda backend"]), ("metal", ["no metal backend"]),
                                            ("gpu", ["no GPU backend"]), ("nope", ["choose from", "emulator-cuda"])])
def test_every_command_takes_the_same_backend_names(tmp_path, capsys, command, backend, words):
    extra = ["-o", str(tmp_path / "x.csv")] if command == "sweep" else []
    rc, err = _err(capsys, [command, "--backend", backend, *extra])
    SUMMARY["inputs"] += 1
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mlx-moe-tune {command}: error: --backend"), err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("argv, words", [
    (["sweep", "--config-timeout", "-1"], ["--config-timeout", "seconds > 0"]),
    (["sweep", "--config-timeout", "soon"], ["--config-timeout"]),
    (["tune", "--config-timeout", "0x"], ["--config-timeout"]),
    (["tune", "--iters", "0"], ["--iters", ">= 1"]),
    (["tune", "--deadline", "-5"], ["--deadline", "> 0"]),
    (["tune", "--check", "--iters", "0"], ["--iters"]),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, words):
    extra = ["-o", str(tmp_path / "x.csv")] if argv[0] == "sweep" else []
    rc, err = _err(capsys, [*argv, *extra])
    SUMMARY["inputs"] += 1
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"mlx-moe-tune {argv[0]}: error:"), err
    assert all(w in err for w in words), err


def test_tune_rejects_file_and_directory_mixups(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("")
    for argv, words in ((["--table", str(f)], ["--table", "expected a directory"]),
                        (["-o", str(f)], ["-o", "expected a directory"]),
                        (["--cache", str(tmp_path)], ["--cache", "is a directory"])):
        rc, err = _err(capsys, ["tune", "--shape", "4,64,32,2", "--m", "1", *argv])
        SUMMARY["inputs"] += 1
        assert rc == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_patch_model_rejects_a_missing_table_dir(tmp_path):
    import mlx.nn as nn

    from mlx_moe_tune.patch import patch_model

    SUMMARY["inputs"] += 2
    with pytest.raises(ValueError, match=r"table='/nonexistent'.*does not exist.*tuning-table directory"):
        patch_model(nn.Module(), table="/nonexistent")
    f = tmp_path / "t.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        patch_model(nn.Module(), table=f)
    assert patch_model(nn.Module(), table=tmp_path) == 0  # an existing (empty) directory is fine


def test_sweep_creates_a_missing_output_directory_and_says_so(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "s.csv"
    rc = main(["sweep", *FAST, "--kernels", "stock.gather_qmm", "--m", "1", "-o", str(out)])
    SUMMARY["inputs"] += 1
    err = capsys.readouterr().err
    assert rc == 0 and f"created directory {out.parent} for -o {out}" in err
    assert _keys(_rows(out)) == [("stock.gather_qmm", "", "1")]


# --- report ------------------------------------------------------------------------------------


def _report_csv(tmp_path):
    rows = [("stock.gather_qmm", "", 1, 0.0542, "ok"), ("stock.gather_qmm", "", 8, 0.00705, "ok"),
            ("tuned.qmm", "BM8", 1, 4.763, "ok"), ("tuned.qmm", "BM8", 8, 2523.4, "ok"),
            ("ref.bandwidth", "sum", 1, 3.66, "ok")]
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "config", "m", "gbps", "pct_roofline", "status", "n"])
        for k, c, m, g, st in rows:
            w.writerow([k, c, m, g, 100 * g / 3.66, st, 128])
    return path


def test_report_digits_fit_the_numbers(tmp_path, capsys):
    assert main(["report", str(_report_csv(tmp_path))]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
             for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 8 ")}
    assert lines["1"][1:3] == ["0.0542", "4.76"] and lines["1"][4] == "87.88x"
    assert lines["8"][1:3] == ["0.00705", "2,523"]
    assert "Measured bandwidth (ref.bandwidth): 3.66 GB/s" in out


def test_report_unknown_stock_is_one_line_naming_the_kernels(tmp_path, capsys):
    rc, err = _err(capsys, ["report", str(_report_csv(tmp_path)), "--stock", "nope"])
    SUMMARY["inputs"] += 1
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--stock 'nope'" in err and "stock.gather_qmm" in err and "tuned.qmm" in err
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'kernel,m,gbps,status\n"unclosed,1,2,ok\n\xff\xfe')
    rc, err = _err(capsys, ["report", str(bad)])
    SUMMARY["inputs"] += 1
    assert rc == 2 and len(err.splitlines()) == 1, err


# --- faults inside kernels: recorded with their status, the sweep goes on -----------------------


@pytest.fixture
def faulty():
    """Planted kernels: a real compile error (the emulator's g++), an exception, a wrong
    result (a row shifted: checked against the reference), a hang (a long sleep)."""
    from mlx_moe_tune import emulator

    good = sweep.KERNELS["stock.gather_qmm"].build

    def compile_error(case, config):
        k = emulator.metal_kernel(name="planted_bad", input_names=["a"], output_names=["out"],
                                  source="this is not a kernel;")
        return lambda: k(inputs=[case.x], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
                         threadgroup=(4, 1, 1))[0]

    def raises(case, config):
        raise RuntimeError("planted launch failure")

    def wrong(case, config):
        fn = good(case, None)
        return lambda: mx.roll(fn(), 1, axis=0)

    def hang(case, config):
        def fn():
            time.sleep(120)
        return fn

    planted = {"test.compile_error": compile_error, "test.raises": raises, "test.wrong": wrong, "test.hang": hang}
    for name, build in planted.items():
        sweep.register(sweep.SweepKernel(name, lambda case: [None], build, layout="sorted"))
    yield list(planted)
    for name in planted:
        sweep.KERNELS.pop(name, None)


def test_sweep_records_kernel_faults_and_goes_on(tmp_path, faulty):
    out = tmp_path / "f.csv"
    rc = main(["sweep", "--quiet", "--iters", "1", "--m", "1,2", "--config-timeout", "1", "-o", str(out),
               "--kernels", "stock.gather_qmm,test.*"])
    SUMMARY["faults"] += 4 * 2
    assert rc == 0
    rows = _rows(out)
    by = {(r["kernel"], r["m"]): r["status"] for r in rows}
    assert len(rows) == len(by) == 5 * 2
    for m in ("1", "2"):
        assert by[("test.compile_error", m)].startswith("failed: EmulatorCompileError: emulator: compiling")
        assert by[("test.raises", m)] == "failed: RuntimeError: planted launch failure"
        assert by[("test.wrong", m)].startswith("wrong: relative error")
        assert by[("test.hang", m)].startswith("failed: ConfigTimeout: test.hang")
        assert by[("stock.gather_qmm", m)] == "ok"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["finished"] and meta["counts"] == {"ok": 2, "failed": 6, "wrong": 2}


HARD_HANG = textwrap.dedent("""
    import signal, sys, time
    from mlx_moe_tune import sweep
    def stuck(case, config):
        def fn():
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as if stuck in C: no Python signal
            time.sleep(60)
        return fn
    sweep.register(sweep.SweepKernel("test.stuck", lambda case: [None], stuck))
    from mlx_moe_tune.cli import main
    sys.exit(main())
""")


def test_sweep_past_a_hang_stuck_in_native_code(tmp_path):
    """SIGALRM cannot reach it: the watchdog records the timeout, restarts the command with
    --resume, and the restarted sweep skips it and finishes."""
    out = tmp_path / "h.csv"
    p = subprocess.run([sys.executable, "-c", HARD_HANG, "sweep", "--quiet", "--iters", "1", "--m", "1",
                        "--config-timeout", "0.5", "--kernels", "stock.gather_qmm,test.stuck", "-o", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=120)
    SUMMARY["faults"] += 1
    assert p.returncode == 0, p.stderr
    assert "restarting the run past it" in p.stderr
    rows = _rows(out)
    assert sorted(_keys(rows)) == [("stock.gather_qmm", "", "1"), ("test.stuck", "", "1")]
    assert {r["kernel"]: r["status"] for r in rows}["test.stuck"].startswith("failed: ConfigTimeout")


def test_sweep_skips_points_that_would_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "memory_available", lambda: 1 << 20)  # 1 MB: no point fits
    out = tmp_path / "mem.csv"
    assert main(["sweep", *FAST, "--m", "1,2", "-o", str(out)]) == 0
    rows = _rows(out)
    assert _keys(rows) == [("*", "", "1"), ("*", "", "2")]
    assert all(r["status"].startswith("skipped: memory: needs ~") and "GB available" in r["status"] for r in rows)
    assert main(["sweep", *FAST, "--m", "1,2", "--resume", "-o", str(out)]) == 0
    assert len(_rows(out)) == 2  # resume does not repeat a skipped point
    # 20 MB: the points fit, the 32 MB bandwidth probe does not; the stock kernels run
    monkeypatch.setattr(measure, "memory_available", lambda: 20 << 20)
    out = tmp_path / "mem2.csv"
    assert main(["sweep", *FAST, "--m", "1", "-o", str(out)]) == 0
    st = {(r["kernel"], r["config"]): r["status"] for r in _rows(out)}
    assert all(v.startswith("skipped: memory") for (k, _), v in st.items() if k == "ref.bandwidth")
    assert st[("stock.gather_qmm", "")] == "ok" and st[("stock.quantized_matmul", "")] == "ok"
    SUMMARY["faults"] += 2


def test_tune_records_a_bucket_whose_inputs_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "memory_available", lambda: 1 << 20)
    from mlx_moe_tune.kernels.family import Problem

    p = Problem(experts=8, k=256, n=128, rows=8, bits=4, group_size=64, dtype="bfloat16", m=1.0)
    with pytest.raises(MemoryError, match="would not fit"):
        tune.Bench("emulator-metal").prepare(p, 1, 2, "balanced", 0, EMULATOR_CUDA)

    class NoRoomAt4(FakeBench):
        def prepare(self, problem, m, top_k, router, seed, backend):
            if m == 4:
                raise MemoryError("the inputs of m=4 would not fit in memory")
            return super().prepare(problem, m, top_k, router, seed, backend)

    lines = []
    rep = tune.tune(SHAPE, ms=(1, 4), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=NoRoomAt4(),
                    cache=None, table_dir=tmp_path, iters=9, log=lines.append)
    SUMMARY["faults"] += 2
    assert [b.m for b in rep.tables[0].buckets] == [1]
    assert any("m=4: failed: preparing inputs: MemoryError" in s for s in lines)


# --- faults inside the tuner ------------------------------------------------------------------


class Hangs(FakeKernel):
    """FakeKernel plus a config that never returns (a sleep, reached by the soft time limit)."""

    def configs(self, case):
        return super().configs(case) + [{"HANG": 1}]

    def build(self, case, config):
        if "HANG" in config:
            def forever():
                time.sleep(120)
            return Fn(forever, cost=0.01)
        return super().build(case, config)


def test_tune_records_faulty_candidates_and_goes_on(tmp_path):
    rep = tune.tune(SHAPE, ms=(1, 4), families=[Hangs()], backend=EMULATOR_CUDA, bench=FakeBench(),
                    cache=tmp_path / "c.jsonl", table_dir=tmp_path / "t", iters=9, config_timeout=0.5)
    SUMMARY["faults"] += 3 * 2
    for br in rep.buckets[(SHAPE.E, SHAPE.K, SHAPE.N)]:
        by = {r.config_id: r for r in br.results}
        assert by["HANG1"].status == "error" and by["HANG1"].message.startswith("ConfigTimeout: m=")
        assert by["FAIL1"].status == "error" and by["BAD1"].status == "wrong"
        assert br.best.config == {"R": 1}
    # cached: a second run measures nothing, the hang included
    k = Hangs()
    rep2 = tune.tune(SHAPE, ms=(1, 4), families=[k], backend=EMULATOR_CUDA, bench=FakeBench(),
                     cache=tmp_path / "c.jsonl", table_dir=tmp_path / "t", iters=9, config_timeout=0.5)
    assert rep2.measured == 0 and k.built == 0


def test_check_lines_agree_with_the_summary(tmp_path):
    bench = FakeBench()
    rep = tune.tune(SHAPE, ms=(1, 4), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=bench, cache=None,
                    table_dir=tmp_path, iters=9)

    class SlowAt4(FakeBench):  # the m=4 bucket's kernel runs 2x slower than recorded
        def time(self, fn, iters):
            t = super().time(fn, iters)
            return tuple(x * (2 if fn.f.__self__.problem.m == 4 else 1) for x in t)

    lines = []
    rows = tune.recheck(rep, [SHAPE], backend=EMULATOR_CUDA, bench=SlowAt4(), kernels=[FakeKernel()], iters=9,
                        log=lines.append, label="check")
    summary = tune.check_summary(rows)
    assert summary == "check: 1/2 buckets within 10% of their recorded GB/s (1 outside, 0 not measured)"
    assert ["within 10%" in s for s in lines] == [True, False] and "OUTSIDE 10%" in lines[1]
    assert " ok" not in "".join(lines)


def test_tune_shows_progress(tmp_path, capsys):
    progress = tune._Progress(quiet=False)
    tune.tune(SHAPE, ms=(1, 4), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=FakeBench(), cache=None,
              table_dir=tmp_path, iters=9, progress=progress, log=progress.write)
    progress.close()
    cap = capsys.readouterr()
    assert "tune 1/2 N=32 m=1" in cap.err and "tune 2/2 N=32 m=4" in cap.err and "6/6" in cap.err
    assert cap.out.count("E=4 K=128 N=32 m=") == 2  # the bucket lines, above the bar


# --- killed runs, torn files, concurrent writers -------------------------------------------------


def _wait_rows(path: Path, n: int, proc, timeout=90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n + 1:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {n} rows: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"no {n} rows after {timeout} s")


def _complete_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def test_killed_sweep_resumes_with_every_row_once(tmp_path):
    """SIGINT after the first rows, then SIGKILL after more, then --resume to the end: every
    (kernel, config, m) exactly once, the rows written before each kill byte-identical."""
    out = tmp_path / "k.csv"
    ms = "1..8"
    cmd = [str(Path(sys.executable).with_name("mlx-moe-tune")), "sweep", *FAST, "--m", ms, "-o", str(out)]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "mlx_moe_tune.cli", *cmd[1:]]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_rows(out, 3, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; the CSV keeps every finished row: rerun with --resume" in err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["finished"] is None and "KeyboardInterrupt" in meta["interrupted"]
    before = _complete_lines(out)
    p = subprocess.Popen([*cmd, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_rows(out, len(before) + 3, p)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    SUMMARY["faults"] += 2
    assert out.read_bytes().startswith(b"".join(before))
    before = _complete_lines(out)
    assert main(["sweep", *FAST, "--m", ms, "-o", str(out), "--resume"]) == 0
    assert out.read_bytes().startswith(b"".join(before))
    keys = _keys(_rows(out))
    want = {(k, c, str(m)) for m in range(1, 9) for k, c in
            [("ref.bandwidth", "sum"), ("ref.bandwidth", "rowsum"), ("ref.bandwidth", "copy"),
             ("stock.gather_qmm", ""), ("stock.gather_qmm_unsorted", ""), ("stock.quantized_matmul", ""),
             ("ref.gather_mm_bf16", "")]}
    lost = len(want - set(keys))
    SUMMARY["rows_lost"] += lost
    assert lost == 0 and len(keys) == len(set(keys)) == len(want)
    assert json.loads(out.with_suffix(".json").read_text())["finished"]


def test_torn_last_csv_row_is_dropped_and_measured_again(tmp_path, capsys):
    out = tmp_path / "t.csv"
    args = ["sweep", *FAST, "--kernels", "stock.gather_qmm,stock.quantized_matmul", "--m", "1,2", "-o", str(out)]
    assert main(args) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:17])  # a writer killed mid-row
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    new = out.read_bytes().splitlines(keepends=True)
    SUMMARY["faults"] += 1
    assert new[:-1] == lines[:-1] and len(new) == len(lines)
    assert _keys(_rows(out)) == [("stock.gather_qmm", "", "1"), ("stock.quantized_matmul", "", "1"),
                                 ("stock.gather_qmm", "", "2"), ("stock.quantized_matmul", "", "2")]


def test_second_sweep_on_the_same_file_is_refused(tmp_path, capsys):
    from mlx_moe_tune.safeio import locked

    out = tmp_path / "busy.csv"
    out.write_text("")
    with open(out, "a") as f, locked(f):
        rc, err = _err(capsys, ["sweep", *FAST, "--m", "1", "-o", str(out)])
    SUMMARY["faults"] += 1
    last = err.splitlines()[-1]  # after the sweep's "sweep tiny ... -> busy.csv" intro line
    assert rc == 2 and last.startswith("mlx-moe-tune sweep: error: -o") and "another sweep is writing this file" in last


TUNE_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_tune import FakeBench, FakeKernel, SHAPE
    from mlx_moe_tune import tune
    from mlx_moe_tune.backend import EMULATOR_CUDA
    tune.tune(SHAPE, ms=(1, 2, 4, 8), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=FakeBench(sleep=0.05),
              cache=sys.argv[2], table_dir=sys.argv[3], iters=9)
""")


def test_killed_tune_leaves_cache_and_table_it_resumes_from(tmp_path):
    cache, tdir = tmp_path / "c.jsonl", tmp_path / "tables"
    full = tune.tune(SHAPE, ms=(1, 2, 4, 8), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=FakeBench(),
                     cache=tmp_path / "full.jsonl", table_dir=tmp_path / "full", iters=9)
    p = subprocess.Popen([sys.executable, "-c", TUNE_CHILD, str(Path(__file__).parent), str(cache), str(tdir)],
                         env=_env(), stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(tdir.glob("*.json")) and time.monotonic() - t0 < 90:  # a partial table after bucket 1
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.02)
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    SUMMARY["faults"] += 2
    (path,) = tdir.glob("*.json")
    t = tables.read_table(path)  # valid, and holds the finished buckets
    assert t.buckets and t.meta["partial"]["done"] == [b.m for b in t.buckets]
    done = len(tune.Cache(cache).records)  # complete lines (a kill mid-write may tear one)
    with open(cache, "a") as f:
        f.write('{"id": "torn", "key": {"m"')  # and a torn last line on top
    rep = tune.tune(SHAPE, ms=(1, 2, 4, 8), families=[FakeKernel()], backend=EMULATOR_CUDA, bench=FakeBench(),
                    cache=cache, table_dir=tdir, iters=9)
    assert rep.measured == full.measured - done  # nothing measured twice, nothing lost
    assert rep.tables[0].to_json()["buckets"] == full.tables[0].to_json()["buckets"]
    assert tables.read_table(path).to_json()["buckets"] == full.tables[0].to_json()["buckets"]
    assert "partial" not in tables.read_table(path).meta


def test_corrupt_cache_lines_are_skipped_with_one_warning(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    c = tune.Cache(path)
    c.put({"a": 1}, {"status": "ok", "time_us": 1.0})
    with open(path, "ab") as f:
        f.write(b"not json\n\xff\xfe\x00\n[1, 2]\n{\"id\": 5}\n")
    c.put({"a": 2}, {"status": "ok", "time_us": 2.0})
    with open(path, "ab") as f:
        f.write(b'{"id": "cut')  # torn: the next put must not be glued to it
    c.put({"a": 3}, {"status": "ok", "time_us": 3.0})
    c2 = tune.Cache(path)
    err = capsys.readouterr().err
    SUMMARY["faults"] += 5
    assert [c2.get({"a": i})["time_us"] for i in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert c2.bad_lines == [2, 3, 4, 5, 7] and err.count("warning") == 1 and "skipped 5 unreadable" in err


WRITER = textwrap.dedent("""
    import sys
    from mlx_moe_tune.tune import Cache
    c = Cache(sys.argv[1])
    for i in range(int(sys.argv[3])):
        c.put({"writer": sys.argv[2], "i": i}, {"status": "ok", "pad": sys.argv[2] * 20000})
""")


def test_concurrent_writers_do_not_corrupt_the_cache(tmp_path):
    """Two processes append 20 KB records to one cache at once (each line needs several write
    calls through an 8 KB buffer): under the lock every line stays whole."""
    path, n = tmp_path / "shared.jsonl", 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), w, str(n)], env=_env()) for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    c = tune.Cache(path)
    SUMMARY["faults"] += 1
    lost = 2 * n - len(c.records)
    SUMMARY["rows_lost"] += lost
    assert c.bad_lines == [] and lost == 0
    assert {(r["key"]["writer"], r["key"]["i"]) for r in c.records.values()} == {(w, i) for w in "ab" for i in range(n)}


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    from mlx_moe_tune.safeio import atomic_write, atomic_write_text

    path = tmp_path / "t.json"
    atomic_write_text(path, "old\n")

    def half(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, half)
    SUMMARY["faults"] += 1
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["t.json"]
