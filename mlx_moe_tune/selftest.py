"""`mlx-moe-tune selftest`: every shipped kernel config, on small shapes, vs the numpy reference.

Runs on whatever backend is here: MLX's Metal or CUDA backend when present, otherwise the CPU
SIMT emulator (Metal dialect unless `--backend emulator-cuda`). Prints one pass/fail line per
(family, case, config) and exits non-zero on any failure. This is what a Mac user runs first.

Cases are ragged on purpose: N not a multiple of any tile width, an expert with no rows, one
with a single row and one with more rows than any BM, K of a single group, and the per-token
decode layout (x row = pair / top_k). Every config of the shipped space runs on the ragged
case; the format matrix (bits x group size x dtype) runs the largest valid tile of each family
(`--full`: every config everywhere).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .kernels.family import Problem, config_id

DTYPES = ("float16", "bfloat16", "float32")
# max |y - ref| / max |ref|: dequantized weights and outputs are rounded to the activation dtype.
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Case:
    name: str
    counts: tuple[int, ...]  # rows per expert (experts with 0 rows included)
    k: int
    n: int
    bits: int = 4
    group_size: int = 32
    dtype: str = "bfloat16"
    x_div: int = 1  # x row of pair p is p // x_div (top_k for the per-token decode layout)
    configs: str = "all"  # "all", "ends" (first and last valid config) or "last" (the largest tile)

    def problem(self) -> Problem:
        rows = sum(self.counts)
        return Problem(
            experts=len(self.counts), k=self.k, n=self.n, rows=rows, bits=self.bits,
            group_size=self.group_size, dtype=self.dtype, m=rows / max(1, sum(c > 0 for c in self.counts)),
        )


def default_cases(full: bool = False) -> list[Case]:
    """The ragged case (all configs), the decode layout, and the format matrix."""
    cases = [
        Case("ragged", counts=(0, 1, 5, 37), k=128, n=72),
        Case("decode", counts=(2, 0, 1, 1), k=64, n=40, x_div=2, configs="ends"),
    ]
    for bits in (4, 8, 2):
        for gs in (32, 64, 128):
            for dtype in DTYPES:
                if not full and (gs, dtype) not in ((32, "float16"), (64, "bfloat16"), (128, "float32")):
                    continue
                # K of one group: the smallest K a quantized matrix can have
                cases.append(
                    Case(f"{bits}bit-gs{gs}-{dtype}", counts=(3, 0, 1, 2), k=gs, n=24, bits=bits,
                         group_size=gs, dtype=dtype, configs="all" if full else "last")
                )
    return cases


@dataclass
class Result:
    family: str
    case: str
    config: str
    ok: bool
    error: float | None = None
    message: str = ""
    seconds: float = 0.0
    skipped: bool = False  # the dialect's kernels do not take this format by design (not a failure)


def _mx_dtype(name: str):
    import mlx.core as mx

    return {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[name]


@dataclass
class Inputs:
    """Arrays for every input name any family uses, plus the float64 references."""

    arrays: dict = field(default_factory=dict)
    ref: np.ndarray | None = None  # x W^T per pair
    ref_glu: np.ndarray | None = None  # silu(x Wg^T) * (x Wu^T) per pair
    sorted_rows: np.ndarray | None = None  # pair at each row of the sorted layout


def build_inputs(case: Case, seed: int = 0) -> Inputs:
    import mlx.core as mx

    from . import formats

    rng = np.random.default_rng(seed)
    E, K, N = len(case.counts), case.k, case.n
    P = sum(case.counts)
    T = _mx_dtype(case.dtype)

    def quantized():
        w = rng.standard_normal((E, N, K)).astype(np.float32)
        wq, scales, biases = formats.quantize(w, group_size=case.group_size, bits=case.bits)
        # the kernel sees scales/biases rounded to T: the reference uses exactly those values
        s = mx.array(np.asarray(scales, np.float32)).astype(T)
        b = mx.array(np.asarray(biases, np.float32)).astype(T)
        return np.asarray(wq), s, b

    experts = np.repeat(np.arange(E, dtype=np.int32), case.counts)
    pair_expert = experts[rng.permutation(P)]  # pairs in token order, experts mixed
    order = np.argsort(pair_expert, kind="stable").astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(case.counts)]).astype(np.int32)
    X = -(-P // case.x_div)
    x = mx.array(rng.standard_normal((X, K)).astype(np.float32)).astype(T)
    x_rows = np.asarray(x.astype(mx.float32))[np.arange(P) // case.x_div]

    out = Inputs()
    refs = {}
    for tag, names in (("", ("w", "scales", "biases")), ("_gate", None), ("_up", None)):
        wq, s, b = quantized()
        names = names or (f"w{tag}", f"scales{tag}", f"biases{tag}")
        out.arrays.update(dict(zip(names, (mx.array(wq), s, b))))
        refs[tag] = formats.reference_gather_qmm(
            x_rows, wq, np.asarray(s.astype(mx.float32)), np.asarray(b.astype(mx.float32)),
            pair_expert, group_size=case.group_size, bits=case.bits, mode="affine",
        ).astype(np.float64)
    g, u = refs["_gate"], refs["_up"]
    out.ref = refs[""]
    out.ref_glu = g / (1.0 + np.exp(-g)) * u
    out.arrays.update(x=x, idx=mx.array(pair_expert), order=mx.array(order), offsets=mx.array(offsets))
    # the sorted layout (a family's sorted_twin): pairs grouped by expert, one x row each
    out.arrays.update(x_sorted=mx.array(x_rows[order]).astype(T), ids=mx.array(pair_expert[order]))
    out.sorted_rows = order
    return out


def run_config(family, backend, case: Case, config: dict, inputs: Inputs, check: bool = True):
    """Run one config; returns (relative error, y)."""
    import mlx.core as mx

    problem = case.problem()
    launch = family.launch(problem, config, backend)
    sorted_layout = family.route == "sorted"
    template = family.call_template(problem, config, 1 if sorted_layout else case.x_div)
    names = [("x_sorted" if sorted_layout and n == "x" else n) for n in family.input_names]
    kwargs = dict(
        inputs=[inputs.arrays[name] for name in names],
        template=template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=[(problem.rows, problem.n)],
        output_dtypes=[_mx_dtype(case.dtype)],
        init_value=float("nan"),  # a row the kernel forgets to write fails the comparison
    )
    if backend.emulated:
        kwargs["check"] = check
    (y,) = family.kernel(backend, launch.shared_memory)(**kwargs)
    y = np.asarray(mx.array(y).astype(mx.float32), dtype=np.float64)
    ref = inputs.ref_glu if family.weight_sets == 2 else inputs.ref
    if sorted_layout:
        ref = ref[inputs.sorted_rows]
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(y - ref).max() / scale) if np.isfinite(y).all() else float("inf")
    return err, y


def _no_config(family, backend, case: Case) -> Result:
    """The result of a case no config of `family` can run: skipped where the dialect's kernels
    do not take its format at all (e.g. CUDA and float32 activations), else a failure that says
    what rules the tiles out."""
    from collections import Counter

    from .kernels.common import check_format_cuda

    problem = case.problem()
    gap = check_format_cuda(problem) if backend.dialect == "cuda" else None
    if gap is not None:
        return Result(family.label, case.name, "-", False, message=gap, skipped=True)
    why = Counter(family.check(problem, c, backend) for c in family.configs(backend.dialect)).most_common(1)
    return Result(family.label, case.name, "-", False,
                  message="no valid config" + (f" (mostly: {why[0][0]})" if why and why[0][0] else ""))


def select_configs(family, backend, case: Case) -> list[dict]:
    valid = family.valid_configs(case.problem(), backend)
    if case.configs == "ends" and len(valid) > 2:
        return [valid[0], valid[-1]]
    if case.configs == "last":  # the largest tile: BK past K, BN past N, most simdgroups
        return valid[-1:]
    return valid


def _run_one(family, backend, case: Case, cfg: dict, inputs: Inputs, check: bool) -> Result:
    t0 = time.perf_counter()
    try:
        err, _ = run_config(family, backend, case, cfg, inputs, check=check)
        ok = err <= TOLERANCE[case.dtype]
        r = Result(family.label, case.name, config_id(cfg), ok, err,
                   "" if ok else f"error {err:.2e} > {TOLERANCE[case.dtype]:.0e}")
    except Exception as e:  # a failing config is a result, not a crash
        r = Result(family.label, case.name, config_id(cfg), False, None,
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    r.seconds = time.perf_counter() - t0
    return r


_INPUTS: dict = {}  # per process: inputs of the cases seen (a worker runs many configs per case)


def _run_task(backend_name: str, family_name: str, case: Case, cfg: dict, check: bool) -> Result:
    """Worker entry for `jobs > 1` (module level, so a spawned process can import it)."""
    from .backend import get_backend
    from .kernels import registry

    if case not in _INPUTS:
        _INPUTS[case] = build_inputs(case)
    return _run_one(registry.get_variant(family_name), get_backend(backend_name), case, cfg, _INPUTS[case], check)


def selftest(families, backend, cases, *, check: bool = True, max_configs: int | None = None,
             echo=None, jobs: int = 1) -> list[Result]:
    """Run every selected config of every family on every case. jobs > 1 spreads the configs
    over that many processes: on the emulator each config is a C++ compile, which is most of
    the time, and one process compiles one kernel at a time."""
    tasks = []  # (family, case, config) in report order
    results: list = []
    for case in cases:
        for fam in families:
            configs = select_configs(fam, backend, case)
            if max_configs is not None:
                configs = configs[:max_configs]
            if not configs:
                results.append((len(tasks), _no_config(fam, backend, case)))
                tasks.append(None)
            for cfg in configs:
                tasks.append((fam, case, cfg))
    from .kernels import registry

    todo = [(i, t) for i, t in enumerate(tasks) if t is not None]
    parallel = jobs > 1 and len(todo) > 1 and all(_registered(f) for f, _, _ in (t for _, t in todo))
    if echo:  # the cases with nothing to run, in report order before the runs
        for _, r in results:
            echo(r)
    if not parallel:
        for i, (fam, case, cfg) in todo:
            if case not in _INPUTS:
                _INPUTS[case] = build_inputs(case)
            r = _run_one(fam, backend, case, cfg, _INPUTS[case], check)
            results.append((i, r))
            if echo:
                echo(r)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: MLX's runtime threads do not survive a fork
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = {ex.submit(_run_task, backend.name, fam.label, case, cfg, check): i
                       for i, (fam, case, cfg) in todo}
            for fut in as_completed(futures):
                r = fut.result()
                results.append((futures[fut], r))
                if echo:
                    echo(r)
    return [r for _, r in sorted(results, key=lambda ir: ir[0])]


def _registered(fam) -> bool:
    """Whether a worker process can look `fam` up by its label (not a test's ad-hoc family)."""
    from .kernels import registry

    try:
        return registry.get_variant(fam.label) is fam
    except ValueError:
        return False


def default_jobs(backend) -> int:
    """Processes for the selftest: all cores on the emulator (compile-bound), one on a GPU."""
    import os

    return max(1, os.cpu_count() or 1) if backend.emulated else 1


def format_row(r: Result) -> str:
    err = "-" if r.error is None else f"{r.error:.1e}"
    status = "skip" if r.skipped else "pass" if r.ok else "FAIL"
    return f"{r.family:<14} {r.case:<22} {r.config:<36} {err:>8} {status:>5}  {r.message}"


def shipped_families(dialect: str):
    """The gather_qmm kernels (families and their sorted twins) that have a source in `dialect`."""
    from .kernels import registry

    return [f for f in registry.variants() if dialect in f.sources]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .backend import add_backend_argument

    add_backend_argument(p, "where the kernels run")
    p.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    p.add_argument("--full", action="store_true", help="every config for every bits x group size x dtype")
    p.add_argument("--max-configs", type=int, default=None, help="at most this many configs per family and case")
    p.add_argument("--no-check", action="store_true", help="emulator: skip bounds/race checking (faster)")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="processes (default: all cores on the emulator, 1 on a GPU)")
    p.add_argument("--cache", action="store_true",
                   help="print the first-use verdicts cached on this machine (mlx_moe_tune/first_use.py) and exit")


def run(args) -> int:
    if getattr(args, "cache", False):
        from . import first_use

        print(first_use.format_records(first_use.records()))
        return 0
    from .backend import resolve

    backend = resolve(args.backend)  # a one-line error for a backend this machine lacks
    families = shipped_families(backend.dialect)
    if args.family:
        known = {f.name for f in families}
        unknown = sorted(set(args.family) - known)
        if unknown:
            raise ValueError(f"unknown kernel family {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        families = [f for f in families if f.name in args.family]
    if args.max_configs is not None and args.max_configs < 1:
        raise ValueError("--max-configs must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    jobs = args.jobs or default_jobs(backend)
    t_start = time.perf_counter()
    print(f"mlx-moe-tune selftest on {backend.name}: {', '.join(f.label for f in families)}")
    print(f"{'family':<14} {'case':<22} {'config':<36} {'error':>8} {'':>5}")
    results = selftest(families, backend, default_cases(args.full), check=not args.no_check,
                       max_configs=args.max_configs, jobs=jobs,
                       echo=lambda r: print(format_row(r), flush=True))
    failed = [r for r in results if not r.ok and not r.skipped]
    ran = [r for r in results if not r.skipped]
    total = time.perf_counter() - t_start
    print(f"{len(ran) - len(failed)}/{len(ran)} passed in {total:.1f} s" +
          (f", {len(results) - len(ran)} skipped (format not taken by these kernels)" if len(ran) < len(results) else "") +
          (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
