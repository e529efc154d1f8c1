"""`mlx-moe-tune sweep`: GB/s of every kernel (and tile config) at every m, as tidy CSV rows.

For each weight matrix of the preset and each m (rows per expert), one `measure.Case` is
prepared and every registered kernel is timed on it. Rows are appended and flushed as they are
measured, so a killed sweep loses nothing and `--resume` skips what is done. A kernel that
raises (compile error, out of memory, unsupported format) gives a row with status
`failed: <reason>`; an invalid tile config gives `skipped: <reason>`; the sweep goes on.

Kernels are `SweepKernel`s in `KERNELS`. The stock ones are defined here; tuned kernel families
register themselves from `mlx_moe_tune.kernels.registry` (imported lazily) via `register()`.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import gc
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

COLUMNS = [
    "kernel", "config", "matrix", "m", "tokens", "experts", "active_experts", "top_k", "k", "n",
    "mode", "bits", "group_size", "dtype", "router", "seed", "time_us", "time_us_p10", "time_us_p90",
    "weight_bytes", "gbps", "pct_roofline", "tflops", "iters", "batch", "copies", "status", "backend", "device",
]
# A row is done when these match (resume).
KEY_COLUMNS = ["kernel", "config", "matrix", "m", "experts", "top_k", "k", "n", "mode", "bits",
               "group_size", "dtype", "router", "seed"]
ROUTERS = ("balanced", "uniform", "skewed", "sparse")


@dataclass
class SweepKernel:
    """A measurable kernel. `configs(case)` lists its tile configs ([None] when untuned);
    `build(case, config)` returns a zero-argument callable producing the output mx.array (it
    should rotate weight copies via `case.rotation()`). Optional: `check(case, config)` -> reason
    the kernel cannot run this config here (config may be None; row `skipped: <reason>`), `nbytes(case)` bytes one call reads (default
    case.weight_bytes), `flops(case)` (default 2*P*K*N, 0 = not a matmul), `family` /
    `version` (for the tuner's cache)."""

    name: str
    configs: Callable
    build: Callable
    check: Callable | None = None
    nbytes: Callable | None = None
    flops: Callable | None = None
    family: object = None
    version: str | None = None
    layout: str | None = None  # "sorted" / "unsorted": the output is checked against the reference


KERNELS: dict[str, SweepKernel] = {}


def register(kernel: SweepKernel, *, replace: bool = True) -> SweepKernel:
    if kernel.name in KERNELS and not replace:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    KERNELS[kernel.name] = kernel
    return kernel


def load_registry() -> None:
    """Import the tuned-kernel registry if this build has it (it calls register())."""
    try:
        import mlx_moe_tune.kernels.registry  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "mlx_moe_tune.kernels.registry":
            raise


def config_str(config) -> str:
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    from .kernels.family import config_id

    return config_id(config)


# --- stock kernels --------------------------------------------------------------------------


def _untuned(case):
    return [None]


def _build_gather_qmm(case, config):
    import mlx.core as mx

    nxt = case.rotation()

    def fn():
        w, s, b = nxt()
        return mx.gather_qmm(case.x_sorted, w, s, b, rhs_indices=case.idx_sorted, transpose=True,
                             sorted_indices=True, **case.quant)

    return fn


def _build_gather_qmm_unsorted(case, config):
    import mlx.core as mx

    nxt = case.rotation()

    def fn():
        w, s, b = nxt()
        return mx.gather_qmm(case.x_unsorted, w, s, b, rhs_indices=case.idx_unsorted, transpose=True, **case.quant)

    return fn


def _qmm_slices(case):
    """(copies, expert) slices of one expert's weights, enough to defeat the cache."""
    from . import measure

    n = measure.copies_for(case.wset.expert_bytes, available=case.copies * case.problem.experts)
    return [(c, e) for c in range(case.copies) for e in range(case.problem.experts)][:n]


def _build_quantized_matmul(case, config):
    import mlx.core as mx

    x = case.x[: case.m]  # m rows through one expert: the dense qmv/qmm curve
    slices = [tuple(None if a is None else a[e] for a in case.weights(c)) for c, e in _qmm_slices(case)]
    state = {"i": 0}

    def fn():
        w, s, b = slices[state["i"] % len(slices)]
        state["i"] += 1
        return mx.quantized_matmul(x, w, s, b, transpose=True, **case.quant)

    return fn


def _build_gather_mm_bf16(case, config):
    import mlx.core as mx

    from . import measure

    n = measure.copies_for(_dense_bytes(case))
    dense = case.wset.dense(n)
    state = {"i": 0}
    x = case.x_sorted.astype(measure.MTYPES[case.problem.dtype])

    def fn():
        w = dense[state["i"] % len(dense)]
        state["i"] += 1
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=case.idx_sorted, sorted_indices=True)

    return fn


def _check_gather_mm(case, config):
    from . import measure

    if not measure.on_gpu() and case.problem.dtype != "float32":
        return "MLX's CPU gather_mm supports only float32"
    return None


def _dense_bytes(case):
    import mlx.core as mx

    p = case.problem
    return case.active_experts * p.n * p.k * mx.array(0, dtype=case.dtype).itemsize


def _build_bandwidth(case, config):
    from . import measure

    return measure.bandwidth_fn(config)[0]


def _read_probes():
    from . import measure

    return measure.READ_PROBES


def _probe_ops(case):
    from . import measure

    return list(measure.probes())


def _bandwidth_bytes(case, config=None):
    from . import measure

    return measure.bandwidth_fn(config or "sum")[1]


register(SweepKernel("stock.gather_qmm", _untuned, _build_gather_qmm))
register(SweepKernel("stock.gather_qmm_unsorted", _untuned, _build_gather_qmm_unsorted))
register(SweepKernel(
    "stock.quantized_matmul", _untuned, _build_quantized_matmul,
    nbytes=lambda case: case.wset.expert_bytes, flops=lambda case: 2.0 * case.m * case.problem.k * case.problem.n,
))
# GB/s of the bf16 reference counts the bf16 bytes it reads (3.5-4x the 4-bit bytes).
register(SweepKernel("ref.gather_mm_bf16", _untuned, _build_gather_mm_bf16, nbytes=_dense_bytes, check=_check_gather_mm))
register(SweepKernel("ref.bandwidth", _probe_ops, _build_bandwidth,
                     nbytes=_bandwidth_bytes, flops=lambda case: 0.0))


# --- argument parsing -----------------------------------------------------------------------


def parse_m(text: str) -> list[int]:
    """`1..64` every integer, `1..64x2` powers of two (geometric, factor 2), `1,3,16` a list;
    forms can be joined with commas (`1..8,12,16..64x2`)."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        r = re.fullmatch(r"(\d+)\.\.(\d+)(?:x(\d+))?", part)
        if r:
            lo, hi, step = int(r.group(1)), int(r.group(2)), r.group(3)
            if lo < 1:
                raise ValueError(f"--m {text!r}: m must be >= 1")
            if hi < lo:
                raise ValueError(f"--m {text!r}: empty range {lo}..{hi}")
            if step is None:
                out.extend(range(lo, hi + 1))
            else:
                f = int(step)
                if f < 2:
                    raise ValueError(f"--m {text!r}: the factor after 'x' must be >= 2")
                v = lo
                while v <= hi:
                    out.append(v)
                    v *= f
        elif re.fullmatch(r"\d+", part):
            if int(part) < 1:
                raise ValueError(f"--m {text!r}: m must be >= 1")
            out.append(int(part))
        else:
            raise ValueError(f"--m {text!r}: expected forms like 1..64, 1..64x2 or 1,3,16")
    if not out:
        raise ValueError(f"--m {text!r}: no values")
    return sorted(set(out))


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = str(text).split(",")
    if len(parts) != 4 or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise ValueError(f"--shape {text!r}: expected E,K,N,TOPK (four positive integers)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def check_format(mode: str, bits: int, group_size: int, dtype: str) -> None:
    """Raise ValueError unless MLX can quantize with this format (asks mx.quantize itself)."""
    import mlx.core as mx

    from .measure import MTYPES

    if dtype not in MTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(MTYPES)}")
    try:
        with mx.stream(mx.cpu):
            mx.eval(mx.quantize(mx.zeros((8, 4 * group_size)), group_size=group_size, bits=bits, mode=mode))
    except (ValueError, RuntimeError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"MLX does not support mode={mode} bits={bits} group_size={group_size}: {msg}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .backend import add_backend_argument
    from .kernels.registry import add_space_argument
    from .watchdog import DEFAULT_TIMEOUT_S

    p.add_argument("--preset", help="sweeps/<NAME>.toml (default: tiny on CPU, gemma-26b-a4b on a GPU)")
    p.add_argument("--shape", help="E,K,N,TOPK instead of a preset (one matrix)")
    p.add_argument("--m", help="rows per expert: 1..64 (all), 1..64x2 (powers of 2), 1,3,16 (default: the preset's)")
    p.add_argument("--mode", help="quantization mode (affine, mxfp4, nvfp4, mxfp8); default: the preset's")
    p.add_argument("--bits", type=int, help="bits per weight (default: the preset's / the mode's)")
    p.add_argument("--group-size", type=int, help="quantization group size (default: the preset's / the mode's)")
    p.add_argument("--dtype", help="activation dtype: bfloat16, float16, float32 (default: the preset's)")
    p.add_argument("--router", default="balanced", help=f"routing: {', '.join(ROUTERS)} (default balanced)")
    p.add_argument("--skew", type=float, default=1.2, help="Zipf exponent of the skewed router")
    p.add_argument("--active", type=int, help="active experts of the sparse router")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, help="timing samples per point (default 50 on a GPU, 10 on the CPU)")
    p.add_argument("--kernels", help="comma-separated globs over kernel names, e.g. 'stock.*,tuned.qmm' "
                   "(default: all; tuned kernels only where they run on a GPU)")
    p.add_argument("--configs", help="comma-separated globs over tile config ids of tuned kernels, "
                   "e.g. 'BM16_*,BM32_BN64_BK64_WM2_WN2'")
    p.add_argument("-o", "--output", default="sweep.csv", help="CSV to write (JSON sidecar beside it)")
    p.add_argument("--resume", action="store_true", help="append to OUTPUT, skipping rows already there")
    add_backend_argument(p)
    p.add_argument("--config-timeout", default=None, metavar="SECONDS",
                   help=f"time limit of one (kernel, config, m) measurement; past it the row is "
                   f"'failed: ConfigTimeout' and the sweep goes on (default {DEFAULT_TIMEOUT_S:g}; 0 = none)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check each gather_qmm kernel's output against the reference before timing it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_space_argument(p)


@dataclass
class Plan:
    preset: object
    ms: list[int]
    kernels: list[str]
    config_globs: list[str] | None
    output: Path
    device: str  # "cpu" | "gpu"
    backend: str = ""  # where tuned kernels run: metal, cuda, emulator-metal, emulator-cuda


def _check_output(path: Path, resume: bool) -> None:
    """-o must be a writable file. A missing parent directory is created, and said so on stderr
    (`-o out/sweep.csv` in a fresh checkout is the README's own command)."""
    if path.is_dir():
        raise ValueError(f"-o {path}: is a directory; give a .csv file name")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"-o {path}: cannot create its directory {parent} ({e.strerror or e})") from None
        print(f"mlx-moe-tune sweep: created directory {parent} for -o {path}", file=sys.stderr)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"-o {path}: cannot write ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"-o {path}: cannot write (permission denied)")


def make_plan(args) -> Plan:
    from . import presets
    from .backend import resolve

    kb = resolve(args.backend, set_device=True)
    device = "cpu" if kb.emulated else "gpu"
    if args.preset and args.shape:
        raise ValueError("give --preset or --shape, not both")
    if args.shape:
        E, K, N, top_k = parse_shape(args.shape)
        preset = presets.custom(E, K, N, top_k)
    else:
        preset = presets.load_preset(args.preset or ("gemma-26b-a4b" if device == "gpu" else "tiny"))
    mode = args.mode or preset.mode
    if args.mode and args.mode != preset.mode:  # a new mode brings its own defaults
        defaults = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
        if mode not in defaults:
            raise ValueError(f"--mode {mode!r}: choose from {', '.join(defaults)}")
        bits, gs = defaults[mode]
    else:
        bits, gs = preset.bits, preset.group_size
    bits = args.bits if args.bits is not None else bits
    gs = args.group_size if args.group_size is not None else gs
    dtype = args.dtype or preset.dtype
    check_format(mode, bits, gs, dtype)
    preset = preset.with_format(mode, bits, gs, dtype)
    for mt in preset.matrices:
        if mt.k % gs:
            raise ValueError(f"matrix {mt.name}: K={mt.k} is not a multiple of group size {gs}")
    if args.router not in ROUTERS:
        raise ValueError(f"--router {args.router!r}: choose from {', '.join(ROUTERS)}")
    if args.active is not None and not preset.top_k <= args.active <= preset.experts:
        raise ValueError(f"--active {args.active}: must lie in [top_k={preset.top_k}, experts={preset.experts}]")
    if not (args.skew >= 0 and args.skew < float("inf")):
        raise ValueError(f"--skew must be a finite number >= 0, got {args.skew}")
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    ms = parse_m(args.m or preset.m)
    if args.router == "balanced":
        for m in ms:
            if (m * preset.experts) % preset.top_k:
                raise ValueError(f"--m {m}: balanced routing needs m*E divisible by top_k "
                                 f"(E={preset.experts}, top_k={preset.top_k})")
    load_registry()
    kernels = select_kernels(args.kernels, device, kb)
    # the probe first at every m, so each kernel's pct_roofline uses a bandwidth measured just before
    kernels.sort(key=lambda n: n != "ref.bandwidth")
    output = Path(args.output)
    _check_output(output, args.resume)
    globs = [g.strip() for g in args.configs.split(",") if g.strip()] if args.configs else None
    return Plan(preset, ms, kernels, globs, output, device, kb.name)


def select_kernels(spec: str | None, device: str, kernel_backend=None) -> list[str]:
    from .backend import default_backend

    if not spec:
        names = list(KERNELS)
        if device == "cpu" or (kernel_backend or default_backend()).emulated:
            # tuned kernels would run on the SIMT emulator here: correct but far too slow to time
            names = [n for n in names if not n.startswith("tuned.")]
        return names
    globs = [g.strip() for g in spec.split(",") if g.strip()]
    names = [n for n in KERNELS if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not names:
        raise ValueError(f"--kernels {spec!r} matches no kernel; available: {', '.join(KERNELS)}")
    return names


def pick_configs(kernel: SweepKernel, case, globs: list[str] | None) -> list:
    configs = list(kernel.configs(case))
    if globs is None or configs == [None] or not kernel.name.startswith("tuned."):
        return configs
    picked = [c for c in configs if any(fnmatch.fnmatchcase(config_str(c), g) for g in globs)]
    # an exact id that is not in the valid list is still tried (it gets a `skipped` row with the reason)
    have = {config_str(c) for c in picked}
    for g in globs:
        if not any(ch in g for ch in "*?[") and g not in have:
            from .kernels.family import parse_config_id

            picked.append(parse_config_id(g))
    return picked


# --- running --------------------------------------------------------------------------------


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}".strip()
    return msg[:200].replace(",", ";")


def _git_commit(here: Path | None = None) -> str | None:
    """Short HEAD of the checkout this package runs from, with "-dirty" when tracked files differ
    from it: a device machine gets a copy of the working tree whose HEAD can lag what runs."""
    if os.environ.get("MLX_MOE_TUNE_COMMIT"):  # copies without .git (e.g. a device machine)
        return os.environ["MLX_MOE_TUNE_COMMIT"]
    here = here or Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(here)]
        out = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        head = out.stdout.strip()
        if not head:
            return None
        st = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                            text=True, timeout=10)
        return head + ("-dirty" if st.returncode == 0 and st.stdout.strip() else "")
    except Exception:
        return None


def metadata(plan: Plan, backend_name: str) -> dict:
    import mlx.core as mx

    from . import __version__, measure

    p = plan.preset
    return {
        "tool": "mlx-moe-tune sweep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()},
        "device": measure.device_name(),
        "backend": backend_name,
        "kernel_backend": plan.backend or _kernel_backend(plan.device),
        "mlx_version": mx.__version__,
        "package_version": __version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "preset": p.name,
        "shape": {"experts": p.experts, "top_k": p.top_k, "matrices": [vars(mt) for mt in p.matrices]},
        "format": {"mode": p.mode, "bits": p.bits, "group_size": p.group_size, "dtype": p.dtype},
        "m": plan.ms,
        "kernels": plan.kernels,
        "configs": plan.config_globs,
        "llc_bytes": measure.llc_bytes(),
        "cache_defeat": f"rotate identical copies of the weights so their total >= {measure.CACHE_FACTOR}x LLC "
                        f"(per-row copies column; notes per point below)",
        "timing": f"warm-up 3 calls; median/p10/p90 over `iters` samples, each = `batch` calls in one mx.eval "
                  f"between mx.synchronize() / batch (batch sized for ~{measure.SAMPLE_S * 1e3:g} ms samples)",
        "gbps": "weight_bytes (active experts' w+scales+biases, one read) / median time; ref.gather_mm_bf16 "
                "counts its bf16 bytes; ref.bandwidth: sum/rowsum/stream = read, copy = read+write",
        "pct_roofline": "gbps / best read probe (ref.bandwidth sum, rowsum or stream) measured at the same point",
    }


def _kernel_backend(device: str) -> str:
    from .backend import default_backend

    if device == "cpu":
        return "emulator-" + (default_backend().dialect)
    return default_backend().name


POINT_COLUMNS = [c for c in KEY_COLUMNS if c not in ("kernel", "config")]
INTERRUPT_HINT = "the CSV keeps every finished row: rerun with --resume to continue"


@dataclass
class Done:
    """What a CSV already holds (resume): row keys, points finished as a whole (a `*` row: the
    inputs could not be prepared or would not fit), the last probe GB/s per (matrix, m)."""

    keys: set
    points: set
    probe: dict
    bad_rows: int = 0


def _key(row: dict) -> tuple:
    return tuple(str(row.get(c, "")) for c in KEY_COLUMNS)


def _point_key(row: dict) -> tuple:
    return tuple(str(row.get(c, "")) for c in POINT_COLUMNS)


def _read_done(path: Path) -> Done:
    """Keys of the complete rows already in the CSV. A row with missing or extra fields (not
    written by a finished writerow) does not count as done: it is measured again."""
    done = Done(set(), set(), {})
    if not path.is_file() or path.stat().st_size == 0:
        return done
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"--resume: {path} was not written by this version of the sweep (other columns); "
                             "use a new -o file")
        for row in reader:
            if None in row or None in row.values() or not row.get("status"):
                done.bad_rows += 1
                continue
            done.keys.add(_key(row))
            if row["kernel"] == "*":
                done.points.add(_point_key(row))
            if row.get("kernel") == "ref.bandwidth" and row.get("config") in _read_probes() and row.get("status") == "ok":
                k = (row.get("matrix"), row.get("m"))
                done.probe[k] = max(done.probe.get(k, 0.0), float(row["gbps"]))
    return done


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _layout(kernel: SweepKernel) -> str | None:
    """Which reference layout a kernel's output is checked against (None: not a plain gather_qmm
    output, e.g. the fused SwiGLU, one expert's matmul, the bandwidth probe)."""
    if kernel.layout is not None:
        return kernel.layout
    fixed = {"stock.gather_qmm": "sorted", "stock.gather_qmm_unsorted": "unsorted", "ref.gather_mm_bf16": "sorted",
             "tuned.auto": "sorted"}
    if kernel.name in fixed:
        return fixed[kernel.name]
    fam = kernel.family
    if fam is None or getattr(fam, "weight_sets", 1) == 2 or str(getattr(fam, "name", "")).endswith("_glu"):
        return None  # the fused gate+up op: another reference
    # as kernels.registry builds it: families that read expert ids run the per-token layout
    ids = getattr(fam, "route", None) == "ids" or "idx" in getattr(fam, "input_names", ())
    return "unsorted" if ids else "sorted"


def _out_bytes(kernel: SweepKernel, case, config) -> int:
    """Bytes of one call's output (a timing sample holds `batch` of them)."""
    from . import measure

    if kernel.name == "ref.bandwidth":
        nbytes = measure.GPU_PROBE_BYTES if measure.on_gpu() else measure.CPU_PROBE_BYTES
        return {"sum": 4, "rowsum": nbytes // 8192 * 4}.get(config, nbytes)
    item = case.x.itemsize
    rows = case.m if kernel.name == "stock.quantized_matmul" else case.rows
    return rows * case.problem.n * item


def _fixed_bytes(kernel: SweepKernel, case) -> int:
    """Bytes a kernel holds beyond the case and its outputs (probe buffer, bf16 weights)."""
    from . import measure

    if kernel.name == "ref.bandwidth":
        return measure.GPU_PROBE_BYTES if measure.on_gpu() else measure.CPU_PROBE_BYTES
    if kernel.name == "ref.gather_mm_bf16":
        p = case.problem
        return measure.copies_for(_dense_bytes(case)) * p.experts * p.n * p.k * case.x.itemsize
    return 0


# MLX's CPU gather_qmm in bfloat16 rounds as it accumulates: 3.4% off the float32 reference at
# K=256, 8.6% at K=2816. A wrong row or expert is off by about 1 (max |y - ref| / max |ref|).
GROSS_TOLERANCE = 0.5


class _Verifier:
    """The reference of one point in each layout, computed once, and the check of an output."""

    def __init__(self, case):
        self.case, self.refs = case, {}

    def __call__(self, kernel: SweepKernel, fn) -> str | None:
        import numpy as np

        from . import measure
        from .tune import TOLERANCE, _rel_error, _to_numpy

        layout = _layout(kernel)
        if layout is None:
            return None
        if layout not in self.refs:
            self.refs[layout] = measure.case_reference(self.case, layout)
        ref = self.refs[layout]
        y = _to_numpy(fn())
        if y.size != ref.size:
            return f"output has {y.size} values; reference {ref.size}"
        err = _rel_error(y.reshape(ref.shape), ref)
        if kernel.name.startswith(("stock.", "ref.")):
            tol = GROSS_TOLERANCE  # MLX's own kernels: catch garbage, not MLX's rounding
        else:
            tol = TOLERANCE.get(self.case.problem.dtype, 3e-2)  # ours: the tuner's bound
        return None if err <= tol else f"relative error {err:.3g} > {tol:g} vs the reference"


def run_sweep(plan: Plan, *, router="balanced", seed=0, iters=None, resume=False, quiet=False,
              skew=1.2, active=None, verify=True, config_timeout=None, restart_argv=None) -> dict:
    """Measure every (matrix, m, kernel, config); returns counts by status.

    Crash safety: rows are appended and flushed one at a time under an exclusive lock on the CSV
    (a second sweep on the same file is refused); on resume a torn last line (a killed writer)
    is dropped and re-measured; the JSON sidecar is replaced atomically at the start and end."""
    from tqdm import tqdm

    from . import measure
    from .kernels.family import Problem
    from .safeio import atomic_write_text, drop_torn_tail, locked, warn
    from .watchdog import ConfigTimeout, Watchdog

    from .backend import gpu_backend

    backend_name = "cpu" if plan.device == "cpu" else gpu_backend()
    kb = plan.backend or _kernel_backend(plan.device)
    device = measure.device_name()
    p = plan.preset
    sidecar = plan.output.with_suffix(".json")
    old_meta = _read_sidecar(sidecar) if resume else None
    if resume and old_meta is None and sidecar.exists():
        warn(f"{sidecar}: unreadable, rewritten")
    meta = metadata(plan, backend_name)
    meta.update(router=router, seed=seed, iters=iters or ("default: 50" if plan.device == "gpu" else "default: 10"),
                skew=skew if router == "skewed" else None, active=active if router == "sparse" else None,
                verify=verify, config_timeout_s=config_timeout, points={}, finished=None)
    if old_meta is not None:
        meta["resumed_from"] = {k: old_meta.get(k) for k in ("date", "git_commit", "mlx_version", "counts")}
        meta["points"] = dict(old_meta.get("points") or {})
    counts: dict[str, int] = {}
    argv = None
    if restart_argv:
        argv = list(restart_argv) + ([] if "--resume" in restart_argv else ["--resume"])
    dog = Watchdog(config_timeout, restart_argv=argv)
    budget = measure.memory_available()
    with open(plan.output, "a", newline="") as f:
        try:
            lock = locked(f, blocking=False)
            lock.__enter__()
        except BlockingIOError:
            raise ValueError(f"-o {plan.output}: another sweep is writing this file now; "
                             "wait for it or give another -o") from None
        bar, probe = None, {}
        try:
            if resume:
                cut = drop_torn_tail(plan.output, lock=False)
                if cut:
                    warn(f"{plan.output}: dropped a torn last line ({cut} bytes, a killed run's unfinished row); "
                         "it is measured again")
                done = _read_done(plan.output)
                if done.bad_rows:
                    warn(f"{plan.output}: {done.bad_rows} incomplete row(s) ignored; they are measured again")
            else:
                f.truncate(0)
                done = Done(set(), set(), {})
            probe = done.probe
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")

            def write(row: dict) -> None:
                w.writerow({k: _fmt(v) for k, v in row.items()})
                f.flush()
                key = str(row["status"]).split(":")[0]
                counts[key] = counts.get(key, 0) + 1

            if plan.output.stat().st_size == 0:
                w.writeheader()
                f.flush()
            atomic_write_text(sidecar, json.dumps(meta, indent=2, default=str) + "\n")
            bar = tqdm(total=len(p.matrices) * len(plan.ms), disable=quiet, desc="sweep", unit="point",
                       file=sys.stderr)
            for mt in p.matrices:
                problem = Problem(experts=p.experts, k=mt.k, n=mt.n, rows=p.experts, bits=p.bits,
                                  group_size=p.group_size, mode=p.mode, dtype=p.dtype)
                for m in plan.ms:
                    bar.set_postfix_str(f"{mt.name} m={m}")
                    base = dict(matrix=mt.name, m=m, experts=p.experts, top_k=p.top_k, k=mt.k, n=mt.n, mode=p.mode,
                                bits=p.bits, group_size=p.group_size, dtype=p.dtype, router=router, seed=seed,
                                backend=backend_name, device=device)
                    if _point_key(base) in done.points:
                        bar.update(1)
                        continue
                    need = measure.point_memory(problem, m, p.top_k, router, verify=verify)
                    why = measure.fits(need, budget)
                    if why:  # would not fit: one row for the point, before anything is allocated
                        write(dict(base, kernel="*", config="", status=f"skipped: memory: {why}"))
                        bar.update(1)
                        continue
                    try:
                        case = measure.prepare_case(problem, m=m, top_k=p.top_k, router=router, seed=seed,
                                                    backend=kb, skew=skew, active=active)
                    except Exception as e:  # e.g. OOM while making weights: every kernel at this point fails
                        write(dict(base, kernel="*", config="", status=f"failed: preparing inputs: {_short(e)}"))
                        bar.update(1)
                        continue
                    base.update(tokens=case.tokens, active_experts=case.active_experts)
                    meta["points"][f"{mt.name}/m={m}"] = case.cache_defeat
                    checker = _Verifier(case) if verify else None
                    for name in plan.kernels:
                        kernel = KERNELS[name]
                        if _key(dict(base, kernel=name, config="")) in done.keys:
                            continue  # untuned and done, or a kernel-level row (listing its configs failed)
                        try:
                            configs = pick_configs(kernel, case, plan.config_globs)
                        except Exception as e:
                            configs = []
                            write(dict(base, kernel=name, config="", status=f"failed: listing configs: {_short(e)}"))
                        for config in configs:
                            row = dict(base, kernel=name, config=config_str(config))
                            if _key(row) in done.keys:
                                continue
                            what = f"{name} {row['config']} {mt.name} m={m}".replace("  ", " ")
                            hung = dict(row, status=f"failed: ConfigTimeout: no result after {config_timeout:g} s "
                                        "(--config-timeout)" if config_timeout else "")
                            try:
                                with dog.limit(what, on_hang=lambda r=hung: write(r)):
                                    row.update(_measure_one(kernel, case, config, iters, verify=checker,
                                                            budget=budget, point_bytes=need))
                            except ConfigTimeout as e:  # fired outside the measurement's own try
                                row.update(status=f"failed: {_short(e)}")
                            if name == "ref.bandwidth" and config in _read_probes() and row["status"] == "ok":
                                k = (mt.name, str(m))
                                probe[k] = max(probe.get(k, 0.0), row["gbps"])
                            roof = probe.get((mt.name, str(m))) or (max(probe.values()) if probe else None)
                            if row.get("gbps") and roof:
                                row["pct_roofline"] = 100.0 * row["gbps"] / roof
                            write(row)
                    del case, checker
                    gc.collect()
                    bar.update(1)
            meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        except BaseException as e:
            meta["interrupted"] = f"{type(e).__name__}: {e}"[:200]
            raise
        finally:
            if bar is not None:
                bar.close()
            meta["counts"] = counts
            meta["bandwidth_probe_gbps"] = max(probe.values()) if probe else None
            try:
                atomic_write_text(sidecar, json.dumps(meta, indent=2, default=str) + "\n")
            finally:
                lock.__exit__(None, None, None)
    return counts


def _measure_one(kernel: SweepKernel, case, config, iters, *, verify=None, budget=None, point_bytes=0) -> dict:
    """One row's measurement: `skipped` (the kernel's own check, or memory), `wrong` (output
    differs from the reference; not timed), `failed` (an exception, a time limit) or `ok`."""
    import mlx.core as mx

    from . import measure
    from .watchdog import ConfigTimeout

    try:
        reason = kernel.check(case, config) if kernel.check is not None else None
    except Exception as e:
        return {"status": f"failed: checking the config: {_short(e)}"}
    if reason:
        return {"status": f"skipped: {reason}"[:200].replace(",", ";")}
    try:
        out = _out_bytes(kernel, case, config)
        fixed = point_bytes + _fixed_bytes(kernel, case)
        why = measure.fits(fixed + out, budget)
        if why:
            return {"status": f"skipped: memory: {why}"}
        # a sample holds `batch` outputs at once: no more of them than fit
        max_batch = None if budget is None else max(1, int((budget - fixed) // max(out, 1)))
    except ConfigTimeout:
        raise
    except Exception:  # an estimate must never cost the measurement
        max_batch = None
    try:
        fn = kernel.build(case, config)
        if verify is not None:
            bad = verify(kernel, fn)
            if bad:
                return {"status": f"wrong: {bad}"[:200].replace(",", ";")}
        t = measure.time_fn(fn, iters=iters, max_batch=max_batch)
        if kernel.name == "ref.bandwidth":
            nbytes = kernel.nbytes(case, config)
        else:
            nbytes = kernel.nbytes(case) if kernel.nbytes else case.weight_bytes
        flops = kernel.flops(case) if kernel.flops else case.flops
        copies = case.copies
        if kernel.name == "stock.quantized_matmul":
            copies = len(_qmm_slices(case))
        elif kernel.name == "ref.bandwidth":
            copies = 1
        return dict(time_us=t.median_us, time_us_p10=t.p10_us, time_us_p90=t.p90_us, weight_bytes=int(nbytes),
                    gbps=nbytes / (t.median_us * 1e-6) / 1e9,
                    tflops=(flops / (t.median_us * 1e-6) / 1e12) if flops else None,
                    iters=t.iters, batch=t.batch, copies=copies, status="ok")
    except Exception as e:  # failures are data: record and go on (a ConfigTimeout too)
        fn = None
        gc.collect()
        mx.clear_cache()
        return {"status": f"failed: {_short(e)}"}


def run(args) -> int:
    from .kernels.registry import set_space_overrides
    from .watchdog import parse_timeout

    set_space_overrides(args.space)
    timeout = parse_timeout(getattr(args, "config_timeout", None))
    plan = make_plan(args)
    where = f"{plan.preset.name} ({plan.preset.format}), m={','.join(map(str, plan.ms))}"
    print(f"sweep {where} on {plan.device}; kernels: {', '.join(plan.kernels)} -> {plan.output}", file=sys.stderr)
    counts = run_sweep(plan, router=args.router, seed=args.seed, iters=args.iters, resume=args.resume,
                       quiet=args.quiet, skew=args.skew, active=args.active, verify=not getattr(args, "no_verify", False),
                       config_timeout=timeout, restart_argv=getattr(args, "restart_argv", None))
    print(f"done: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'nothing to do'}; "
          f"wrote {plan.output} and {plan.output.with_suffix('.json')}", file=sys.stderr)
    return 0
