"""`mlx-moe-tune tune`: search each kernel family's tile space per m bucket and keep the winners.

For every (shape, m bucket) the tuner
  1. lists the valid configs of each family (`KernelFamily.check` already dropped the rest);
  2. picks candidates: all of them when the space fits the budget, otherwise a seeded random
     sample taken round-robin over the families. The sample is seeded by the shape, not by m,
     so every m bucket of a shape sees mostly the same configs and each compiles once;
  3. runs each candidate once and compares its output with the reference (the numpy
     `formats.reference_gather_qmm` for small problems; for large ones MLX's dequantize and a
     float32 gather_mm, `measure.case_reference`: no quantized kernel involved either way). A
     wrong or failing candidate is recorded with its status and never timed or chosen;
  4. times the verified candidates with H-sweep's timer (`measure.py`): all at full iterations
     when exhaustive, else successive halving (cheap timing for all, then the best third
     re-timed with more iterations, ...);
  5. writes the fastest to a tuning table (`tables.py`), with the stock kernel's GB/s beside it.

Every verification and timing is appended to a JSONL cache keyed by device, backend, MLX
version, shape, format, m, family, config (and the kernel source's hash), so an interrupted tune
resumes where it stopped and a repeated one measures nothing.

Budget (`--budget`, per m bucket): `N` = at most N candidate configs; `Ns` = at most N seconds
of measuring (cache hits are free). Without a budget, spaces of up to 64 configs are exhaustive.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .kernels.family import Problem, config_id

DEFAULT_CONFIG_BUDGET = 64
TIMER_VERSION = 2  # measure.time_fn: 2 = graph building outside the timed eval (2026-11-22)
ETA = 3  # successive halving keeps the best 1/ETA of a rung
# One ~3 s timing of a 70-300 us call varies by up to +-25% on the lent H100 between measurements
# (sweeps/results/h100/repro/): the best FINALISTS and stock are re-timed in FINAL_ROUNDS
# interleaved rounds (A B C s A B C s ...) and judged by the median of all their timings.
FINALISTS = 3
FINAL_ROUNDS = 2
# max |y - ref| / max |ref| a candidate may have: outputs are rounded to the activation dtype
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}
# above this many dequantized weights the numpy reference is too slow: use mx.gather_qmm
NUMPY_REFERENCE_MAX_WEIGHTS = 1 << 24


def default_cache_path() -> Path:
    """$MLX_MOE_TUNE_CACHE (the package's cache folder, shared with the emulator's compile cache,
    default ~/.cache/mlx-moe-tune) / tune-cache.jsonl."""
    return Path(os.environ.get("MLX_MOE_TUNE_CACHE") or "~/.cache/mlx-moe-tune").expanduser() / "tune-cache.jsonl"


# --- budget ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    configs: int | None = None  # candidate configs per m bucket
    seconds: float | None = None  # measuring wall time per m bucket

    @classmethod
    def parse(cls, text: str | int | float | None | "Budget") -> "Budget":
        if text is None:
            return cls()
        if isinstance(text, Budget):
            return text
        if isinstance(text, (int, float)):
            text = str(text)
        s = str(text).strip().lower()
        try:
            if s.endswith("s"):
                v = float(s[:-1])
                if not v > 0:
                    raise ValueError
                return cls(seconds=v)
            v = int(s)
            if v < 1:
                raise ValueError
            return cls(configs=v)
        except ValueError:
            raise ValueError(f"bad --budget {text!r}: use N configs (e.g. 40) or seconds (e.g. 90s), > 0") from None

    def exhaustive(self, space_size: int) -> bool:
        return self.seconds is None and space_size <= (self.configs or DEFAULT_CONFIG_BUDGET)


# --- cache ----------------------------------------------------------------------------------


class Cache:
    """Append-only JSONL of measurements. One line per verification or timing; the last line for
    a key wins. Each line is appended whole and flushed under an exclusive flock (safeio), so
    concurrent tunes sharing a cache interleave lines, never bytes. A line cut short by a crash,
    or otherwise unreadable, is skipped with one warning: an interrupted run loses at most it."""

    def __init__(self, path: str | os.PathLike | None, warn: Callable[[str], None] | None = None):
        from .safeio import warn as default_warn

        self.path = Path(path).expanduser() if path is not None else None
        self.records: dict[str, dict] = {}
        self.bad_lines: list[int] = []  # 1-based line numbers skipped
        if self.path is not None and self.path.exists():
            if self.path.is_dir():
                raise ValueError(f"--cache {self.path}: is a directory; give a .jsonl file")
            with open(self.path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    try:
                        rec = json.loads(raw)
                        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("status"), str):
                            raise TypeError
                        self.records[rec["id"]] = rec
                    except (ValueError, KeyError, TypeError, AttributeError):
                        if raw.strip():
                            self.bad_lines.append(i)
            if self.bad_lines:
                shown = ", ".join(map(str, self.bad_lines[:5])) + (" ..." if len(self.bad_lines) > 5 else "")
                (warn or default_warn)(f"tune cache {self.path}: skipped {len(self.bad_lines)} unreadable "
                                       f"line(s) (line {shown}); those measurements are taken again")

    @staticmethod
    def make_id(key: dict) -> str:
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def get(self, key: dict) -> dict | None:
        return self.records.get(self.make_id(key))

    def put(self, key: dict, rec: dict) -> dict:
        rec = {"id": self.make_id(key), "key": key, **rec, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.records[rec["id"]] = rec
        if self.path is not None:
            from .safeio import append_line

            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.path, json.dumps(rec))
        return rec


# --- what is measured -----------------------------------------------------------------------


@dataclass
class Candidate:
    kernel: Any  # a sweep.SweepKernel-like object: name, configs(case), build(case, config)
    config: dict | None

    @property
    def family(self) -> str:
        return self.kernel.name

    @property
    def cid(self) -> str:
        return config_id(self.config) if self.config else ""


@dataclass
class Result:
    """One candidate's outcome in one m bucket (what the cache holds, flattened)."""

    family: str
    config: dict | None
    status: str  # ok | wrong | error | skipped (not reached within the budget)
    error: float | None = None  # relative error vs the reference
    time_us: float | None = None
    time_us_p10: float | None = None
    time_us_p90: float | None = None
    iters: int | None = None
    gbps: float | None = None
    message: str = ""
    rounds: int = 1  # timings behind time_us (finalists: 1 + FINAL_ROUNDS, their median)

    @property
    def config_id(self) -> str:
        return config_id(self.config) if self.config else ""


@dataclass
class BucketResult:
    m: int
    best: Result | None
    stock: Result | None
    results: list[Result]
    measured: int = 0  # new measurements (verifications + timings) this run
    cached: int = 0  # answered from the cache
    seconds: float = 0.0
    error: str = ""  # why the bucket has no candidates at all (its inputs could not be prepared)


class Point:
    """One (shape, format, m) the tuner decides for; holds the prepared case and reference."""

    def __init__(self, bench, problem: Problem, m: int, top_k: int, router: str, seed: int, backend):
        self.bench, self.problem, self.m, self.top_k, self.router, self.seed = bench, problem, m, top_k, router, seed
        self.backend = backend
        self._case = None
        self._ref = None
        self.key = {
            "device": bench.device_name(),
            "backend": backend.name,
            "mlx": bench.mlx_version(),
            "E": problem.experts,
            "K": problem.k,
            "N": problem.n,
            "top_k": top_k,
            "mode": problem.mode,
            "bits": problem.bits,
            "group_size": problem.group_size,
            "dtype": problem.dtype,
            "m": m,
            "router": router,
            "seed": seed,
        }

    @property
    def case(self):
        if self._case is None:
            self._case = self.bench.prepare(self.problem, self.m, self.top_k, self.router, self.seed, self.backend)
        return self._case

    @property
    def reference(self) -> np.ndarray:
        if self._ref is None:
            self._ref = np.asarray(self.bench.reference(self.case), dtype=np.float64)
        return self._ref


class Search:
    """The per-bucket search: verify, then time (exhaustive or successive halving), with every
    step going through the cache."""

    def __init__(self, point: Point, cache: Cache, bench, iters: int, log: Callable[[str], None] | None = None,
                 retry_errors: bool = False, watchdog=None):
        self.point, self.cache, self.bench, self.iters, self.log = point, cache, bench, iters, log
        self.retry_errors = retry_errors
        self.watchdog = watchdog  # watchdog.Watchdog: the per-candidate time limit (None: none)
        self.measured = 0
        self.cached = 0
        self.fns: dict[tuple, Callable] = {}

    def _limit(self, cand: Candidate, key: dict, kind: str):
        """The time limit around one verification or timing. A soft timeout raises ConfigTimeout
        (recorded as an error like any exception); on a hard hang the watchdog writes the same
        record to the cache before it restarts the command, which then skips the candidate."""
        import contextlib

        dog = self.watchdog
        if dog is None or not dog.seconds:
            return contextlib.nullcontext()
        what = f"m={self.point.m} {cand.family} {cand.cid} ({kind})"
        rec = {"status": "error", "error": None,
               "message": f"ConfigTimeout: {what}: no result after {dog.seconds:g} s (--config-timeout)"}
        return dog.limit(what, on_hang=lambda: self.cache.put(key, dict(rec)))

    def _key(self, cand: Candidate, kind: str, iters: int | None = None) -> dict:
        k = dict(self.point.key, family=cand.family, config=cand.cid, kind=kind,
                 src=self.bench.kernel_version(cand.kernel))
        if iters is not None:
            k["iters"] = iters
            k["timer"] = TIMER_VERSION  # timings taken with another timer are not reused
        return k

    def _fn(self, cand: Candidate):
        k = (cand.family, cand.cid)
        if k not in self.fns:
            self.fns[k] = cand.kernel.build(self.point.case, cand.config)
        return self.fns[k]

    def _cached(self, key: dict) -> dict | None:
        rec = self.cache.get(key)
        # an exception may have been the environment's fault (missing backend, out of memory):
        # it is recorded like any result, and re-tried only when asked
        if rec is not None and rec.get("status") == "error" and self.retry_errors:
            return None
        return rec

    def verify(self, cand: Candidate) -> dict:
        key = self._key(cand, "verify")
        rec = self._cached(key)
        if rec is not None:
            self.cached += 1
            return rec
        self.measured += 1
        ref = self.point.reference
        try:
            with self._limit(cand, key, "verify"):
                y = _to_numpy(self._fn(cand)())
            if y.size != ref.size:
                rec = {"status": "wrong", "error": None, "message": f"output has {y.size} values, reference {ref.size}"}
            else:
                y = y.reshape(ref.shape)
                err = _rel_error(y, ref)
                tol = TOLERANCE.get(self.point.problem.dtype, 3e-2)
                ok = err <= tol
                rec = {"status": "ok" if ok else "wrong", "error": err,
                       "message": "" if ok else f"relative error {err:.3g} > {tol:g}"}
        except Exception as e:  # a failing candidate is data, not a crash
            rec = {"status": "error", "error": None, "message": _one_line(e)}
        if rec["status"] != "ok" and self.log:
            self.log(f"  m={self.point.m} {cand.family} {cand.cid}: {rec['status']}: {rec['message']}")
        return self.cache.put(key, rec)

    def time(self, cand: Candidate, iters: int, round: int = 0) -> dict:
        """One timing; `round` > 0: a repeat in the final interleaved rounds (its own cache key)."""
        key = self._key(cand, "time" if round == 0 else f"final{round}", iters)
        rec = self._cached(key)
        if rec is not None:
            self.cached += 1
            return rec
        self.measured += 1
        try:
            with self._limit(cand, key, "time"):
                t = self.bench.time(self._fn(cand), iters)
            wb = self.bench.weight_bytes(self.point.case)
            rec = {"status": "ok", "time_us": t[0], "time_us_p10": t[1], "time_us_p90": t[2],
                   "gbps": wb / (t[0] * 1e-6) / 1e9 if t[0] > 0 else None}
        except Exception as e:
            rec = {"status": "error", "message": _one_line(e)}
        return self.cache.put(key, rec)


def _to_numpy(y) -> np.ndarray:
    import mlx.core as mx

    if isinstance(y, (list, tuple)):
        y = y[0]
    if isinstance(y, mx.array):
        return np.asarray(y.astype(mx.float32), dtype=np.float64)
    return np.asarray(y, dtype=np.float64)


def _rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    if not np.isfinite(y).all():
        return float("inf")
    scale = max(float(np.abs(ref).max()), 1e-30)
    return float(np.abs(y - ref).max() / scale)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def candidates(point: Point, kernels: Sequence, budget: Budget, seed: int) -> tuple[list[Candidate], int]:
    """(candidates in evaluation order, size of the valid space). Exhaustive spaces keep their
    natural order. Otherwise each config gets a pseudo-random rank from a hash of (seed, shape,
    family, config), not of m: every bucket of a shape ranks the configs the same way (even
    where validity differs), so buckets share their sample and each config compiles once.
    Families then take turns."""
    per_family = []
    for k in kernels:
        configs = list(k.configs(point.case))
        per_family.append([Candidate(k, c) for c in configs])
    size = sum(len(f) for f in per_family)
    if budget.exhaustive(size):
        return [c for f in per_family for c in f], size
    shape = {x: point.key[x] for x in ("E", "K", "N", "mode", "bits", "group_size", "dtype", "backend")}

    def rank(c: Candidate) -> str:
        return hashlib.sha1(json.dumps({**shape, "seed": seed, "family": c.family, "config": c.cid},
                                       sort_keys=True).encode()).hexdigest()

    shuffled = [sorted(f, key=rank) for f in per_family if f]
    out = []
    for i in range(max((len(f) for f in shuffled), default=0)):
        out.extend(f[i] for f in shuffled if i < len(f))
    if budget.configs is not None:
        out = out[: budget.configs]
    elif budget.seconds is None:
        out = out[:DEFAULT_CONFIG_BUDGET]
    return out, size


def _final_rounds(s: "Search", finalists: list, iters: int, over) -> None:
    """Re-time `finalists` ((Candidate, Result) pairs) in FINAL_ROUNDS interleaved rounds and set
    each Result's time to the median of all its timings (p10/p90: the spread across them)."""
    times = {id(r): [r.time_us] for _, r in finalists}
    for rnd in range(1, FINAL_ROUNDS + 1):
        for c, r in finalists:
            if over():
                break
            rec = s.time(c, iters, round=rnd)
            if rec.get("status") == "ok" and rec.get("time_us"):
                times[id(r)].append(rec["time_us"])
    wb = s.bench.weight_bytes(s.point.case)
    for _, r in finalists:
        ts = sorted(times[id(r)])
        if len(ts) > 1:
            r.time_us = float(np.median(ts))
            r.time_us_p10, r.time_us_p90 = ts[0], ts[-1]
            r.gbps = wb / (r.time_us * 1e-6) / 1e9
            r.rounds = len(ts)


def rung_iters(iters: int, exhaustive: bool) -> list[int]:
    """Timing iterations per successive-halving rung: cheap first, full at the end."""
    if exhaustive:
        return [iters]
    out = []
    for it in (max(1, iters // 9), max(1, iters // 3), iters):
        if not out or it > out[-1]:
            out.append(it)
    return out


def tune_bucket(point: Point, kernels: Sequence, stock, *, budget: Budget, cache: Cache, bench, iters: int,
                seed: int = 0, log=None, retry_errors: bool = False, watchdog=None, progress=None) -> BucketResult:
    """`progress`: an object with start(total) / step() / note(text) (the CLI's tqdm bar)."""
    t_start = time.perf_counter()
    deadline = t_start + budget.seconds if budget.seconds is not None else None
    s = Search(point, cache, bench, iters, log, retry_errors, watchdog)
    try:
        cands, size = candidates(point, kernels, budget, seed)
    except Exception as e:  # noqa: BLE001 (the inputs could not be made, e.g. too large: recorded, go on)
        return BucketResult(point.m, None, None, [], s.measured, s.cached, time.perf_counter() - t_start,
                            error=f"preparing inputs: {_one_line(e)}")
    exhaustive = budget.exhaustive(size)
    if progress is not None:
        progress.start(len(cands) + (stock is not None))
    results: dict[tuple, Result] = {}

    def over(frac: float = 1.0) -> bool:
        return deadline is not None and time.perf_counter() >= t_start + frac * budget.seconds

    # stock first: the speedup's denominator (its own failure is recorded, not fatal)
    stock_res = None
    if stock is not None:
        sc = Candidate(stock, None)
        r = s.time(sc, iters)
        stock_res = Result(stock.name, None, r["status"], time_us=r.get("time_us"), time_us_p10=r.get("time_us_p10"),
                           time_us_p90=r.get("time_us_p90"), iters=iters, gbps=r.get("gbps"), message=r.get("message", ""))
        if progress is not None:
            progress.step()

    rungs = rung_iters(iters, exhaustive)
    timed: dict[tuple, dict] = {}  # candidate -> its timing at the highest rung reached

    def time_one(c: Candidate, it: int) -> bool:
        rec = s.time(c, it)
        res = results[(c.family, c.cid)]
        if rec["status"] != "ok":
            res.status, res.message = "error", rec.get("message", "")
            timed.pop((c.family, c.cid), None)
            return False
        res.time_us, res.time_us_p10, res.time_us_p90 = rec["time_us"], rec.get("time_us_p10"), rec.get("time_us_p90")
        res.gbps, res.iters = rec.get("gbps"), it
        timed[(c.family, c.cid)] = rec
        return True

    # rung 0: verify each candidate, then time it cheaply. A seconds budget spends at most half
    # its time here, leaving the rest for the higher rungs.
    reached: list[Candidate] = []
    for c in cands:
        if over(0.5 if len(rungs) > 1 else 1.0):
            results[(c.family, c.cid)] = Result(c.family, c.config, "skipped", message="budget")
            if progress is not None:
                progress.step()
            continue
        v = s.verify(c)
        results[(c.family, c.cid)] = Result(c.family, c.config, v["status"], v.get("error"), message=v.get("message", ""))
        if v["status"] == "ok" and time_one(c, rungs[0]):
            reached.append(c)
        if progress is not None:
            progress.step()
    if progress is not None and len(reached) > 1:
        progress.note("re-timing the fastest")
    # successive halving: the best 1/ETA of each rung is re-timed with more iterations
    for it in rungs[1:]:
        if len(reached) <= 1 or over():
            break
        reached.sort(key=lambda c: timed[(c.family, c.cid)]["time_us"])
        survivors = reached[: max(1, math.ceil(len(reached) / ETA))]
        reached = [c for c in survivors if not over() and time_one(c, it)]
    best = None
    if timed:
        # the winner is the fastest among those timed at the highest rung reached, after the
        # finalists (and stock) are re-timed in interleaved rounds
        top = max(results[k].iters or 0 for k in timed)
        pool = [results[k] for k in timed if results[k].iters == top and results[k].status == "ok"]
        pool.sort(key=lambda r: r.time_us)
        by_key = {(c.family, c.cid): c for c in cands}
        finalists = [(by_key[(r.family, r.config_id)], r) for r in pool[:FINALISTS]]
        if stock_res is not None and stock_res.status == "ok":
            finalists.append((Candidate(stock, None), stock_res))
        if len(finalists) > 1:
            _final_rounds(s, finalists, top, over)
        best = min(pool, key=lambda r: r.time_us) if pool else None
    return BucketResult(point.m, best, stock_res, list(results.values()), s.measured, s.cached,
                        time.perf_counter() - t_start)


# --- the bench: how problems become inputs, references and timings (H-sweep's measure/sweep) --


class Bench:
    """Adapter over measure.py / sweep.py / formats.py. Tests may subclass it (e.g. a fake timer);
    the tuner itself only calls these methods."""

    def device_name(self) -> str:
        from .tables import device_name

        return device_name(self.backend_name)

    def __init__(self, backend_name: str):
        self.backend_name = backend_name

    def mlx_version(self) -> str:
        import mlx.core as mx

        return mx.__version__

    def prepare(self, problem: Problem, m: int, top_k: int, router: str, seed: int, backend):
        """The case, after asking whether it fits in memory (MemoryError if not: the bucket is
        recorded as failed and the tune goes on)."""
        from . import measure

        why = measure.fits(measure.point_memory(problem, m, top_k, router, verify=True))
        if why:
            raise MemoryError(f"the inputs of m={m} would not fit in memory: {why}")
        return measure.prepare_case(problem, m=m, top_k=top_k, router=router, seed=seed, backend=backend)

    def reference(self, case) -> np.ndarray:
        """(P, N) float64 in the sorted layout's row order. Small problems: the numpy reference
        (formats.py, exact dequantization); large ones: MLX dequantize + float32 gather_mm
        (measure.case_reference), which never touches a quantized kernel either."""
        from . import measure

        p = case.problem
        if p.experts * p.n * p.k <= NUMPY_REFERENCE_MAX_WEIGHTS:
            from . import formats

            w, sc, b = case.weights(0)
            y = formats.reference_gather_qmm(case.x_sorted, w, sc, b, case.idx_sorted, group_size=p.group_size,
                                             bits=p.bits, mode=p.mode)
            return np.asarray(y, dtype=np.float64).reshape(case.rows, p.n)
        return measure.case_reference(case)

    def time(self, fn: Callable, iters: int) -> tuple[float, float, float]:
        from . import measure

        t = measure.time_fn(fn, iters=iters)
        return (t.median_us, t.p10_us, t.p90_us)

    def weight_bytes(self, case) -> int:
        return int(case.weight_bytes)

    def kernel_version(self, kernel) -> str:
        """Hash of the kernel's source text: an edited kernel is re-verified, not trusted.
        Read once per kernel object (sources do not change within a run)."""
        memo = self.__dict__.setdefault("_versions", {})
        if id(kernel) not in memo:
            memo[id(kernel)] = (kernel, _source_hash(kernel))  # holding kernel keeps its id unique
        return memo[id(kernel)][1]

    def kernels(self, families: Sequence[str] | None):
        """Every kernel family of the registry, run through the public op
        (`ops.gather_qmm(family=..., config=...)`) on mlx-lm's sorted layout: exactly what a
        table entry will make the op run, and the layout the reference is computed in. Other
        `tuned.*` sweep kernels are offered too."""
        from . import sweep

        sweep.load_registry()
        available = {n: k for n, k in sweep.KERNELS.items() if n.startswith("tuned.")}
        default = []
        try:
            from .kernels import registry

            for name in registry.FAMILIES:
                available[f"tuned.{name}"] = _op_kernel(registry.FAMILIES[name])
                default.append(f"tuned.{name}")
        except ImportError:
            pass
        if families:
            want = [f if f.startswith("tuned.") else f"tuned.{f}" for f in families]
            unknown = [f for f in want if f not in available]
            if unknown:
                raise ValueError(f"unknown kernel family {', '.join(unknown)}; available: "
                                 f"{', '.join(sorted(available)) or 'none'}")
            names = want
        else:
            # the registry's families, less the fused gate+up variant (a different op); sweep-only
            # kernels such as tuned.auto (the op's own pick) are no tile space to search
            names = sorted(n for n in default if "glu" not in n)
        return [available[n] for n in names]

    def stock(self):
        from . import sweep

        return sweep.KERNELS.get("stock.gather_qmm")


def _source_hash(kernel) -> str:
    v = getattr(kernel, "version", None)
    if v is not None:
        return str(v)
    srcs = getattr(getattr(kernel, "family", None), "sources", None)
    if not srcs:
        return ""
    h = hashlib.sha1()
    for d in sorted(srcs):
        body, header = srcs[d].text()
        h.update(body.encode())
        h.update(header.encode())
    return h.hexdigest()[:12]


def _op_kernel(family):
    """A SweepKernel for one family through `ops.gather_qmm` on mlx-lm's sorted layout."""
    from . import sweep

    def configs(case):
        return family.valid_configs(case.problem, case.backend)

    def build(case, config):
        from . import ops
        from .kernels.plan import make_plan

        p = case.problem
        plan = make_plan(case.idx_sorted, p.experts, sorted_indices=True)
        nxt = case.rotation()

        def fn():
            w, s, b = nxt()
            return ops.gather_qmm(case.x_sorted, w, s, b, case.idx_sorted, group_size=p.group_size, bits=p.bits,
                                  mode=p.mode, sorted_indices=True, family=family.name, config=config, plan=plan,
                                  backend=case.backend, validate=False)

        return fn

    return sweep.SweepKernel(f"tuned.{family.name}", configs, build, family=family)


# --- the whole tune -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    E: int
    K: int
    N: int
    top_k: int
    mode: str = "affine"
    bits: int = 4
    group_size: int = 64
    dtype: str = "bfloat16"
    name: str = ""  # the preset's matrix name (gate_up, down, ...), for reports

    def problem(self, m: int) -> Problem:
        return Problem(experts=self.E, k=self.K, n=self.N, rows=m * self.E, bits=self.bits,
                       group_size=self.group_size, mode=self.mode, dtype=self.dtype, m=float(m))


@dataclass
class TuneReport:
    tables: list = field(default_factory=list)  # tables.Table, one per shape
    paths: list[Path] = field(default_factory=list)
    buckets: dict = field(default_factory=dict)  # (E,K,N) -> list[BucketResult]
    shapes: dict = field(default_factory=dict)  # Shape -> list[BucketResult]
    skipped: list = field(default_factory=list)  # (Shape, m) not started before the deadline
    router: str = "balanced"
    seed: int = 0
    measured: int = 0
    cached: int = 0
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        """Every candidate of every bucket as sweep-style rows (for heatmaps and reports)."""
        out = []
        for shape, brs in self.shapes.items():
            for br in brs:
                for r in ([br.stock] if br.stock else []) + br.results:
                    out.append(dict(kernel=r.family, config=r.config_id, matrix=shape.name, m=br.m,
                                    tokens=-(-br.m * shape.E // shape.top_k), experts=shape.E,
                                    top_k=shape.top_k, k=shape.K, n=shape.N, mode=shape.mode,
                                    bits=shape.bits, group_size=shape.group_size, dtype=shape.dtype,
                                    router=self.router, seed=self.seed, time_us=r.time_us, time_us_p10=r.time_us_p10, time_us_p90=r.time_us_p90,
                                    gbps=r.gbps, iters=r.iters, status=r.status, error=r.error,
                                    chosen=br.best is r, message=r.message))
        return out


def tune(
    shapes: Shape | Sequence[Shape],
    ms: Iterable[int] = (1, 2, 4, 8, 16, 32, 64),
    *,
    families: Sequence[str] | Sequence[Any] | None = None,
    backend=None,
    budget: Budget | str | int | None = None,
    iters: int = 30,
    router: str = "balanced",
    seed: int = 0,
    table_dir: str | os.PathLike | None = None,
    write: bool = True,
    cache: Cache | str | os.PathLike | None = "default",
    bench: Bench | None = None,
    stock: bool = True,
    log: Callable[[str], None] | None = None,
    meta: dict | None = None,
    retry_errors: bool = False,
    deadline_s: float | None = None,
    config_timeout: float | None = None,
    restart_argv: Sequence[str] | None = None,
    progress=None,
) -> TuneReport:
    """Tune every (shape, m) and write one table per shape (to the user table dir unless
    `table_dir`). `families` are names (`qmv`, `tuned.qmm`) or SweepKernel-like objects.
    `deadline_s`: no new m bucket starts after this many seconds (what is done is kept).
    `config_timeout`: seconds one candidate's verification or timing may take (watchdog.py);
    `restart_argv`: the command to re-exec after a hard hang (the cache makes it resume).
    `progress`: start(total) / step() / note(text) / bucket(text) callbacks (the CLI's bar).

    After every bucket the shape's table is rewritten (atomically) with the buckets done so far
    plus the previous table's other buckets, so a run killed between two buckets leaves a valid
    table and loses nothing; the finished run's table holds this run's buckets only."""
    from . import tables
    from .backend import get_backend
    from .watchdog import Watchdog

    b = get_backend(backend)
    bench = bench or Bench(b.name)
    budget = Budget.parse(budget)
    if not isinstance(cache, Cache):
        cache = Cache(default_cache_path() if cache == "default" else cache)
    if isinstance(shapes, Shape):
        shapes = [shapes]
    ms = sorted({int(m) for m in ms})
    if not ms or ms[0] < 1:
        raise ValueError(f"m buckets must be >= 1 (got {ms})")
    if families and not all(isinstance(f, str) for f in families):
        kernels = list(families)
    else:
        kernels = bench.kernels(families)
    if not kernels:
        raise ValueError("no kernel family to tune (none registered for this build)")
    # a restart can only resume what the cache remembers
    dog = Watchdog(config_timeout, restart_argv=restart_argv if cache.path is not None else None)
    stock_kernel = bench.stock() if stock else None
    report = TuneReport(router=router, seed=seed)
    t0 = time.perf_counter()
    out_dir = tables.user_dir(table_dir)

    def make_table(shape, brs, previous=None):
        buckets = [_bucket(br) for br in brs if br.best is not None]
        extra = {}
        if previous is not None:  # a partial table: keep the previous table's other buckets
            done = {bk.m for bk in buckets}
            kept = [bk for bk in previous.buckets if bk.m not in done]
            buckets += kept
            extra["partial"] = {"done": sorted(done), "kept_from_previous_table": sorted(bk.m for bk in kept)}
        return tables.Table(
            backend=b.name, device=bench.device_name(), mode=shape.mode, bits=shape.bits,
            group_size=shape.group_size, dtype=shape.dtype, E=shape.E, K=shape.K, N=shape.N,
            mlx_version=bench.mlx_version(),
            buckets=buckets,
            meta=dict(
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                package_version=_package_version(), top_k=shape.top_k, router=router, seed=seed, iters=iters,
                budget={"configs": budget.configs, "seconds": budget.seconds},
                # chosen GB/s = median of 1 + final_rounds timings of the best `finalists` and stock
                finalists=FINALISTS, final_rounds=FINAL_ROUNDS,
                candidates={str(br.m): _counts(br) for br in brs},
                # which kernel sources the choices were measured with (a later edit may change them)
                kernel_sources={k.name: bench.kernel_version(k) for k in kernels},
                commit=_commit(),
                **extra,
                **(meta or {}),
            ),
        )

    n_buckets, i_bucket = len(shapes) * len(ms), 0
    for shape in shapes:
        brs = []
        previous = _previous_table(tables, out_dir, make_table(shape, [])) if write else None
        for m in ms:
            i_bucket += 1
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                report.skipped.append((shape, m))
                if log:
                    log(f"E={shape.E} K={shape.K} N={shape.N} m={m}: skipped (deadline {deadline_s:g} s)")
                continue
            if progress is not None:
                progress.bucket(f"tune {i_bucket}/{n_buckets} N={shape.N} m={m}")
            point = Point(bench, shape.problem(m), m, shape.top_k, router, seed, b)
            br = tune_bucket(point, kernels, stock_kernel, budget=budget, cache=cache, bench=bench, iters=iters,
                             seed=seed, log=log, retry_errors=retry_errors, watchdog=dog, progress=progress)
            brs.append(br)
            report.measured += br.measured
            report.cached += br.cached
            if log:
                log(_bucket_line(shape, br))
            if write and br.best is not None and m != ms[-1]:
                tables.write_table(make_table(shape, brs, previous or _EMPTY), out_dir)
        report.buckets[(shape.E, shape.K, shape.N)] = brs
        report.shapes[shape] = brs
        table = make_table(shape, brs)
        report.tables.append(table)
        if write and table.buckets:
            report.paths.append(tables.write_table(table, out_dir))
            _forget_choices()
    report.seconds = time.perf_counter() - t0
    return report


class _Empty:
    buckets: list = []


_EMPTY = _Empty()


def _previous_table(tables, directory: Path, like):
    """The table already written for `like`'s key in `directory` (None: none, or unreadable)."""
    path = Path(directory) / like.filename
    try:
        return tables.read_table(path) if path.is_file() else None
    except (ValueError, KeyError, TypeError, OSError):
        return None


def _forget_choices() -> None:
    """The op memoizes its table lookups: a table written now must be seen by the next call."""
    from . import tables

    tables.clear_cache()
    try:
        from . import ops

        ops.clear_choice_cache()
    except (ImportError, AttributeError):
        pass


def _bucket(br: BucketResult):
    from .tables import Bucket

    name = br.best.family
    name = name[len("tuned."):] if name.startswith("tuned.") else name
    stock = br.stock.gbps if br.stock is not None and br.stock.status == "ok" else None
    return Bucket(m=br.m, family=name, config=dict(br.best.config) if br.best.config else None,
                  gbps=_r(br.best.gbps), time_us=_r(br.best.time_us), stock_gbps=_r(stock),
                  speedup=_r(br.best.gbps / stock) if stock and br.best.gbps else None)


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


def _counts(br: BucketResult) -> dict:
    out: dict[str, int] = {}
    for r in br.results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def _commit() -> str | None:
    try:
        from .sweep import _git_commit

        return _git_commit()
    except ImportError:
        return None


def _package_version() -> str:
    from . import __version__

    return __version__


def _bucket_line(shape: Shape, br: BucketResult) -> str:
    c = _counts(br)
    counts = " ".join(f"{k}={v}" for k, v in sorted(c.items()))
    if br.error:
        return f"E={shape.E} K={shape.K} N={shape.N} m={br.m}: failed: {br.error}"
    if br.best is None:
        return f"E={shape.E} K={shape.K} N={shape.N} m={br.m}: no valid candidate ({counts})"
    stock = f"{br.stock.gbps:.4g}" if br.stock is not None and br.stock.gbps else "-"
    return (f"E={shape.E} K={shape.K} N={shape.N} m={br.m}: {br.best.family} {br.best.config_id} "
            f"{br.best.gbps or 0:.4g} GB/s (stock {stock}) [{counts}; measured {br.measured}, cached {br.cached}, "
            f"{br.seconds:.1f}s]")


# --- after a tune: does the table reproduce, and how good is the heuristic? -----------------


def _kernel_for(bench, family: str, kernels: Sequence | None = None):
    for k in kernels or ():
        if k.name in (family, f"tuned.{family}"):
            return k
    return bench.kernels([family])[0]


def _measure_choice(point: Point, kernel, config, cache: Cache, bench, iters: int) -> Result:
    s = Search(point, cache, bench, iters)
    c = Candidate(kernel, config)
    v = s.verify(c)
    if v["status"] != "ok":
        return Result(c.family, config, v["status"], v.get("error"), message=v.get("message", ""))
    t = s.time(c, iters)
    return Result(c.family, config, t["status"], v.get("error"), t.get("time_us"), t.get("time_us_p10"),
                  t.get("time_us_p90"), iters, t.get("gbps"), t.get("message", ""))


def recheck(report: "TuneReport | Sequence", shapes: Sequence[Shape] | None = None, *, backend=None,
            bench: Bench | None = None, kernels: Sequence | None = None, iters: int = 30, router: str = "balanced",
            seed: int = 1, rounds: int = 1 + FINAL_ROUNDS, log=None, label: str = "recheck") -> list[dict]:
    """Re-measure every table's chosen configs from scratch (fresh inputs: another seed, no
    cache) and compare with the GB/s the table recorded. `ratio` = rerun / recorded, the rerun
    being the median of `rounds` interleaved timings (as the tables' finalists are).
    `report`: a TuneReport or a list of tables.Table (e.g. the shipped ones: `check_tables`);
    `shapes` default to the tables' own (top_k from the table's meta)."""
    from .backend import get_backend

    b = get_backend(backend)
    bench = bench or Bench(b.name)
    tabs = list(report.tables if isinstance(report, TuneReport) else report)
    by_shape = {(s.E, s.K, s.N): s for s in shapes or ()}
    rows = []
    for t in tabs:
        shape = by_shape.get((t.E, t.K, t.N)) or table_shape(t)
        # First pass: verify + one timing per bucket; then `rounds - 1` more timings of every
        # bucket in turn, so a slow stretch of the device costs one timing of many buckets
        # rather than every timing of one (the protocol of the tables' finalists).
        done = []
        for bk in t.buckets:
            point = Point(bench, shape.problem(bk.m), bk.m, shape.top_k, router, seed, b)
            kernel = _kernel_for(bench, bk.family, kernels)
            r = _measure_choice(point, kernel, bk.config, Cache(None), bench, iters)
            done.append((bk, point, kernel, r, [r.time_us] if r.status == "ok" and r.time_us else []))
        for rnd in range(1, rounds):
            for bk, point, kernel, r, times in done:
                if times:
                    rec = Search(point, Cache(None), bench, iters).time(Candidate(kernel, bk.config), iters, round=rnd)
                    if rec.get("status") == "ok" and rec.get("time_us"):
                        times.append(rec["time_us"])
        for bk, point, kernel, r, times in done:
            gbps = bench.weight_bytes(point.case) / (float(np.median(times)) * 1e-6) / 1e9 if times else None
            ratio = gbps / bk.gbps if gbps and bk.gbps else None
            row = dict(E=t.E, K=t.K, N=t.N, m=bk.m, family=bk.family, config=r.config_id,
                       recorded_gbps=bk.gbps, rerun_gbps=_r(gbps), ratio=_r(ratio, 4), status=r.status,
                       rounds=len(times), within_10pct=ratio is not None and abs(ratio - 1) <= 0.10)
            rows.append(row)
            if log:
                log(check_line(row, label, r.message))
    return rows


def check_line(row: dict, label: str = "check", message: str = "") -> str:
    """One bucket of a check or recheck; its verdict is the one the summary counts."""
    head = f"{label} E={row['E']} K={row['K']} N={row['N']} m={row['m']} {row['family']} {row['config']}: "
    if row["status"] != "ok" or row["rerun_gbps"] is None:
        why = f": {message}" if message else ""
        return head + f"not measured ({row['status']}{why})"
    verdict = "within 10%" if row["within_10pct"] else "OUTSIDE 10%"
    ratio = f"ratio {row['ratio']:.3g}" if row["ratio"] is not None else "no recorded GB/s"
    return (head + f"{verdict} (rerun {row['rerun_gbps']:.4g} GB/s vs recorded {row['recorded_gbps']} GB/s, {ratio}, "
            f"median of {row['rounds']})")


def check_summary(rows: list[dict], label: str = "check") -> str:
    ok = sum(r["within_10pct"] for r in rows)
    unmeasured = sum(r["status"] != "ok" or r["rerun_gbps"] is None for r in rows)
    rest = len(rows) - ok - unmeasured
    return (f"{label}: {ok}/{len(rows)} buckets within 10% of their recorded GB/s"
            f" ({rest} outside, {unmeasured} not measured)")


def table_shape(t) -> Shape:
    """The Shape a table was tuned for (top_k from its meta; 8 if an old table lacks it)."""
    return Shape(t.E, t.K, t.N, int((t.meta or {}).get("top_k") or 8), t.mode, t.bits, t.group_size, t.dtype)


def check_tables(table_dir=None, *, backend=None, bench: Bench | None = None, iters: int = 30, seed: int = 1,
                 log=None, only: tuple[int, int, int] | None = None) -> list[dict]:
    """Re-measure the tables this machine would use (user dir, $MLX_MOE_TUNE_TABLES, shipped; or
    only `table_dir`) whose backend and device are this one's: does each bucket reproduce?"""
    from . import tables as tb
    from .backend import get_backend

    b = get_backend(backend)
    bench = bench or Bench(b.name)
    dirs = [Path(table_dir)] if table_dir is not None else tb.table_dirs()
    dev = bench.device_name()
    mine = []
    for d in dirs:
        for t, why in tb.load_dir(d):
            if t is not None and t.backend == b.name and t.device == dev and (only is None or (t.E, t.K, t.N) == only):
                mine.append(t)
    if not mine:
        raise ValueError(f"no tuning table for backend {b.name} on {dev} in {', '.join(map(str, dirs))}")
    return recheck(mine, backend=b, bench=bench, iters=iters, seed=seed, log=log, label="check")


def heuristic_gap(report: TuneReport, shapes: Sequence[Shape], *, backend=None, bench: Bench | None = None,
                  kernels: Sequence | None = None, cache: Cache | None = None, iters: int = 30,
                  router: str = "balanced", seed: int = 0, log=None) -> list[dict]:
    """Hold each tuned shape back in turn, ask `tables.heuristic` (fed every other table) and
    `tables.rule` (no table) for a choice, measure both on the held-back shape and compare with
    the tuned choice. `gap` = 1 - heuristic GB/s / tuned GB/s (0 = as good as tuning)."""
    from . import tables as tb
    from .backend import get_backend

    b = get_backend(backend)
    bench = bench or Bench(b.name)
    cache = cache or Cache(None)
    by_shape = {(s.E, s.K, s.N): s for s in shapes}
    rows = []
    for t in report.tables:
        shape = by_shape[(t.E, t.K, t.N)]
        pool = [o for o in report.tables if o is not t]
        for bk in t.buckets:
            problem = shape.problem(bk.m)
            point = Point(bench, problem, bk.m, shape.top_k, router, seed, b)
            row = dict(E=t.E, K=t.K, N=t.N, m=bk.m, tuned_family=bk.family, tuned_config=_cid(bk.config),
                       tuned_gbps=bk.gbps)
            for name, choice in (("heuristic", tb.heuristic(problem, b, m=bk.m, pool=pool)),
                                 ("rule", tb.rule(problem, b, m=bk.m))):
                if choice is None:
                    row.update({f"{name}_source": None, f"{name}_gbps": None, f"{name}_gap": None})
                    continue
                r = _measure_choice(point, _kernel_for(bench, choice.family, kernels), choice.config, cache, bench,
                                    iters)
                row.update({f"{name}_source": choice.source, f"{name}_family": choice.family,
                            f"{name}_config": _cid(choice.config), f"{name}_gbps": _r(r.gbps),
                            f"{name}_gap": _r(1 - r.gbps / bk.gbps, 4) if r.gbps and bk.gbps else None})
            rows.append(row)
            if log:
                log("gap " + " ".join(f"{k}={v}" for k, v in row.items()))
    return rows


def _cid(config) -> str:
    return config_id(config) if config else ""


# --- command line ---------------------------------------------------------------------------


INTERRUPT_HINT = ("every measurement so far is in the cache and the tables hold the finished buckets: "
                  "rerun the same command to continue")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .backend import add_backend_argument
    from .kernels.registry import add_space_argument
    from .watchdog import DEFAULT_TIMEOUT_S

    p.add_argument("--preset", help="sweep preset(s), comma-separated (sweeps/NAME.toml): their shapes and format "
                   "(default: tiny on the CPU, gemma-26b-a4b on a GPU)")
    p.add_argument("--shape", help="E,K,N,TOPK instead of a preset")
    p.add_argument("--m", default="1..64x2", help="m buckets (rows per expert): 1..64x2 (powers of two), 1..8, 1,3,16")
    p.add_argument("--mode", default=None)
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--budget", default=None,
                   help=f"per m bucket: N configs or Ns seconds (default: exhaustive up to {DEFAULT_CONFIG_BUDGET} configs)")
    p.add_argument("--families", default=None, help="comma-separated kernel families (default: all gather_qmm families)")
    add_space_argument(p)
    add_backend_argument(p, "where the kernels are tuned")
    p.add_argument("--config-timeout", default=None, metavar="SECONDS",
                   help=f"time limit of one candidate's verification or timing; past it the candidate is recorded "
                   f"as an error and the tune goes on (default {DEFAULT_TIMEOUT_S:g}; 0 = none)")
    p.add_argument("--table", default=None, help="directory the tables are written to (default: $MLX_MOE_TUNE_TABLES or ~/.cache/mlx-moe-tune/tables)")
    p.add_argument("--cache", default=None, help="measurement cache, JSONL (default: ~/.cache/mlx-moe-tune/tune-cache.jsonl)")
    p.add_argument("--no-cache", action="store_true", help="measure everything again and record nothing")
    p.add_argument("--retry-errors", action="store_true", help="re-try candidates whose cached result is an exception")
    p.add_argument("--iters", type=int, default=None, help="timing iterations at the last rung (default 30 on a GPU, 3 emulated)")
    p.add_argument("--router", default="balanced")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds: start no new m bucket after this (the tables keep what is done)")
    p.add_argument("--recheck", action="store_true", help="after tuning, re-measure the chosen configs from scratch")
    p.add_argument("--check", action="store_true",
                   help="tune nothing: re-measure the chosen configs of the tables this device uses (or of --table) "
                   "and say which reproduce within 10%%")
    p.add_argument("--heuristic-gap", action="store_true",
                   help="after tuning, measure the untuned heuristic's choice on each shape held back")
    p.add_argument("--isolate", default="auto", choices=["auto", "yes", "no"],
                   help="measure each shape in its own child process (auto: on a real GPU). A process's allocation "
                        "history slows later measurements (H100: -8..-12%%, sweeps/results/h100/repro/alloc-history.csv)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # E,K,N: the child of an isolated --check
    p.add_argument("-o", "--out", default=None, help="directory for tune.csv (every candidate), tune-recheck.json, tune-gap.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no per-bucket lines")


class _Progress:
    """The tune's tqdm bar on stderr: one bar per m bucket over its candidates (verification and
    first timing each), with the bucket's place in the whole tune in its description."""

    def __init__(self, quiet: bool):
        from tqdm import tqdm

        self._tqdm, self.quiet, self.bar = tqdm, quiet, None

    def bucket(self, desc: str) -> None:
        self.close()
        self.bar = self._tqdm(total=0, desc=desc, unit="cand", disable=self.quiet, file=sys.stderr, leave=False)

    def start(self, total: int) -> None:
        if self.bar is not None:
            self.bar.reset(total=total)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        """A log line printed above the bar (stdout), so the bar is not torn."""
        if self.bar is not None and not self.quiet:
            self._tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _write_json(path: Path, rows) -> None:
    from .safeio import atomic_write_text

    atomic_write_text(path, json.dumps(rows, indent=1))


def shapes_from_args(args) -> list[Shape]:
    """One Shape per weight matrix of the preset(s) (comma-separated) or --shape, format
    options applied."""
    from . import presets
    from .backend import gpu_backend
    from .sweep import check_format, parse_shape

    if args.preset and args.shape:
        raise ValueError("give --preset or --shape, not both")
    if args.shape:
        chosen = [presets.custom(*parse_shape(args.shape))]  # E, K, N, TOPK
    else:
        names = [n.strip() for n in (args.preset or ("gemma-26b-a4b" if gpu_backend() else "tiny")).split(",")]
        chosen = [presets.load_preset(n) for n in names if n]
    out = []
    for preset in chosen:
        preset = preset.with_format(args.mode, args.bits, args.group_size, args.dtype)
        check_format(preset.mode, preset.bits, preset.group_size, preset.dtype)
        for mt in preset.matrices:
            if mt.k % preset.group_size:
                raise ValueError(f"matrix {mt.name}: K={mt.k} is not a multiple of group size {preset.group_size}")
            sh = Shape(preset.experts, mt.k, mt.n, preset.top_k, preset.mode, preset.bits, preset.group_size,
                       preset.dtype, mt.name)
            if sh not in out:
                out.append(sh)
    return out


def run(args) -> int:
    from . import sweep
    from .backend import resolve
    from .kernels.registry import set_space_overrides
    from .watchdog import parse_timeout

    set_space_overrides(args.space)
    b = resolve(args.backend, set_device=True)
    timeout = parse_timeout(getattr(args, "config_timeout", None))
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters must be >= 1 (got {args.iters})")
    if args.deadline is not None and not args.deadline > 0:
        raise ValueError(f"--deadline must be seconds > 0 (got {args.deadline:g})")
    for flag, val in (("--table", args.table), ("-o", args.out)):
        if val is not None and Path(val).expanduser().exists() and not Path(val).expanduser().is_dir():
            raise ValueError(f"{flag} {val}: is a file; expected a directory")
    if args.cache is not None and Path(args.cache).expanduser().is_dir():
        raise ValueError(f"--cache {args.cache}: is a directory; expected a .jsonl file")
    if args.check:
        return _check_command(args, b)
    shapes = shapes_from_args(args)
    ms = sweep.parse_m(args.m)
    if args.router == "balanced":
        for sh in shapes:
            bad = [m for m in ms if (m * sh.E) % sh.top_k]
            if bad:
                raise ValueError(f"--m {bad}: balanced routing needs m*E divisible by top_k (E={sh.E}, top_k={sh.top_k})")
    iters = args.iters or (3 if b.emulated else 30)
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    cache_path = None if args.no_cache else Path(args.cache or default_cache_path()).expanduser()
    progress = _Progress(args.quiet)
    log = None if args.quiet else progress.write
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    bench = Bench(b.name)
    if _isolated(args, b, len(shapes)) and cache_path is not None:
        _tune_children(args, shapes, cache_path, log)  # fills the cache; the pass below reads it
    cache = Cache(cache_path)  # read after the children wrote to it
    try:
        rep = tune(shapes, ms, families=families, backend=b, budget=args.budget, iters=iters, router=args.router,
                   seed=args.seed, table_dir=args.table, cache=cache, bench=bench, log=log,
                   retry_errors=args.retry_errors, deadline_s=args.deadline, config_timeout=timeout,
                   restart_argv=getattr(args, "restart_argv", None), progress=progress)
    finally:
        progress.close()
    for p in rep.paths:
        print(f"wrote {p}")
    brs = [br for v in rep.shapes.values() for br in v]
    chosen = sum(br.best is not None for br in brs)
    skipped = f", {len(rep.skipped)} not started (deadline)" if rep.skipped else ""
    print(f"{rep.measured} measurements, {rep.cached} from the cache, {rep.seconds:.1f} s; "
          f"{chosen}/{len(brs) + len(rep.skipped)} buckets chosen{skipped}")
    if out is not None:
        _write_csv(out / "tune.csv", rep.rows(), extra=dict(backend=b.name, device=bench.device_name()))
    failed = False
    # the checks after the tune are independent: one failing must not cost the other
    if args.recheck:
        try:
            rows = recheck(rep, shapes, backend=b, bench=bench, iters=iters, router=args.router, seed=args.seed + 1,
                           log=log)
            ok = sum(r["within_10pct"] for r in rows)
            print(check_summary(rows, "recheck"))
            failed |= ok < len(rows)
            if out is not None:
                _write_json(out / "tune-recheck.json", rows)
        except Exception as e:  # noqa: BLE001 (reported, exit code 1)
            print(f"recheck failed: {_one_line(e)}", file=sys.stderr)
            failed = True
    if args.heuristic_gap:
        try:
            rows = heuristic_gap(rep, shapes, backend=b, bench=bench, cache=cache, iters=iters, router=args.router,
                                 seed=args.seed, log=log)
            for name in ("heuristic", "rule"):
                gaps = [r[f"{name}_gap"] for r in rows if r.get(f"{name}_gap") is not None]
                if gaps:
                    print(f"{name} gap on held-back shapes: mean {np.mean(gaps):.1%}, worst {max(gaps):.1%}")
            if out is not None:
                _write_json(out / "tune-gap.json", rows)
        except Exception as e:  # noqa: BLE001
            print(f"heuristic gap failed: {_one_line(e)}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _isolated(args, b, units: int) -> bool:
    if args.isolate == "auto":
        return not b.emulated and units > 1
    return args.isolate == "yes"


def _child(argv: list[str], log) -> None:
    """Run `mlx-moe-tune tune ARGV` in a fresh process; its stdout goes to `log`."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "mlx_moe_tune.cli", "tune", *argv, "--isolate", "no"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if log:
            log(f"  [child] {line}")
    if proc.returncode not in (0, 1):  # 1: a check or recheck outside 10%, reported by its lines
        raise RuntimeError(f"child process `tune {' '.join(argv)}` failed (exit {proc.returncode}): "
                           f"{proc.stdout.strip().splitlines()[-1:] or ''}")


def _tune_children(args, shapes: Sequence[Shape], cache_path, log) -> None:
    """Tune every shape in its own process (fresh allocations), sharing the measurement cache."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for sh in shapes:
            argv = ["--shape", f"{sh.E},{sh.K},{sh.N},{sh.top_k}", "--mode", sh.mode, "--bits", str(sh.bits),
                    "--group-size", str(sh.group_size), "--dtype", sh.dtype, "--m", args.m, "--cache", str(cache_path),
                    "--router", args.router, "--seed", str(args.seed), "--table", scratch, "-q"]
            for flag, val in (("--backend", args.backend), ("--families", args.families), ("--budget", args.budget),
                              ("--iters", args.iters), ("--config-timeout", getattr(args, "config_timeout", None))):
                if val is not None:
                    argv += [flag, str(val)]
            if args.retry_errors:
                argv.append("--retry-errors")
            if args.deadline is not None:
                left = args.deadline - (time.perf_counter() - t0)
                if left <= 0:
                    break
                argv += ["--deadline", f"{left:.0f}"]
            if log:
                log(f"tuning E={sh.E} K={sh.K} N={sh.N} in a child process")
            _child(argv, log)


def _check_command(args, b) -> int:
    iters = args.iters or (3 if b.emulated else 30)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    only = tuple(int(v) for v in args.only.split(",")) if args.only else None
    rows = None
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    if only is None:
        from . import tables as tb

        dev = Bench(b.name).device_name()
        dirs = [Path(args.table)] if args.table is not None else tb.table_dirs()
        keys = sorted({(t.E, t.K, t.N) for d in dirs for t, _ in tb.load_dir(d)
                       if t is not None and t.backend == b.name and t.device == dev})
        if _isolated(args, b, len(keys)):
            import tempfile

            rows = []
            with tempfile.TemporaryDirectory() as scratch:
                for i, key in enumerate(keys):  # each table in a fresh process, as it was tuned
                    argv = ["--check", "--only", ",".join(map(str, key)), "-o", f"{scratch}/{i}",
                            "--iters", str(iters), "--seed", str(args.seed)]
                    argv += ["--table", args.table] if args.table is not None else []
                    argv += ["--backend", args.backend] if args.backend is not None else []
                    _child(argv, log)
                    rows += json.loads(Path(f"{scratch}/{i}/tune-check.json").read_text())
    if rows is None:
        rows = check_tables(args.table, backend=b, iters=iters, seed=args.seed + 1, log=log, only=only)
    ok = sum(r["within_10pct"] for r in rows)
    print(check_summary(rows, "check"))
    if args.out:
        _write_json(Path(args.out) / "tune-check.json", rows)
    return 0 if ok == len(rows) else 1


def _write_csv(path: Path, rows: list[dict], extra: dict) -> None:
    import pandas as pd

    from .safeio import atomic_write

    df = pd.DataFrame([{**r, **extra} for r in rows])
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


class _CallableModule(types.ModuleType):
    """`mlx_moe_tune.tune(...)` runs `tune()`, while `mlx_moe_tune.tune.Budget` & co. stay this
    module's (exporting the function under the module's own name would hide the module)."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
