"""CUDA kernels compiled as MLX's CUDA JIT compiles them, on a machine without a GPU.

`mx.fast.cuda_kernel` wraps a kernel body in a generated signature (emulator.cuda_source
reproduces that text byte for byte) and compiles it with NVRTC for the device it runs on,
sm_90a on an H100 or H200. NVRTC is a host library: with the NVIDIA wheels installed
(`pip install "mlx-moe-tune[nvrtc]"`) this module does the same compile anywhere, so CI proves
that every shipped CUDA config compiles for the real target, and `mlx-moe-tune ptxas` reports
what ptxas gave each one (registers, spills, shared memory) and the occupancy that follows.

What it cannot show is speed or runtime behaviour: correctness is the emulator's job, speed
the GPU's. Register counts can move between NVRTC versions; the report names the one it used.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV_LIB = "MLX_MOE_TUNE_NVRTC"  # path of libnvrtc.so, overriding the search below
ARCH = "sm_90a"  # what MLX's JIT targets on compute capability 9.0 (H100, H200)
_MLX_HEADERS = Path(__file__).parent / "nvrtc_include"  # MLX's device headers (see its README)

# sm_90 per-SM limits (CUDA C programming guide, compute capability 9.0)
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_BLOCKS = 32
SM_SHARED = 228 * 1024
BLOCK_RESERVED_SHARED = 1024  # the runtime's per-block reservation
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library (or no CUDA headers) here."""


class NvrtcError(RuntimeError):
    """NVRTC rejected a kernel source: the message holds its log."""


@dataclass(frozen=True)
class Toolkit:
    lib: Path
    include: tuple[Path, ...]  # --include-path, in MLX's order: MLX headers, CCCL, CUDA runtime


def _wheel_roots() -> list[Path]:
    """nvidia/cu13 folders of NVIDIA's CUDA 13 pip wheels (MLX's CUDA backend is CUDA 13) on sys.path."""
    return [r for base in sys.path if (r := Path(base or ".") / "nvidia" / "cu13").is_dir()]


def _candidates() -> list[tuple[Path, Path]]:
    """(libnvrtc, CUDA include dir) pairs: the NVIDIA pip wheels on sys.path, then a toolkit."""
    out = []
    for root in _wheel_roots():
        for lib in sorted(glob.glob(str(root / "lib" / "libnvrtc.so.*"))):
            if "builtins" not in lib:
                out.append((Path(lib), root / "include"))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for lib in sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))):
                out.append((Path(lib), Path(home) / "include"))
    return out


def find_toolkit() -> Toolkit:
    """The NVRTC library and headers to compile with; NvrtcUnavailable says what is missing."""
    explicit = os.environ.get(ENV_LIB)
    pairs = [(Path(explicit), Path(explicit).resolve().parent.parent / "include")] if explicit else _candidates()
    for lib, inc in pairs:
        if lib.exists() and (inc / "cuda_bf16.h").exists():
            # CCCL (cuda/std/...) beside the runtime headers, else from the nvidia-cuda-cccl wheel
            cccl = next((c for c in (inc / "cccl", *(r / "include" / "cccl" for r in _wheel_roots()))
                         if (c / "cuda" / "std" / "array").exists()), inc / "cccl")
            return Toolkit(lib, (_MLX_HEADERS, cccl, inc))
    where = f"{ENV_LIB}={explicit}" if explicit else "the nvidia pip wheels on sys.path or CUDA_HOME"
    raise NvrtcUnavailable(f"no NVRTC library with CUDA headers found in {where}: "
                           'pip install "mlx-moe-tune[nvrtc]" (NVIDIA\'s nvrtc, runtime and cccl wheels)')


_LIB: dict = {}


def _nvrtc(tk: Toolkit):
    if tk.lib not in _LIB:
        lib = ctypes.CDLL(str(tk.lib))
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        _LIB[tk.lib] = lib
    return _LIB[tk.lib]


def version(tk: Toolkit | None = None) -> str:
    tk = tk or find_toolkit()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc(tk).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


@dataclass(frozen=True)
class Resources:
    """What ptxas allotted one kernel (its `-v` report), and the compile that produced it."""

    kernel: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_bytes: int
    static_smem: int  # bytes of __shared__ arrays (dynamic shared memory comes on top)
    barriers: int
    arch: str
    nvrtc: str
    compile_s: float

    def blocks_per_sm(self, threads: int, dynamic_smem: int = 0) -> tuple[int, str]:
        """Resident blocks per SM and what limits them ('registers', 'shared memory', 'threads'
        or 'blocks'), from the sm_90 limits above: the occupancy calculator's arithmetic."""
        warps = -(-threads // 32)
        per_warp = -(-max(self.registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        limits = {
            "registers": (SM_REGISTERS // per_warp) // warps,
            "threads": SM_THREADS // (warps * 32),
            "blocks": SM_BLOCKS,
            "shared memory": SM_SHARED // (self.static_smem + dynamic_smem + BLOCK_RESERVED_SHARED),
        }
        why = min(limits, key=lambda k: limits[k])
        return limits[why], why

    def occupancy(self, threads: int, dynamic_smem: int = 0) -> float:
        """Theoretical occupancy: resident warps / 64 warps per SM."""
        blocks, _ = self.blocks_per_sm(threads, dynamic_smem)
        return blocks * -(-threads // 32) / (SM_THREADS // 32)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# "Used 128 registers, used 1 barriers, 40 bytes cumulative stack size, 24576 bytes smem": the
# middle items come and go (no barrier, no stack), so each is looked for on its own
_PTXAS_USED = re.compile(r"Used (\d+) registers[^\n]*")


def parse_ptxas(log: str, kernel: str) -> dict:
    """The `ptxas -v` figures of the entry function whose mangled name holds `kernel`."""
    blocks = re.split(r"(?=ptxas info\s*: Compiling entry function)", log)
    for b in blocks:
        m = _PTXAS_ENTRY.search(b)
        if not m or kernel not in m.group(1):
            continue
        frame, used = _PTXAS_FRAME.search(b), _PTXAS_USED.search(b)
        if not (frame and used):
            break
        line = used.group(0)

        def item(pattern: str) -> int:
            found = re.search(pattern, line)
            return int(found.group(1)) if found else 0

        return dict(registers=int(used.group(1)), barriers=item(r"used (\d+) barriers"),
                    static_smem=item(r"(\d+) bytes smem"), stack_bytes=int(frame.group(1)),
                    spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
    raise NvrtcError(f"no ptxas report for kernel {kernel!r} in NVRTC's log:\n{log[-2000:]}")


def _cache_dir() -> Path:
    from .emulator.kernel import cache_dir

    d = cache_dir().parent / "nvrtc"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_source(text: str, kernel: str, arch: str = ARCH, tk: Toolkit | None = None) -> Resources:
    """Compile one kernel text (as mx.fast.cuda_kernel builds it) with MLX's NVRTC options for
    `arch`; NvrtcError with the compiler's log if it does not compile. Results are cached on
    disk by (NVRTC version, options, text)."""
    tk = tk or find_toolkit()
    ver = version(tk)
    # MLX's options (backend/cuda/jit_module.cpp), plus ptxas's resource report
    opts = ["--device-as-default-execution-space", f"--gpu-architecture={arch}",
            *(f"--include-path={p}" for p in tk.include), "--ptxas-options=-v"]
    key = hashlib.sha256("\0".join([ver, *opts[:2], text]).encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.log.json"  # the compiler's log, parsed on every read
    if cached.exists():
        try:
            entry = json.loads(cached.read_text())
            return Resources(kernel=kernel, arch=arch, nvrtc=ver, compile_s=entry["compile_s"],
                             **parse_ptxas(entry["log"], kernel))
        except (ValueError, TypeError, KeyError, NvrtcError):
            pass  # a torn or old-format entry: compile again
    lib = _nvrtc(tk)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), f"{kernel}.cu".encode(), 0, None, None)
    if rc:
        raise NvrtcError(f"nvrtcCreateProgram: {lib.nvrtcGetErrorString(rc).decode()}")
    try:
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        t0 = time.perf_counter()
        rc = lib.nvrtcCompileProgram(prog, len(opts), argv)
        seconds = time.perf_counter() - t0
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc:
        errors = [ln for ln in log.splitlines() if "error" in ln] or log.splitlines()[-5:]
        raise NvrtcError(f"NVRTC {ver} ({arch}) does not compile {kernel}: " + "; ".join(errors[:5])
                         + f"\n--- log ---\n{log[-4000:]}")
    res = Resources(kernel=kernel, arch=arch, nvrtc=ver, compile_s=round(seconds, 3), **parse_ptxas(log, kernel))
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(dict(log=log, compile_s=res.compile_s)))
    os.replace(tmp, cached)
    return res


# --- kernel families ------------------------------------------------------------------------
_INT_INPUTS = ("idx", "order", "offsets", "ids")


def _signature_dtypes(fam, problem) -> tuple[list[str], list[str]]:
    """Input and output dtype names as the op passes them (ops._call, kernels/plan.py): packed
    weights uint32, routing ids int32, x / scales / biases / y in the activation dtype."""
    ins = ["uint32" if n.startswith("w") else "int32" if n in _INT_INPUTS else problem.dtype
           for n in fam.input_names]
    outs = ["int32" if n in _INT_INPUTS else problem.dtype for n in fam.output_names]
    return ins, outs


@dataclass(frozen=True)
class _Sig:  # what emulator.cuda_source reads of an input array
    dtype: str
    ndim: int = 1


def family_source(fam, problem, config, x_div: int = 1) -> tuple[str, str]:
    """(kernel name, source text) that `mx.fast.cuda_kernel` compiles for this family, problem
    and (complete) tile config: the same text the emulator runs."""
    from .emulator.kernel import cuda_source

    body, header = fam.sources["cuda"].text()
    ins, outs = _signature_dtypes(fam, problem)
    template = fam.call_template(problem, config, x_div)
    return cuda_source(fam.kernel_name or f"mmt_{fam.name}", fam.input_names, fam.output_names, body, header,
                       [_Sig(d) for d in ins], outs, template)


def with_launch_bounds(text: str, kernel: str, threads: int, min_blocks: int) -> str:
    """`text` with a declaration of `kernel` carrying `__launch_bounds__(threads, min_blocks)`
    before its definition. MLX writes the signature itself, so this is the one place a bound can
    go; NVRTC applies a declaration's bound to the definition (ptxas then caps the registers
    at what `min_blocks` blocks per SM leave, spilling the rest)."""
    start = text.index(f"__global__ void {kernel}(")
    signature = text[start:text.index(") {", start) + 1]
    decl = signature.replace("__global__ void ", f"__global__ void __launch_bounds__({threads}, {min_blocks}) ", 1)
    return text[:start] + decl + ";\n\n" + text[start:]


def family_resources(fam, problem, config, x_div: int = 1, arch: str = ARCH, min_blocks: int = 0) -> Resources:
    """ptxas's figures for one config; min_blocks > 0 compiles it as if launch-bounded to that
    many blocks per SM: what a register cap would cost in spills. (mx.fast.cuda_kernel has no
    option for a bound; the same declaration in a kernel's header would carry one. The op does not
    do that: no bounded kernel has run on a GPU yet.)"""
    name, text = family_source(fam, problem, config, x_div)
    if min_blocks:
        from .backend import CUDA

        tg = fam.launch(problem, config, CUDA).threadgroup
        text = with_launch_bounds(text, name, tg[0] * tg[1] * tg[2], min_blocks)
    return compile_source(text, name, arch)


# --- `mlx-moe-tune ptxas` ---------------------------------------------------------------------
def _variants(fam, config) -> list[dict]:
    """A table's config crossed with the `--space` values of the params the family has (e.g.
    PF=0,2: each pick with and without the L2 prefetch), or the config alone."""
    import itertools

    from .kernels.family import space_overrides

    over = {k: v for k, v in space_overrides().items() if k in fam.space.get("cuda", {})}
    return [{**config, **dict(zip(over, vals))} for vals in itertools.product(*over.values())]


def _rows(preset, families, m: int, arch: str, jobs: int, tables_only: bool, min_blocks: int = 0):
    from concurrent.futures import ThreadPoolExecutor

    from .backend import CUDA
    from .kernels import registry
    from .kernels.family import Problem, config_id
    from .tables import table_picks

    tasks = []
    for mat in preset.matrices:
        problem = Problem(experts=preset.experts, k=mat.k, n=mat.n, rows=int(m * preset.experts),
                          bits=preset.bits, group_size=preset.group_size, mode=preset.mode,
                          dtype=preset.dtype, m=float(m))
        picks: dict = {}  # (family, complete config id) -> (config, ["device m=.."]) of the tables
        for t, b in table_picks(problem, "cuda"):
            fam = registry.FAMILIES.get(b.family)
            if fam is not None and fam.takes(b.config, "cuda"):
                cfg = fam.complete(b.config, "cuda")
                picks.setdefault((fam.name, config_id(cfg)), (cfg, []))[1].append(
                    f"{t.device.replace('NVIDIA ', '')}:{b.m}")
        for fam in families:
            configs = [] if tables_only else [fam.complete(c, "cuda") for c in fam.configs("cuda")]
            configs += [v for (f, _), (c, _) in picks.items() if f == fam.name for v in _variants(fam, c)]
            seen = set()
            for cfg in configs:
                cid = config_id(cfg)
                if cid in seen or fam.check(problem, cfg, CUDA) is not None:
                    continue
                seen.add(cid)
                x_div = preset.top_k if fam.name.startswith("qmv") else 1
                tasks.append((mat.name, problem, fam, cfg, cid, x_div, picks.get((fam.name, cid), (0, []))[1]))

    def one(t):
        mat, problem, fam, cfg, cid, x_div, buckets = t
        launch = fam.launch(problem, cfg, CUDA)
        threads = launch.threadgroup[0] * launch.threadgroup[1] * launch.threadgroup[2]
        row = dict(matrix=mat, k=problem.k, n=problem.n, family=fam.name, config=cid, threads=threads,
                   dynamic_smem=launch.shared_memory, tables=" ".join(buckets))
        try:
            r = family_resources(fam, problem, cfg, x_div, arch, min_blocks)
        except NvrtcError as e:
            return {**row, "status": "failed", "error": str(e).splitlines()[0]}
        blocks, limit = r.blocks_per_sm(threads, launch.shared_memory)
        return {**row, "status": "ok", "registers": r.registers, "spill_stores": r.spill_stores,
                "spill_loads": r.spill_loads, "stack_bytes": r.stack_bytes, "static_smem": r.static_smem,
                "blocks_per_sm": blocks, "occupancy": round(r.occupancy(threads, launch.shared_memory), 4),
                "limited_by": limit, "nvrtc": r.nvrtc, "arch": r.arch, "compile_s": r.compile_s}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        yield from ex.map(one, tasks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .kernels.registry import add_space_argument

    p.add_argument("--preset", default="gemma-26b-a4b", help="model shape (sweeps/*.toml); default gemma-26b-a4b")
    p.add_argument("--bits", type=int, default=None, help="bits per weight (default: the preset's)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default: the preset's)")
    p.add_argument("--dtype", default=None, help="activation dtype (default: the preset's)")
    p.add_argument("--family", action="append", default=None, help="only this family (repeatable)")
    p.add_argument("--m", type=int, default=16, help="rows per expert the validity checks assume (default 16)")
    p.add_argument("--tables-only", action="store_true",
                   help="only the configs the tuning tables pick (with --space: each crossed with its values)")
    p.add_argument("--min-blocks", type=int, default=0,
                   help="compile as if __launch_bounds__(threads, N): the registers and spills of a "
                   "register cap for N blocks per SM (a what-if; the op's kernels are not bounded)")
    p.add_argument("--arch", default=ARCH, help=f"NVRTC target (default {ARCH}: H100/H200, as MLX's JIT)")
    p.add_argument("--out", default=None, help="also write the rows as CSV here (with a .json of metadata)")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    add_space_argument(p)


def run(args) -> int:
    from .kernels import registry
    from .presets import load_preset
    from .selftest import shipped_families

    if args.m < 1:
        raise ValueError("--m must be >= 1")
    registry.set_space_overrides(args.space)
    preset = load_preset(args.preset).with_format(bits=args.bits, group_size=args.group_size, dtype=args.dtype)
    families = shipped_families("cuda")
    if args.family:
        families = [registry.get(f) for f in args.family]
    try:
        tk = find_toolkit()
    except NvrtcUnavailable as e:
        print(f"mlx-moe-tune ptxas: {e}", file=sys.stderr)
        return 2
    print(f"mlx-moe-tune ptxas: NVRTC {version(tk)} for {args.arch}, preset {preset.name}, "
          f"{', '.join(f.name for f in families)}")
    print(f"{'matrix':<8} {'family':<8} {'config':<36} {'thr':>4} {'regs':>4} {'spill':>6} {'smem':>6} "
          f"{'blk/SM':>6} {'occ':>5}  {'limit':<13} tables (device:m)")
    rows = []
    if args.min_blocks < 0:
        raise ValueError("--min-blocks must be >= 0")
    for r in _rows(preset, families, args.m, args.arch, args.jobs, args.tables_only, args.min_blocks):
        rows.append(r)
        if r["status"] != "ok":
            print(f"{r['matrix']:<8} {r['family']:<8} {r['config']:<36} FAILED {r['error']}", flush=True)
            continue
        smem = r["static_smem"] + r["dynamic_smem"]
        print(f"{r['matrix']:<8} {r['family']:<8} {r['config']:<36} {r['threads']:>4} {r['registers']:>4} "
              f"{r['spill_stores']:>6} {smem:>6} {r['blocks_per_sm']:>6} {r['occupancy']:>5.1%}  "
              f"{r['limited_by']:<13} {r['tables']}", flush=True)
    failed = [r for r in rows if r["status"] != "ok"]
    spills = [r for r in rows if r.get("spill_stores")]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled; {len(spills)} spill registers")
    if args.out and rows:
        from .measure import write_rows
        from .sweep import _git_commit

        cols = list(dict.fromkeys(k for r in rows for k in r))
        write_rows(args.out, rows, cols)
        meta = dict(producer="mlx-moe-tune ptxas", preset=preset.name, m=args.m, arch=args.arch,
                    min_blocks=args.min_blocks, space=args.space or [], tables_only=args.tables_only,
                    nvrtc=version(tk), nvrtc_lib=str(tk.lib), git_commit=_git_commit(),
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        Path(args.out).with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return 1 if failed or not rows else 0
