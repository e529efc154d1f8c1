"""How a kernel is measured: prepared inputs (`Case`), a timer, cache defeat, a bandwidth probe.

GB/s always means: bytes a call must read from memory (for gather_qmm: the quantized weights,
scales and biases of the *active* experts, each once) / median time of one call.

Timing: warm up (first calls compile), then `iters` samples; each sample builds `batch` calls'
lazy graphs (Python, untimed: in a model that work overlaps the previous step's GPU work), then
times one `mx.eval` of all of them between two `mx.synchronize()` and divides by `batch`, so
MLX's host overhead (~7-8 us per launch on CUDA) overlaps with the GPU instead of being counted
as kernel time. Timing the Python graph building too (as this module did before 2026-11-22)
made small-kernel points host-bound on the H100: op-level GB/s 20-30% low and +-50% between
runs (tuner recheck, sweeps/results/h100/tuner-v1/). `batch` is picked so one sample lasts ~5 ms (the first H100 run used ~1 ms samples
and a batch cap of 16: its medians sat 5-15% above its p10 at small m, host jitter included). We report the median and the 10th/90th
percentiles.

Cache defeat: every call reads the next of `copies` identical copies of the weights, with enough
copies that their total exceeds CACHE_FACTOR x the last-level cache (H100 L2 50 MB, Apple SLC up
to 96 MB). A real model reads a different layer's weights on every call; timing one buffer over
and over would measure L2, not HBM. The method and copy count are recorded per row.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from . import routing
from .backend import Backend, get_backend
from .kernels.family import Problem

CACHE_FACTOR = 3  # copies' total bytes >= 3 x last-level cache
SAMPLE_S = 5e-3  # target duration of one timing sample (batch of calls)
MAX_BATCH = 64
MAX_MEASURE_S = 3.0  # iterations are cut (not below MIN_ITERS) when one point would take longer
MIN_ITERS = 5
GPU_PROBE_BYTES = 512 << 20  # >= 256 MB so no GPU cache holds it
CPU_PROBE_BYTES = 32 << 20
MTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

# Last-level cache by device-name fragment (first match wins); bytes.
_LLC = [
    ("H200", 50 << 20),
    ("H100", 50 << 20),
    ("A100", 40 << 20),
    ("L40", 96 << 20),
    ("Apple", 96 << 20),  # SLC: 8 MB (M1) .. 96 MB (Ultra); assume the largest
]


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def device_name() -> str:
    """The default device's name, e.g. 'NVIDIA H100 80GB HBM3', 'Apple M4 Max', the CPU model."""
    info = mx.device_info(mx.default_device())
    return str(info.get("device_name") or info.get("architecture") or mx.default_device())


def _cpu_llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 32 << 20


def llc_bytes() -> int:
    """Last-level cache of the default device (a conservative guess when unknown)."""
    if not on_gpu():
        return _cpu_llc_bytes()
    name = device_name()
    for frag, size in _LLC:
        if frag.lower() in name.lower():
            return size
    return 64 << 20


def max_copies() -> int:
    # CPU timings are only indicative; keep its copies few so a sweep stays quick.
    return 512 if on_gpu() else 16


def copies_for(nbytes: int, available: int | None = None) -> int:
    """Copies of an `nbytes` buffer needed so their total exceeds CACHE_FACTOR x LLC."""
    need = max(1, math.ceil(CACHE_FACTOR * llc_bytes() / max(nbytes, 1)))
    need = min(need, max_copies())
    return min(need, available) if available else need


def cache_defeat_note(nbytes: int, copies: int) -> str:
    llc = llc_bytes()
    total = nbytes * copies
    ok = "" if total >= 2 * llc else " (below 2x LLC: partly cached)"
    return f"rotate {copies} copies, {total / 1e6:.1f} MB vs LLC {llc / 1e6:.0f} MB{ok}"


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    iters: int
    batch: int
    samples_us: list[float] = field(default_factory=list, repr=False)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def time_fn(fn: Callable[[], object], iters: int | None = None, warmup: int = 3, batch: int | None = None,
            sample_s: float | None = None, max_batch: int | None = None) -> Timing:
    """Time `fn()` (returns mx arrays) as described in the module docstring. `max_batch` caps
    the calls whose outputs one sample holds at once (the sweep sets it from free memory)."""
    iters = iters or (50 if on_gpu() else 10)
    for _ in range(max(warmup, 1)):
        mx.eval(fn())
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    single = max(time.perf_counter() - t0, 1e-7)
    if batch is None:
        batch = int(min(max_batch or MAX_BATCH, MAX_BATCH, max(1, (sample_s or SAMPLE_S) // single)))
    iters = int(max(min(iters, MIN_ITERS), min(iters, MAX_MEASURE_S // (single * batch))))
    samples = []
    for _ in range(iters):
        outs = [fn() for _ in range(batch)]  # lazy: builds the graph only, no GPU work yet
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / batch * 1e6)
        del outs
    return Timing(statistics.median(samples), _pct(samples, 10), _pct(samples, 90), iters, batch, samples)


def decode_chain(case: "Case", f: Callable, calls: int = 32) -> Callable[[], mx.array]:
    """A decode-step benchmark: `calls` dependent calls y = f(y, w, s, b, idx) of one token
    routed to case.top_k random experts, each call's x the previous call's output (so no two
    overlap) and each on the next weight copy. Time it with `time_fn`, divide by `calls`."""
    E, K, k = case.problem.experts, case.problem.k, case.top_k
    nxt = case.rotation()
    idx = [mx.array(np.random.default_rng(i).choice(E, k, replace=False).astype(np.int32).reshape(1, k))
           for i in range(calls)]

    def fn():
        y = mx.random.normal((1, 1, 1, K), key=mx.random.key(0)).astype(case.dtype) * 0.01
        for i in range(calls):
            w, s, b = nxt()
            y = f(y, w, s, b, idx[i]).reshape(-1)[:K].reshape(1, 1, 1, K)
        return y

    return fn


def write_rows(path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Measurement rows (dicts) as CSV with a header: what the H100 scripts commit as data."""
    import csv

    from .safeio import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


# --- routing -------------------------------------------------------------------------------


def tokens_for(router: str, m: int, experts: int, top_k: int) -> int:
    """Tokens giving `m` rows per expert on average (exactly, for the balanced router)."""
    if router == "balanced":
        if (m * experts) % top_k:
            raise ValueError(f"balanced routing needs m*E divisible by top_k (m={m}, E={experts}, top_k={top_k})")
        return m * experts // top_k
    return max(1, math.ceil(m * experts / top_k))


# --- weights and cases ----------------------------------------------------------------------


class WeightSet:
    """Quantized weights of one (E, K, N, format, seed) with identical copies for cache defeat."""

    def __init__(self, experts, k, n, mode, bits, group_size, dtype, seed):
        self.experts, self.k, self.n = experts, k, n
        self.mode, self.bits, self.group_size, self.dtype = mode, bits, group_size, dtype
        key = mx.random.key(seed)
        wf = (mx.random.normal((experts, n, k), key=key) * (1.0 / math.sqrt(k))).astype(MTYPES[dtype])
        q = mx.quantize(wf, group_size=group_size, bits=bits, mode=mode)
        del wf
        self.copies: list[tuple] = [(q[0], q[1], q[2] if len(q) > 2 else None)]
        mx.eval(*[a for a in self.copies[0] if a is not None])
        self._dense: list[mx.array] = []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.copies[0] if a is not None)

    @property
    def expert_bytes(self) -> int:
        return self.nbytes // self.experts

    def ensure(self, copies: int) -> None:
        # `a + 0` makes a new buffer with the same bits (MLX never aliases an op's output).
        while len(self.copies) < copies:
            c = tuple(None if a is None else a + 0 for a in self.copies[0])
            mx.eval(*[a for a in c if a is not None])
            self.copies.append(c)

    def dense(self, copies: int) -> list[mx.array]:
        """Dequantized (E, N, K) weights in the activation dtype, for the unquantized reference."""
        while len(self._dense) < copies:
            if not self._dense:
                w, s, b = self.copies[0]
                d = mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits, mode=self.mode)
                d = d.astype(MTYPES[self.dtype])
            else:
                d = self._dense[0] + 0
            mx.eval(d)
            self._dense.append(d)
        return self._dense[:copies]


_WEIGHTS: dict[tuple, WeightSet] = {}


def weight_set(experts, k, n, mode, bits, group_size, dtype, seed) -> WeightSet:
    """Cached: the sweep and the tuner ask for the same weights at every m. Only the latest
    shape is kept, so a multi-matrix preset does not hold every matrix's copies at once."""
    key = (experts, k, n, mode, bits, group_size, dtype, seed, str(mx.default_device()))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        mx.clear_cache()
        _WEIGHTS[key] = WeightSet(experts, k, n, mode, bits, group_size, dtype, seed)
    return _WEIGHTS[key]


@dataclass
class Case:
    """Prepared inputs of one (shape, format, m, router) point, in both mlx-lm layouts.

    P = tokens * top_k (token, slot) pairs. Sorted layout (mlx-lm's SwitchGLU when
    indices.size >= 64): `x_sorted (P, 1, K)` = x[order // top_k], `idx_sorted (P,)` sorted
    expert ids. Unsorted layout (decode): `x_unsorted (T, 1, 1, K)`, `idx_unsorted (T, top_k)`.
    `plan` = routing.plan(indices) (order, sorted_experts, offsets (E+1,), inv_order).
    Weights: `weights(i)` is copy i % copies as (w (E,N,K*bits/32) uint32, scales, biases or
    None); `rotation()` gives a function returning the next copy per call (cache defeat).
    `weight_bytes`: bytes of the active experts' w+scales+biases, one copy.
    """

    problem: Problem
    m: int
    top_k: int
    tokens: int
    router: str
    seed: int
    backend: Backend  # where tuned kernels run (a GPU backend or the emulator)
    indices: mx.array  # (T, top_k) int32
    x: mx.array  # (T, K)
    x_sorted: mx.array
    idx_sorted: mx.array
    x_unsorted: mx.array
    idx_unsorted: mx.array
    plan: object
    wset: WeightSet
    copies: int
    active_experts: int
    weight_bytes: int
    cache_defeat: str

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def dtype(self):
        return MTYPES[self.problem.dtype]

    @property
    def quant(self) -> dict:
        """Keyword arguments of mx.gather_qmm / mx.quantized_matmul for this format."""
        p = self.problem
        return dict(group_size=p.group_size, bits=p.bits, mode=p.mode)

    def weights(self, i: int = 0) -> tuple:
        return self.wset.copies[i % self.copies]

    def rotation(self) -> Callable[[], tuple]:
        state = {"i": 0}

        def nxt():
            state["i"] += 1
            return self.weights(state["i"] - 1)

        return nxt

    @property
    def flops(self) -> float:
        return 2.0 * self.rows * self.problem.k * self.problem.n


def prepare_case(problem: Problem, m: int, top_k: int, router: str = "balanced", seed: int = 0,
                 backend: Backend | str | None = None, skew: float = 1.2, active: int | None = None) -> Case:
    """Inputs for `m` rows per expert (problem.rows is ignored: the router decides the rows)."""
    E, K = problem.experts, problem.k
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    T = tokens_for(router, m, E, top_k)
    wset = weight_set(E, K, problem.n, problem.mode, problem.bits, problem.group_size, problem.dtype, seed)
    m_arg = m if router == "balanced" else None  # other routers: T tokens, m rows per expert on average
    indices = routing.route(router, T, E, top_k, m=m_arg, seed=seed, skew=skew, active=active).astype(mx.int32)
    pl = routing.plan(indices, experts=E)
    x = (mx.random.normal((T, K), key=mx.random.key(seed + 1))).astype(MTYPES[problem.dtype])
    flat = indices.reshape(-1)
    x_sorted = x[pl.order // top_k][:, None, :]
    idx_sorted = flat[pl.order]
    active_experts = int(np.unique(np.asarray(flat)).size)
    wbytes = active_experts * wset.expert_bytes
    copies = copies_for(wbytes)
    wset.ensure(copies)
    mx.eval(indices, x, x_sorted, idx_sorted, pl.order, pl.offsets, pl.inv_order)
    prob = Problem(experts=E, k=K, n=problem.n, rows=T * top_k, bits=problem.bits, group_size=problem.group_size,
                   mode=problem.mode, dtype=problem.dtype, m=float(m))
    return Case(prob, m, top_k, T, router, seed, get_backend(backend), indices, x, x_sorted, idx_sorted,
                x.reshape(T, 1, 1, K), indices, pl, wset, copies, active_experts, wbytes,
                cache_defeat_note(wbytes, copies))


def case_reference(case: Case, layout: str = "sorted") -> np.ndarray:
    """float64 y = x @ dequant(W[e]).T computed with MLX dequantize and one float32 matmul per
    expert (no quantized kernel, no gather kernel involved: MLX-CUDA 0.32.4's float32 gather_mm
    on sorted indices gave wrong rows on the H100 once an expert had more than one row).
    `sorted`: (P, N) in x_sorted's row order; `unsorted`: (T, top_k, N)."""
    w, s, b = case.weights(0)
    p = case.problem
    xs = case.x_sorted.reshape(case.rows, p.k).astype(mx.float32)
    idx = np.asarray(case.idx_sorted).reshape(-1)
    if idx.size and np.any(np.diff(idx) < 0):
        raise ValueError("case.idx_sorted is not sorted")
    cuts = [0, *(np.flatnonzero(np.diff(idx)) + 1).tolist(), idx.size]
    parts = []
    for a, e in zip(cuts[:-1], cuts[1:]):  # one expert dequantized at a time: memory stays ~N*K floats
        if e > a:
            ex = int(idx[a])
            wd = mx.dequantize(w[ex], s[ex], None if b is None else b[ex], group_size=p.group_size, bits=p.bits,
                               mode=p.mode).astype(mx.float32)
            parts.append(xs[a:e] @ wd.T)
            mx.eval(parts[-1])
    y = mx.concatenate(parts, axis=0) if parts else mx.zeros((0, p.n), dtype=mx.float32)
    if layout == "unsorted":
        y = y[case.plan.inv_order].reshape(case.tokens, case.top_k, p.n)
    elif layout != "sorted":
        raise ValueError(f"layout must be 'sorted' or 'unsorted', got {layout!r}")
    return np.asarray(y, dtype=np.float64)


# --- memory: will a point fit? -------------------------------------------------------------
# The sweep asks before it allocates, so a point too large for this device becomes a
# `skipped: memory` row instead of an out-of-memory crash. Estimates are upper bounds of what
# prepare_case and one timing sample hold at once, with MEMORY_MARGIN on top.

MEMORY_MARGIN = 1.2


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_available() -> int | None:
    """Bytes this process's MLX arrays may occupy: on a GPU the device's memory (Metal: its
    recommended working set) capped by MLX's memory limit; on the CPU the machine's RAM that is
    free now (plus what MLX already holds), capped the same way. None when unknown."""
    info = mx.device_info()
    limits = []
    with_limit = getattr(mx, "get_memory_limit", None)
    if with_limit is not None:
        limits.append(int(with_limit()))
    if on_gpu():
        dev = info.get("max_recommended_working_set_size") or info.get("memory_size") or info.get("total_memory")
        if dev:
            limits.append(int(dev))
    else:
        ram = _ram_bytes()
        if ram:
            limits.append(ram)
        free = _meminfo_available()
        if free is not None:
            held = int(mx.get_active_memory()) + int(mx.get_cache_memory())
            limits.append(free + held)
    limits = [v for v in limits if v > 0]
    return min(limits) if limits else None


def weight_copy_bytes(problem: Problem) -> int:
    """Bytes of one copy of all E experts' quantized weights, scales and biases."""
    E, N, K = problem.experts, problem.n, problem.k
    groups = E * N * (K // problem.group_size)
    if problem.mode == "affine":
        per_group = 2 * mx.array(0, dtype=MTYPES[problem.dtype]).itemsize  # scale + bias
    else:
        per_group = 1  # E8M0 / E4M3 scales
    return E * N * K * problem.bits // 8 + groups * per_group


def point_memory(problem: Problem, m: int, top_k: int, router: str = "balanced", verify: bool = False) -> int:
    """Upper bound of what `prepare_case` allocates for this point (weights with their copies,
    the float weights quantize() starts from, x in both layouts, routing), plus the float32
    reference of a verification when `verify`."""
    E, N, K = problem.experts, problem.n, problem.k
    item = mx.array(0, dtype=MTYPES[problem.dtype]).itemsize
    T = tokens_for(router, m, E, top_k)
    P = T * top_k
    one = weight_copy_bytes(problem)
    active = min(E, P)
    copies = copies_for(active * one // E)
    total = one * copies + E * N * K * (4 + item)  # float32 normal -> dtype -> quantize
    total += T * K * item + P * K * item + P * 4 * 6  # x, x_sorted, indices and plan
    if verify:
        total += (P * K + N * K + 2 * P * N) * 4  # float32 x, one dequantized expert, y
    return int(total * MEMORY_MARGIN)


def fits(nbytes: int, available: int | None = None) -> str | None:
    """None when `nbytes` fit in memory_available(), else the reason (for a skipped row)."""
    avail = memory_available() if available is None else available
    if avail is None or nbytes <= avail:
        return None
    return f"needs ~{nbytes / 1e9:.3g} GB; {avail / 1e9:.3g} GB available"


# --- bandwidth probe ------------------------------------------------------------------------

_PROBE: dict = {}
_STREAM_KERNEL: dict = {}
STREAM_THREADS = 256
STREAM_GROUPS = 132 * 16  # enough resident groups to keep every SM's load queue full


def probes() -> tuple[str, ...]:
    """Probe ops available here; `stream` is a custom kernel, so only on a GPU backend."""
    from .backend import gpu_backend

    return ("sum", "rowsum", "copy") + (("stream",) if gpu_backend() else ())


READ_PROBES = ("sum", "rowsum", "stream")  # the roofline: the best of these, measured at the same point


def probe_buffer() -> mx.array:
    nbytes = GPU_PROBE_BYTES if on_gpu() else CPU_PROBE_BYTES
    key = (str(mx.default_device()), nbytes)
    if key not in _PROBE:
        _PROBE.clear()
        a = mx.random.uniform(shape=(nbytes // 4,), key=mx.random.key(7))
        mx.eval(a)
        _PROBE[key] = a
    return _PROBE[key]


def _stream_read(a: mx.array) -> Callable[[], mx.array]:
    """Our own 128-bit streaming read (metal/ or cuda/ stream_read), a probe that does not depend
    on how well MLX's reductions are tuned. On the H100 (5 ms timing samples, 512 MB) it read
    2620 GB/s vs 2702 (sum) and 2910 (rowsum): sweeps/results/h100/bandwidth-probes.txt."""
    from .backend import BACKENDS, gpu_backend
    from .sources import read_source

    gpu = gpu_backend()
    if gpu is None:
        raise ValueError("bandwidth probe 'stream' needs a GPU backend (metal or cuda)")
    if gpu not in _STREAM_KERNEL:
        ext = "metal" if gpu == "metal" else "cu"
        _STREAM_KERNEL[gpu] = BACKENDS[gpu].kernel_factory()(
            name="mmt_stream_read", input_names=["a"], output_names=["out"],
            source=read_source(f"{gpu}/stream_read.{ext}"))
    kernel, words, n = _STREAM_KERNEL[gpu], a.view(mx.uint32), STREAM_THREADS * STREAM_GROUPS
    return lambda: kernel(inputs=[words], output_shapes=[(n,)], output_dtypes=[mx.uint32],
                          grid=(n, 1, 1), threadgroup=(STREAM_THREADS, 1, 1))[0]


def bandwidth_fn(op: str = "sum") -> tuple[Callable[[], mx.array], int]:
    """(fn, bytes moved per call): `sum` and `rowsum` read the buffer once (a full reduction and
    8192-wide row sums: MLX's reduction kernels differ in how close they get to peak);
    `stream` (GPU only) reads it once with our own 128-bit load kernel; `copy` reads and writes it."""
    a = probe_buffer()
    if op == "sum":
        return (lambda: mx.sum(a)), a.nbytes
    if op == "rowsum":
        rows = a.reshape(-1, 8192)
        return (lambda: mx.sum(rows, axis=1)), a.nbytes
    if op == "stream":
        return _stream_read(a), a.nbytes
    if op == "copy":
        return (lambda: a + 1), 2 * a.nbytes
    raise ValueError(f"bandwidth probe op must be one of sum, rowsum, stream, copy; got {op!r}")


def measure_bandwidth(op: str | None = None, iters: int | None = None) -> float:
    """Measured streaming read GB/s of the default device (the best read probe unless `op`)."""
    best = 0.0
    for o in (op,) if op else [p for p in READ_PROBES if p in probes()]:
        fn, nbytes = bandwidth_fn(o)
        t = time_fn(fn, iters=iters or 20)
        best = max(best, nbytes / (t.median_us * 1e-6) / 1e9)
    return best
