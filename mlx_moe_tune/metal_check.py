"""Metal front-end check: every shipped Metal kernel, as `mx.fast.metal_kernel` hands it to
Apple's compiler, parsed by clang with Metal's typing rules. No Mac needed.

What is compiled, per kernel instantiation, is the text MLX 0.32 builds (`custom_kernel.cpp`:
`metal::utils() + source`, where source is `write_signature`'s output in
`backend/common/metal_kernel.cpp`): MLX's JIT preamble (`utils.h` with `bf16.h`, `bf16_math.h`,
`complex.h`, `defines.h`, `logging.h`, vendored unchanged in `metal_include/`, concatenated in
include order with their `#include "..."` and `#pragma once` lines removed, as MLX's
`make_compiled_preamble.sh` does), then our header, the generated `[[kernel]]` signature (by
`emulator.metal_source`, the same code the emulator runs and tests against MLX's own text:
`constant` for inputs of fewer than 8 elements, `[[buffer(i)]]`, helpers and attributes by
substring), the body and the explicit `template [[host_name(...)]] [[kernel]] decltype(...)`
instantiation. One translation unit per family holds the header once and every instantiation
the tile space produces over the checked formats (kernel names differ per instantiation).

The language level. MLX 0.32 compiles custom kernels with `MTLCompileOptions.languageVersion`
from `get_metal_version()` (`mlx/backend/metal/device.cpp`): Metal 3.1 before macOS 15, 3.2 on
macOS 15, 4.0 on macOS 26 (4.1 on 27); MLX supports macOS 14 and later (`CMakeLists.txt`
refuses deployment targets below 14.0). The Metal Shading Language specification states that
Metal 3.x is based on C++14 ("Metal and C++14", section 1.5 of the 3.2 specification; 1.4 of
3.0) and Metal 4 on C++17. The oldest level a Mac running MLX 0.32 uses is therefore Metal 3.1,
C++14: that is the default level here (`--metal 3.2` and `--metal 4.0` check the others).

The clang model of Metal (`metal_decls/metal_stdlib.h`): `device`, `constant`, `threadgroup`
are clang address spaces 1-3, `thread` the default one; the builtins take address-space
qualified pointers as Metal's do; no standard library (`-nostdinc -nostdinc++`, so `std::` and
`#include <...>` fail); `double` is poisoned after MLX's preamble and implicit floating-point
promotion/narrowing are errors in our code (rule 7 of metal/README.md: convert with
`static_cast`). Two rewrites, both faithful to Metal's semantics:
- a `threadgroup T name[N];` declared in the kernel body (Metal allows it at kernel scope only)
  becomes `static threadgroup T name[N];` (clang rejects automatic variables in an address
  space; the same declaration in a helper stays automatic and fails, as on Apple's compiler);
- clang accepts address-space qualifiers on `this` only in OpenCL: MLX's preamble members
  qualified `thread` lose the (empty) qualifier, those for `threadgroup`/`device`/`constant`
  objects (complex_t's constructors and conversions, the logging fallback's) are dropped, and
  the count dropped is asserted, so a changed MLX header fails loudly here.

What this cannot show: Apple-specific checks the front end does not model (register or
threadgroup-memory limits, attribute types) and anything at run time (the emulator's job).

The compiler is clang from the `ziglang` wheel (`pip install "mlx-moe-tune[metalcheck]"`,
`python -m ziglang clang`), or `$MLX_MOE_TUNE_CLANG`, or a `clang++`/`clang` on PATH. Results are
cached by hash of (clang version, flags, text) under ~/.cache/mlx-moe-tune/metal-check.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent
DECLS = _HERE / "metal_decls"  # our Metal declarations (the only include directory)
MLX_KERNELS = _HERE / "metal_include" / "mlx" / "backend" / "metal" / "kernels"
ENV_CLANG = "MLX_MOE_TUNE_CLANG"

# Metal language version -> (__METAL_VERSION__, the C++ it is based on)
LEVELS = {"3.1": (310, "c++14"), "3.2": (320, "c++14"), "4.0": (400, "c++17")}
DEFAULT_LEVEL = "3.1"  # MLX 0.32 on macOS 14, its oldest supported system

# MLX's utils() in include order (make_compiled_preamble.sh on kernels/utils.h)
PREAMBLE_FILES = ("bf16.h", "bf16_math.h", "complex.h", "defines.h", "logging.h", "utils.h")
_DROPPED_MEMBERS = {"complex.h": 16, "logging.h": 2}  # see _lower_this_qualifiers
_ARRAY_PARAMS = {"utils.h": 2}  # see _lower_array_params
POISON_DOUBLE = "#define double metal_has_no_double_type\n"

CHECK_DTYPES = ("float16", "bfloat16", "float32")
CHECK_BITS = (2, 4, 8)


class MetalCheckUnavailable(RuntimeError):
    """No clang here."""


# --- the compiler -----------------------------------------------------------------------------
@lru_cache(maxsize=None)
def find_clang() -> tuple[tuple[str, ...], str]:
    """(argv prefix of a clang driver, its version line); MetalCheckUnavailable if none."""
    cands = []
    if os.environ.get(ENV_CLANG):
        cands.append(tuple(os.environ[ENV_CLANG].split()))
    try:
        import ziglang  # noqa: F401  (the wheel ships a full clang behind `zig clang`)

        cands.append((sys.executable, "-m", "ziglang", "clang"))
    except ImportError:
        pass
    for name in ("clang++", "clang"):
        if shutil.which(name):
            cands.append((shutil.which(name),))
    for argv in cands:
        try:
            out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and "clang" in out.stdout:
            return argv, out.stdout.splitlines()[0].strip()
    raise MetalCheckUnavailable('no clang found: pip install "mlx-moe-tune[metalcheck]" (the ziglang wheel), '
                                f"or set {ENV_CLANG}")


def flags(level: str = DEFAULT_LEVEL) -> list[str]:
    version, std = LEVELS[level]
    return [
        "-fsyntax-only", "-x", "c++", f"-std={std}", "--target=x86_64-unknown-linux-gnu",
        "-nostdinc", "-nostdinc++", f"-I{DECLS}",
        # what Apple's compiler predefines (MLX's defines.h and logging.h test the first two)
        "-D__METAL__=1", f"-D__METAL_VERSION__={version}", "-D__METAL_MACOS__=1",
        "-Wno-unknown-attributes",  # [[kernel]], [[buffer(i)]], [[host_name]], thread attributes
        "-Werror=c++17-extensions", "-Werror=c++20-extensions", "-Werror=c++23-extensions",
        "-Werror=double-promotion", "-Werror=implicit-float-conversion",
        "-ferror-limit=20", "-fno-color-diagnostics",
    ]


# --- MLX's preamble ---------------------------------------------------------------------------
_THIS_AS = re.compile(r"\)\s*(?:const\s+)?(threadgroup|device|constant)\s*(?=[:{])")


def _lower_this_qualifiers(text: str, name: str) -> str:
    """Drop the member functions of MLX's text qualified for non-`thread` objects (see the module
    docstring). A member runs back to the previous `;`, `{` or `}` (its template header included)
    and on to the end of its balanced body."""
    out, pos, dropped = [], 0, 0
    for m in _THIS_AS.finditer(text):
        if m.start() < pos:
            continue
        start = max(text.rfind(c, pos, m.start()) for c in ";{}") + 1
        start = max(start, pos)
        i = text.index("{", m.end())
        depth = 0
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        if i < len(text) and text[i] == ";":
            i += 1
        out.append(text[pos:start])
        pos, dropped = i, dropped + 1
    out.append(text[pos:])
    if dropped != _DROPPED_MEMBERS.get(name, 0):
        raise RuntimeError(f"metal_check: {name}: expected to drop {_DROPPED_MEMBERS.get(name, 0)} members "
                           f"qualified for non-thread objects, found {dropped} (MLX header changed?)")
    return "".join(out)


_AS_ARRAY_PARAM = re.compile(r"\b(constant|device|threadgroup)\s+const\s+(\w+)\s+(\w+)\[\d+\]")


def _lower_array_params(text: str, name: str) -> str:
    """`constant const T a[N]` parameters (utils.h's elem_to_loc_2/3) as the pointers they are:
    clang rejects an address space on an array parameter before it decays."""
    text, n = _AS_ARRAY_PARAM.subn(r"\1 const \2* \3", text)
    if n != _ARRAY_PARAMS.get(name, 0):
        raise RuntimeError(f"metal_check: {name}: expected {_ARRAY_PARAMS.get(name, 0)} address-space array "
                           f"parameters, found {n} (MLX header changed?)")
    return text


# MLX's own text is held to what Apple's compiler accepts, not to our rules: it uses two C++17
# constructs at Metal 3.x (static_assert without a message, an inline variable), which Apple's
# clang accepts as extensions with a warning, and implicit bfloat->float promotions
_PREAMBLE_PRAGMAS = ("-Wc++17-extensions", "-Wc++20-extensions", "-Wdouble-promotion", "-Wimplicit-float-conversion")


@lru_cache(maxsize=None)
def mlx_preamble() -> str:
    """MLX 0.32's `metal::utils()` text, lowered for clang (see the module docstring)."""
    parts = ["// MLX's JIT preamble (metal::utils()), from metal_include/\n#pragma clang diagnostic push\n"]
    parts += [f'#pragma clang diagnostic ignored "{w}"\n' for w in _PREAMBLE_PRAGMAS]
    for name in PREAMBLE_FILES:
        text = (MLX_KERNELS / name).read_text()
        text = "\n".join(ln for ln in text.splitlines()
                         if not re.match(r'\s*#include ".*\.h"', ln) and not re.match(r"\s*#pragma once", ln))
        text = _lower_array_params(_lower_this_qualifiers(text, name), name)
        parts.append(f'#line 1 "mlx/backend/metal/kernels/{name}"\n{text}\n')
    parts.append("#pragma clang diagnostic pop\n")
    return "".join(parts)


# --- kernel texts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sig:  # what emulator.metal_source reads of an input array
    dtype: str
    size: int
    ndim: int = 1


@dataclass
class Unit:
    """One kernel instantiation: its label, MLX's kernel name and its text after the header."""

    family: str
    config: str
    dtype: str
    bits: int
    variant: str  # "device" (every input a device buffer) or "constant" (small inputs constant)
    kernel: str
    text: str


def _tg_static(body: str) -> str:
    from .emulator.kernel import _METAL_TG_DECL, strip_comments

    return _METAL_TG_DECL.sub(lambda m: "static " + m.group(0), strip_comments(body))


def kernel_unit(family: str, config: str, dtype: str, bits: int, variant: str, name: str, input_names,
                output_names, body: str, header: str, inputs, output_dtypes, template, body_path: str) -> Unit:
    """The text MLX builds for one instantiation (emulator.metal_source), split after the header,
    with #line markers naming the instantiation and the body file."""
    from .emulator.kernel import metal_source

    kname, text = metal_source(name, list(input_names), list(output_names), body, header, inputs,
                               output_dtypes, template, False)
    assert text.startswith(header)
    rest = text[len(header):]
    b = rest.index(body)  # signature | body | "\n}\n" + instantiation
    sig, tail = rest[:b], rest[b + len(body):]
    label = f"{family} {config} {dtype} {bits}-bit {variant}"
    # clang takes no attribute list between `template` and the declaration of an explicit
    # instantiation (Apple's compiler does): [[host_name]] / [[kernel]] are dropped there
    tail = re.sub(r"\btemplate\s*\[\[host_name\(\"[^\"]*\"\)\]\]\s*\[\[kernel\]\]", "template", tail)
    chunk = (f'#line 1 "<signature: {label}>"\n{sig}\n#line 1 "{body_path} <{label}>"\n{_tg_static(body)}\n'
             f'#line 1 "<instantiation: {label}>"\n{tail}')
    return Unit(family, config, dtype, bits, variant, kname, chunk)


def _gather_inputs(fam, problem, x_rows: int) -> list[_Sig]:
    """The input arrays' dtypes and sizes as the op passes them: packed weights uint32,
    scales/biases and x in the activation dtype, routing inputs (ids, order, offsets) int32."""
    E, K, N, P = problem.experts, problem.k, problem.n, problem.rows
    out = []
    for n in fam.input_names:
        if n == "x":
            out.append(_Sig(problem.dtype, x_rows * K))
        elif n.startswith("w"):
            out.append(_Sig("uint32", E * N * K * problem.bits // 32))
        elif n.startswith(("scales", "biases")):
            out.append(_Sig(problem.dtype, E * N * (K // problem.group_size)))
        else:
            out.append(_Sig("int32", E + 1 if n == "offsets" else P))
    return out


def _problems(dtype: str, bits: int):
    """(variant, problem, x_div): a layer-sized call (every input a device buffer) and a tiny one
    whose routing inputs have fewer than 8 elements, so MLX declares them `constant`
    (a 1-token decode step's ids, the offsets of a 4-expert layer)."""
    from .kernels.family import Problem

    return [
        ("device", Problem(experts=16, k=512, n=256, rows=64, bits=bits, group_size=64, dtype=dtype, m=4.0), 1),
        ("constant", Problem(experts=4, k=128, n=64, rows=2, bits=bits, group_size=64, dtype=dtype, m=1.0), 2),
    ]


def _constructor_args(fam) -> dict:
    """What the family hands mx.fast.metal_kernel (name, input/output names, source, header):
    read by giving KernelFamily.kernel a backend whose factory records its arguments."""
    from dataclasses import dataclass as _dc

    from .backend import Backend

    @_dc(frozen=True)
    class _Recorder(Backend):
        def kernel_factory(self):
            return lambda **kw: kw

    return fam.kernel(_Recorder("metal-check", "metal", 1024, 32 * 1024))


def family_units(fam, dtypes=CHECK_DTYPES, bits_list=CHECK_BITS) -> tuple[str, list[Unit]]:
    """(header, units) of a gather family: every valid config of its Metal space at the checked
    formats, in both signature variants."""
    from .backend import METAL
    from .kernels.family import config_id

    kw = _constructor_args(fam)
    label = getattr(fam, "label", fam.name)
    sorted_layout = getattr(fam, "route", None) == "sorted"  # one x row per sorted pair
    units, seen = [], set()
    for dtype in dtypes:
        for bits in bits_list:
            for variant, problem, x_div in _problems(dtype, bits):
                x_div = 1 if sorted_layout else x_div
                ins = _gather_inputs(fam, problem, -(-problem.rows // x_div))  # x row of pair p: p // X_DIV
                for cfg in fam.valid_configs(problem, METAL):
                    u = kernel_unit(label, config_id(cfg), dtype, bits, variant, kw["name"], kw["input_names"],
                                    kw["output_names"], kw["source"], kw["header"], ins, [dtype],
                                    fam.call_template(problem, cfg, x_div), fam.sources["metal"].body)
                    if u.kernel not in seen:
                        seen.add(u.kernel)
                        units.append(u)
    return kw["header"], units


def other_units() -> list[tuple[str, str, list[Unit]]]:
    """(name, header, units) of the plan kernel and the bandwidth probe."""
    from .kernels.plan import PLAN
    from .sources import read_source

    body, header = PLAN.sources["metal"].text()
    plan = [kernel_unit("plan", f"E{e}", "int32", 0, v, "mmt_plan", PLAN.input_names, PLAN.output_names, body,
                        header, [_Sig("int32", p)], ["int32", "int32"], [("E", e)], "metal/plan.metal")
            for v, e, p in (("device", 128, 1024), ("constant", 4, 2))]
    sbody = read_source("metal/stream_read.metal")
    stream = [kernel_unit("stream_read", "-", "uint32", 0, "device", "mmt_stream_read", ["a"], ["out"], sbody, "",
                          [_Sig("uint32", 1 << 20)], ["uint32"], None, "metal/stream_read.metal")]
    return [("plan", header, plan), ("stream_read", "", stream)]


# --- compiling --------------------------------------------------------------------------------
def translation_unit(header: str, units, header_path: str = "metal/mmt_gather.h") -> str:
    """MLX's preamble, the double poison, our header once, then every unit."""
    return (mlx_preamble() + POISON_DOUBLE + (f'#line 1 "{header_path}"\n{header}\n' if header else "")
            + "".join(u.text for u in units))


def _cache_dir() -> Path:
    from .emulator.kernel import cache_dir

    d = cache_dir().parent / "metal-check"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _decls_text() -> str:
    return "".join(p.read_text() for p in sorted(DECLS.iterdir()) if p.is_file() and p.name.startswith("metal"))


def compile_text(text: str, level: str = DEFAULT_LEVEL) -> tuple[bool, str]:
    """(ok, clang's diagnostics) for one translation unit; cached on disk by content."""
    argv, ver = find_clang()
    fl = flags(level)
    key = hashlib.sha256("\0".join([ver, *fl, _decls_text(), text]).encode()).hexdigest()[:32]
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        try:
            e = json.loads(cached.read_text())
            return bool(e["ok"]), str(e["log"])
        except (ValueError, KeyError):
            pass
    with tempfile.TemporaryDirectory(prefix="mmt-metal-check-") as tmp:
        src = Path(tmp) / "kernels.metal.cpp"
        src.write_text(text)
        r = subprocess.run([*argv, *fl, str(src)], capture_output=True, text=True, timeout=600)
        log = (r.stdout + r.stderr).replace(str(src), "kernels.metal")
    ok = r.returncode == 0
    tmpf = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmpf.write_text(json.dumps(dict(ok=ok, log=log)))
    os.replace(tmpf, cached)
    return ok, log


def first_error(log: str) -> str:
    for ln in log.splitlines():
        if ": error:" in ln or ln.startswith("error:"):
            return ln.strip()
    return log.strip().splitlines()[-1] if log.strip() else "failed"


@dataclass
class Row:
    family: str
    config: str
    dtype: str
    bits: int
    variant: str
    ok: bool
    error: str = ""
    log: str = field(default="", repr=False)


def _failures(log: str, units) -> dict[str, str]:
    """Kernel name -> first error, for the units a clang log names: each error with its notes
    (the instantiation chain) is attributed to every unit whose #line label appears in it."""
    labels = {f"{u.family} {u.config} {u.dtype} {u.bits}-bit {u.variant}>": u for u in units}
    out: dict[str, str] = {}
    group: list[str] = []

    def flush():
        if group:
            text = "\n".join(group)
            for lab, u in labels.items():
                if lab in text:
                    out.setdefault(u.kernel, group[0].strip())
    for ln in log.splitlines():
        if ": error:" in ln:
            flush()
            group = [ln]
        elif group:
            group.append(ln)
    flush()
    return out


def check_group(header: str, units: list[Unit], level: str = DEFAULT_LEVEL) -> list[Row]:
    """Compile a family's units in one TU. On errors, the units the log names fail and the rest
    are compiled again (clang stops at its error limit), until the rest compiles."""
    verdict: dict[str, tuple[bool, str, str]] = {}
    remaining = list(units)
    while remaining:
        ok, log = compile_text(translation_unit(header, remaining), level)
        if ok:
            verdict.update({u.kernel: (True, "", "") for u in remaining})
            break
        failed = _failures(log, remaining)
        if not failed:  # an error outside any instantiation (e.g. in the header): all fail
            verdict.update({u.kernel: (False, first_error(log), log) for u in remaining})
            break
        verdict.update({k: (False, e, log) for k, e in failed.items()})
        remaining = [u for u in remaining if u.kernel not in failed]
    return [Row(u.family, u.config, u.dtype, u.bits, u.variant, *verdict[u.kernel]) for u in units]


def groups(families=None, dtypes=CHECK_DTYPES, bits_list=CHECK_BITS) -> list[tuple[str, str, list[Unit]]]:
    """(name, header, units) of every shipped Metal kernel (gather families, plan, probe)."""
    from .selftest import shipped_families

    out = []
    for fam in shipped_families("metal"):
        label = getattr(fam, "label", fam.name)
        if families is None or fam.name in families or label in families:
            header, units = family_units(fam, dtypes, bits_list)
            out.append((label, header, units))
    out += [g for g in other_units() if families is None or g[0] in families]
    return out


def check_all(families=None, level: str = DEFAULT_LEVEL, jobs: int | None = None, dtypes=CHECK_DTYPES,
              bits_list=CHECK_BITS) -> list[Row]:
    jobs = jobs or os.cpu_count() or 1
    gs = groups(families, dtypes, bits_list)
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        parts = list(ex.map(lambda g: check_group(g[1], g[2], level), gs))
    return [r for p in parts for r in p]


# --- `mlx-moe-tune metal-check` ---------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metal", default=DEFAULT_LEVEL, choices=sorted(LEVELS),
                   help=f"Metal language version (default {DEFAULT_LEVEL}: MLX 0.32 on macOS 14, C++14)")
    p.add_argument("--family", action="append", default=None,
                   help="only this kernel (repeatable): qmv, qmv_glu, qmm, qmm_glu, plan, stream_read")
    p.add_argument("--all-rows", action="store_true", help="print every (family, config, dtype) row, not only failures")
    p.add_argument("--log", action="store_true", help="print clang's full output for failures")
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel compiles (default: all cores)")


def run(args) -> int:
    try:
        _, ver = find_clang()
    except MetalCheckUnavailable as e:
        print(f"mlx-moe-tune metal-check: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"mlx-moe-tune metal-check: Metal {args.metal} ({LEVELS[args.metal][1]}) with {ver}")
    rows = check_all(args.family, args.metal, args.jobs)
    fams = list(dict.fromkeys(r.family for r in rows))
    for f in fams:
        mine = [r for r in rows if r.family == f]
        bad = [r for r in mine if not r.ok]
        print(f"{f:<16} {len(mine) - len(bad):>4}/{len(mine):<4} ok")
    print(f"{'family':<16} {'config':<28} {'dtype':<9} {'bits':>4} {'variant':<9} status")
    for r in rows:
        if args.all_rows or not r.ok:
            print(f"{r.family:<16} {r.config:<28} {r.dtype:<9} {r.bits:>4} {r.variant:<9} "
                  f"{'ok' if r.ok else 'ERROR ' + r.error}")
            if args.log and not r.ok:
                print(r.log)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} kernel instantiations pass the Metal {args.metal} front end "
          f"in {time.perf_counter() - t0:.1f} s" + (f"; {len(bad)} FAILED" if bad else ""))
    return 1 if bad or not rows else 0
