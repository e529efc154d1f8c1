"""`metal_kernel` / `cuda_kernel` for the CPU SIMT emulator, call-compatible with `mx.fast`.

The kernel source is wrapped exactly as MLX 0.32 wraps it (signature text by MLX's own rules,
see `metal_source` / `cuda_source`), then compiled as C++ together with the emulator runtime
and a dialect shim (runtime/*.h) into a shared library cached by content hash, and run on CPU
fibers. See README.md in this folder for the architecture and the supported subset.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

_RT = Path(__file__).resolve().parent / "runtime"

ENV_CHECK = "MLX_MOE_TUNE_EMULATOR_CHECK"
ENV_CACHE = "MLX_MOE_TUNE_CACHE"
ENV_THREADS = "MLX_MOE_TUNE_EMULATOR_THREADS"
ENV_CXX = "MLX_MOE_TUNE_CXX"

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX: inputs with fewer elements are `constant` (Metal)
CUDA_MAX_NDIM = 10  # MLX's Shape / Strides are cuda::std::array<..., 10>


class EmulatorError(RuntimeError):
    """A kernel failed while running on the emulator (check-mode finding, deadlock, ...)."""


class EmulatorCheckError(EmulatorError):
    """Check mode found an out-of-bounds access, a race or a divergent barrier."""


class EmulatorCompileError(EmulatorError):
    """The generated C++ did not compile (message has the compiler output and the file)."""


class EmulatorUnsupportedError(EmulatorCompileError):
    """The source uses a construct the emulator does not implement."""


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DT:
    name: str
    storage: Any  # numpy dtype holding the bits
    metal: str  # MLX get_type_string
    cuda: str  # MLX dtype_to_cuda_type


_DTYPES = {
    d.name: d
    for d in (
        _DT("float32", np.float32, "float", "float"),
        _DT("float16", np.float16, "float16_t", "__half"),
        _DT("bfloat16", np.uint16, "bfloat16_t", "__nv_bfloat16"),
        _DT("float64", np.float64, "double", "double"),
        _DT("bool", np.bool_, "bool", "bool"),
        _DT("int8", np.int8, "int8_t", "int8_t"),
        _DT("int16", np.int16, "int16_t", "int16_t"),
        _DT("int32", np.int32, "int32_t", "int32_t"),
        _DT("int64", np.int64, "int64_t", "int64_t"),
        _DT("uint8", np.uint8, "uint8_t", "uint8_t"),
        _DT("uint16", np.uint16, "uint16_t", "uint16_t"),
        _DT("uint32", np.uint32, "uint32_t", "uint32_t"),
        _DT("uint64", np.uint64, "uint64_t", "uint64_t"),
    )
}


def _mx():
    import mlx.core as mx

    return mx


def _ml_bf16():
    try:
        import ml_dtypes

        return ml_dtypes.bfloat16
    except ImportError:  # pragma: no cover - ml_dtypes is a dependency, but keep GPU hosts lean
        return None


def dtype_name(d: Any) -> str:
    """Canonical dtype name ('float32', 'bfloat16', ...) of an mx.Dtype, numpy dtype or string."""
    if isinstance(d, str):
        name = d.split(".")[-1]
        name = {"bool_": "bool", "float": "float32", "half": "float16"}.get(name, name)
        if name in _DTYPES:
            return name
        raise ValueError(f"unsupported dtype {d!r}")
    mod = type(d).__module__
    if mod.startswith("mlx"):
        return dtype_name(str(d))
    bf = _ml_bf16()
    npd = np.dtype(d)
    if bf is not None and npd == np.dtype(bf):
        return "bfloat16"
    if npd == np.bool_:
        return "bool"
    if npd.name in _DTYPES:
        return npd.name
    raise ValueError(f"unsupported dtype {d!r}")


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)


def bf16_bits_to_f32(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclass
class _Arr:
    data: np.ndarray  # contiguous, storage dtype
    dtype: str
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def _to_arr(x: Any) -> tuple[_Arr, bool]:
    """(array, came_from_mlx)."""
    mod = type(x).__module__
    if mod.startswith("mlx"):
        mx = _mx()
        name = dtype_name(x.dtype)
        if name == "bfloat16":
            data = np.array(x.view(mx.uint16))
        else:
            data = np.array(x)
        return _Arr(np.ascontiguousarray(data, dtype=_DTYPES[name].storage), name, tuple(x.shape)), True
    if isinstance(x, (bool, np.bool_)):
        return _Arr(np.array(bool(x)), "bool", ()), False
    if isinstance(x, (int, np.integer)) and not isinstance(x, np.ndarray):
        if isinstance(x, np.integer):
            name = dtype_name(np.asarray(x).dtype)
            return _Arr(np.array(x, dtype=_DTYPES[name].storage), name, ()), False
        return _Arr(np.array(x, dtype=np.int32), "int32", ()), False
    if isinstance(x, (float, np.floating)) and not isinstance(x, np.ndarray):
        if isinstance(x, np.floating):
            name = dtype_name(np.asarray(x).dtype)
            return _Arr(np.array(x, dtype=_DTYPES[name].storage), name, ()), False
        return _Arr(np.array(x, dtype=np.float32), "float32", ()), False
    a = np.asarray(x)
    name = dtype_name(a.dtype)
    if name == "bfloat16":
        a = a.view(np.uint16)
    return _Arr(np.ascontiguousarray(a, dtype=_DTYPES[name].storage), name, tuple(a.shape)), False


# ---------------------------------------------------------------------------------------------
# source generation: MLX's exact text
# ---------------------------------------------------------------------------------------------
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# C++ expressions (inside the generated entry function) for each attribute
_ATTR_EXPR = {
    "dispatch_quadgroups_per_threadgroup": "uint((L_->tg[0]*L_->tg[1]*L_->tg[2] + 3) / 4)",
    "dispatch_simdgroups_per_threadgroup": "uint((L_->tg[0]*L_->tg[1]*L_->tg[2] + 31) / 32)",
    "dispatch_threads_per_threadgroup": "uint3(L_->tg[0], L_->tg[1], L_->tg[2])",
    "grid_origin": "uint3(0u, 0u, 0u)",
    "grid_size": "uint3(L_->grid[0], L_->grid[1], L_->grid[2])",
    "quadgroup_index_in_threadgroup": "uint(f_->linear / 4)",
    "quadgroups_per_threadgroup": "uint((g_->n + 3) / 4)",
    "simdgroup_index_in_threadgroup": "uint(f_->sg)",
    "simdgroups_per_threadgroup": "uint(g_->nsg)",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": "uint(f_->linear % 4)",
    "thread_index_in_simdgroup": "uint(f_->lane)",
    "thread_index_in_threadgroup": "uint(f_->linear)",
    "thread_position_in_grid": "uint3(g_->pos[0]*L_->tg[0] + f_->tid[0], g_->pos[1]*L_->tg[1] + f_->tid[1], "
    "g_->pos[2]*L_->tg[2] + f_->tid[2])",
    "thread_position_in_threadgroup": "uint3(f_->tid[0], f_->tid[1], f_->tid[2])",
    "threadgroup_position_in_grid": "uint3(g_->pos[0], g_->pos[1], g_->pos[2])",
    "threadgroups_per_grid": "uint3(L_->groups[0], L_->groups[1], L_->groups[2])",
    "threads_per_grid": "uint3(L_->grid[0], L_->grid[1], L_->grid[2])",
    "threads_per_simdgroup": "uint(g_->n - int(f_->sg) * 32 < 32 ? g_->n - int(f_->sg) * 32 : 32)",
    "threads_per_threadgroup": "uint3(g_->size[0], g_->size[1], g_->size[2])",
}


def _targ_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    try:
        dtype_name(v)
        return "dtype"
    except (ValueError, TypeError):
        raise ValueError(f"template argument value {v!r} must be an int, a bool or a dtype") from None


def _shape_infos(source: str, input_names: Sequence[str]) -> list[tuple[bool, bool, bool]]:
    return [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]


def metal_source(name, input_names, output_names, source, header, inputs: Sequence[_Arr], output_dtypes,
                 template, atomic_outputs) -> tuple[str, str]:
    """(kernel_name, source text) exactly as mx.fast.metal_kernel generates them."""
    shape_infos = _shape_infos(source, input_names)
    attributes = [f"  {t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES if a in source]
    targs = list(template or [])
    kernel_name = "custom_kernel_" + name
    template_def = ""
    if targs:
        parts = []
        for _, v in targs:
            k = _targ_kind(v)
            parts.append(str(int(v)) if k in ("int", "bool") else _DTYPES[dtype_name(v)].metal)
        template_def = "<" + ", ".join(parts) + ">"
        h = template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
        kernel_name += "_" + h
    for a in inputs:
        kernel_name += "_" + _DTYPES[a.dtype].metal
        if a.ndim == 0:
            kernel_name += "s"
        elif a.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for d in output_dtypes:
        kernel_name += "_" + _DTYPES[d].metal

    s = header
    if targs:
        ptypes = {"int": "int", "bool": "bool", "dtype": "typename"}
        s += "template <" + ", ".join(f"{ptypes[_targ_kind(v)]} {n}" for n, v in targs) + ">\n"
    s += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for i, a in enumerate(inputs):
        n = input_names[i]
        loc = "constant" if a.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if a.ndim == 0 else "*"
        s += f"  const {loc} {_DTYPES[a.dtype].metal}{ref} {n} [[buffer({index})]],\n"
        index += 1
        if a.ndim > 0:
            sh, st, nd = shape_infos[i]
            if sh:
                s += f"  const constant int* {n}_shape [[buffer({index})]],\n"
                index += 1
            if st:
                s += f"  const constant int64_t* {n}_strides [[buffer({index})]],\n"
                index += 1
            if nd:
                s += f"  const constant int& {n}_ndim [[buffer({index})]],\n"
                index += 1
    for i, n in enumerate(output_names):
        t = _DTYPES[output_dtypes[i]].metal
        t = f"atomic<{t}>" if atomic_outputs else t
        s += f"  device {t}* {n} [[buffer({index})]]"
        # (sic) MLX compares the buffer index, which counts shape helpers too: see DESIGN.md
        if index < len(inputs) + len(output_names) - 1 or attributes:
            s += ",\n"
        else:
            s += ") {\n"
            if i < len(output_names) - 1:
                raise EmulatorCompileError(
                    f"metal_kernel {name!r}: MLX 0.32 generates a malformed signature for kernels with 2+ "
                    "outputs, an input _shape/_strides/_ndim helper and no thread attribute (its separator "
                    "logic counts helper buffers); reference an attribute such as thread_position_in_grid "
                    "in the source")
        index += 1
    for i, attr in enumerate(attributes):
        s += attr
        s += ",\n" if i < len(attributes) - 1 else ") {\n"
    s += source
    s += "\n}\n"
    if targs:
        tdef = kernel_name + template_def
        s += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return kernel_name, s


CUDA_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def cuda_source(name, input_names, output_names, source, header, inputs: Sequence[_Arr], output_dtypes,
                template) -> tuple[str, str]:
    """(kernel_name, source text) exactly as mx.fast.cuda_kernel generates them."""
    shape_infos = _shape_infos(source, input_names)
    targs = list(template or [])
    h = ""
    for _, v in targs:
        k = _targ_kind(v)
        if k == "int":
            h += f"_{int(v)}"
        elif k == "bool":
            h += "_t" if v else "_f"
        else:
            h += "_" + _DTYPES[dtype_name(v)].metal
    kernel_name = "custom_kernel_" + name + h
    s = CUDA_DEFAULT_HEADER + header
    s += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    s += "__global__ void " + kernel_name + "(\n"
    for i, a in enumerate(inputs):
        n = input_names[i]
        s += f"    const {_DTYPES[a.dtype].cuda}* {n},\n"
        if a.ndim > 0:
            sh, st, nd = shape_infos[i]
            if sh:
                s += f"    const __grid_constant__ Shape {n}_shape,\n"
            if st:
                s += f"    const __grid_constant__ Strides {n}_strides,\n"
            if nd:
                s += f"    const __grid_constant__ int {n}_ndim,\n"
    for i, n in enumerate(output_names):
        s += f"    {_DTYPES[output_dtypes[i]].cuda}* {n}"
        s += ",\n" if i < len(output_names) - 1 else ") {\n"
    if targs:
        for n, v in targs:
            k = _targ_kind(v)
            if k == "int":
                s += f"  constexpr int {n} = {int(v)};\n"
            elif k == "bool":
                s += f"  constexpr bool {n} = {'true' if v else 'false'};\n"
            else:
                s += f"  using {n} = {_DTYPES[dtype_name(v)].cuda};\n"
        s += "\n"
    s += source
    s += "\n}\n\n} // namespace mlx::core::cu\n"
    return kernel_name, s


# ---------------------------------------------------------------------------------------------
# rewriting for the C++ host compiler
# ---------------------------------------------------------------------------------------------
def strip_comments(text: str) -> str:
    """Remove // and /* */ comments (newlines kept, string/char literals respected)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "/" and i + 1 < n and text[i + 1] == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == "/" and i + 1 < n and text[i + 1] == "*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_TYPE = r"(?:const\s+|volatile\s+)*(?:unsigned\s+|signed\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?"
_ALIGN = r"(?:(?:__align__\s*\(\s*\d+\s*\)|alignas\s*\([^)]*\)|__attribute__\s*\(\([^)]*\)\))\s*)*"
_METAL_TG_DECL = re.compile(
    r"(?<![\w:.>])threadgroup\s+" + _ALIGN + r"(?P<type>" + _TYPE + r")\s+" + _ALIGN
    + r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]*\]\s*)*);"
)
_CUDA_SHARED_DECL = re.compile(
    r"(?<![\w:.>])(?P<ext>extern\s+)?(?:static\s+)?__shared__\s+" + _ALIGN + r"(?P<type>" + _TYPE + r")\s+"
    + _ALIGN + r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\];]*\]\s*)*);"
)
_SITE = "({ static char mmt_emu_site_; (const void*)&mmt_emu_site_; })"


def _rewrite_decl(m: re.Match) -> str:
    t, name = m.group("type").strip(), m.group("name")
    # each bound in parentheses: a `>` inside it must not close the template argument list
    dims = "".join(f"[({d})]" for d in re.findall(r"\[([^\]]*)\]", m.group("dims") or ""))
    if m.groupdict().get("ext"):
        return f"{t}* const {name} = reinterpret_cast<{t}*>(::mmt_emu::dyn_smem());"
    return f"auto& {name} = *::mmt_emu::tg_alloc<{t}{dims}>({_SITE});"


def rewrite_metal(text: str) -> str:
    return _METAL_TG_DECL.sub(_rewrite_decl, strip_comments(text))


def rewrite_cuda(text: str) -> str:
    text = strip_comments(text)
    text = text.replace('#include "mlx/backend/cuda/device/utils.cuh"', "")
    text = text.replace("#include <cooperative_groups.h>", "")
    return _CUDA_SHARED_DECL.sub(_rewrite_decl, text)


_UNSUPPORTED = {
    "metal": [
        (r"\btexture[123]d(?:_array)?\b|\btexturecube\b|\bdepth2d\b", "textures"),
        (r"\bsampler\b", "samplers"),
        (r"\bimageblock\b", "imageblocks"),
        (r"\[\[\s*function_constant", "function constants"),
        (r"\bfunction_constant\b", "function constants"),
        (r"\bsimdgroup_matrix_storage\b", "simdgroup_matrix_storage"),
        (r"\bmpp::|MetalPerformancePrimitives", "MetalPerformancePrimitives (NAX)"),
        (r"\braytracing::", "ray tracing"),
        (r"#\s*include\s*[<\"]metal_", "#include of Metal standard headers (MLX prepends nothing but its utils)"),
        (r"\bthreadgroup_imageblock\b", "imageblocks"),
    ],
    "cuda": [
        (r"\b__syncthreads_(?:count|and|or)\b", "__syncthreads_count/_and/_or"),
        (r"\bnvcuda::wmma\b|\bwmma::", "wmma"),
        (r"\bcute::|\bcutlass::", "CUTLASS/cute"),
        (r"\bcuda::(?:pipeline|memcpy_async|barrier)\b", "cuda::pipeline / memcpy_async / barrier"),
        (r"\btex[123]D\w*\b|\bsurf[123]D\w*\b", "textures/surfaces"),
        (r"\b__nanosleep\b", "__nanosleep"),
        (r"\bcg::this_grid\s*\(\s*\)\s*\.\s*sync\b|\bgrid_group\b[^;]*\.sync\b", "grid-wide sync"),
        (r"\b__match_(?:any|all)_sync\b", "__match_any_sync/__match_all_sync"),
    ],
}


def _scan_unsupported(dialect: str, text: str) -> None:
    for pat, what in _UNSUPPORTED[dialect]:
        m = re.search(pat, text)
        if m:
            line = text.count("\n", 0, m.start()) + 1
            raise EmulatorUnsupportedError(
                f"emulator ({dialect}): unsupported construct '{m.group(0)}' ({what}) at line {line} "
                "of the generated source")


# ---------------------------------------------------------------------------------------------
# compile + cache
# ---------------------------------------------------------------------------------------------
_LIB_CACHE: dict[str, ctypes.CDLL] = {}
_LIB_LOCK = threading.Lock()


def cache_dir() -> Path:
    """$MLX_MOE_TUNE_CACHE/emulator (its parent folder if the variable names a file, as the tuner's
    JSONL cache may), else ~/.cache/mlx-moe-tune/emulator."""
    d = os.environ.get(ENV_CACHE)
    if d:
        p = Path(d).expanduser()
        if p.suffix or p.is_file():
            p = p.parent
        base = p / "emulator"
    else:
        base = Path.home() / ".cache" / "mlx-moe-tune" / "emulator"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _runtime_text() -> str:
    return "".join((_RT / f).read_text() for f in ("runtime.h", "metal_shim.h", "cuda_shim.h") if (_RT / f).exists())


def _flags(check: bool) -> list[str]:
    f = ["-std=c++17", "-O2", "-fPIC", "-pthread", "-fno-strict-aliasing", "-fwrapv",
         "-fstack-clash-protection", "-Wno-attributes", "-Wno-unknown-pragmas", "-Wno-ignored-attributes", "-DMMT_EMULATOR", f"-I{_RT}"]
    if check:
        f += ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0", "-DMMT_EMU_CHECK=1"]
    return f


def _publish(path: Path, dest: Path) -> None:
    """Copy `path` to `dest` atomically (temp name in dest's folder + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pch_dir(cxx: str, flags: list[str], shim: str) -> Path | None:
    """A folder holding `<shim>.gch`, GCC's precompiled runtime + shim for these flags (saves
    about half of every kernel compile); None if it cannot be built (then plain headers are used)."""
    if os.environ.get("MLX_MOE_TUNE_EMULATOR_PCH", "1") == "0" or "clang" in cxx:
        return None
    key = hashlib.sha256("\0".join([cxx, " ".join(flags), _runtime_text(), shim]).encode()).hexdigest()[:24]
    d = cache_dir() / f"pch-{key}"
    gch = d / f"{shim}.gch"
    if gch.exists():
        return d
    with tempfile.TemporaryDirectory(prefix="mmt-emu-pch-") as work:
        out = Path(work) / f"{shim}.gch"
        r = subprocess.run([cxx, *flags, "-x", "c++-header", str(_RT / shim), "-o", str(out)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            return None
        _publish(out, gch)
    return d


def compile_library(tu: str, check: bool) -> ctypes.CDLL:
    cxx = os.environ.get(ENV_CXX, "g++")
    flags = _flags(check)
    key = hashlib.sha256("\0".join([cxx, " ".join(flags), _runtime_text(), tu]).encode()).hexdigest()[:40]
    with _LIB_LOCK:
        lib = _LIB_CACHE.get(key)
        if lib is not None:
            return lib
        d = cache_dir()
        so = d / f"{key}.so"
        src = d / f"{key}.cpp"
        if not so.exists():
            # build in a private temp folder, then publish into the cache with an atomic rename
            with tempfile.TemporaryDirectory(prefix="mmt-emu-") as work:
                wsrc = Path(work) / f"{key}.cpp"
                wsrc.write_text(tu)
                tmp = str(Path(work) / f"{key}.so")
                if check:
                    obj = str(Path(work) / f"{key}.o")
                    cmds = [[cxx, *flags, "-c", str(wsrc), "-o", obj], [cxx, "-shared", "-pthread", obj, "-o", tmp]]
                else:
                    cmds = [[cxx, *flags, "-shared", str(wsrc), "-o", tmp]]
                shim = "metal_shim.h" if '#include "metal_shim.h"' in tu[:200] else "cuda_shim.h"
                pch = _pch_dir(cxx, flags, shim)
                if pch is not None:  # searched before runtime/: GCC takes the .gch found first
                    cmds[0][1:1] = [f"-I{pch}"]
                _publish(wsrc, src)
                for cmd in cmds:
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    if r.returncode != 0:
                        msg = (r.stderr or r.stdout).strip()
                        if len(msg) > 12000:
                            msg = msg[:12000] + "\n... (truncated)"
                        raise EmulatorCompileError(
                            f"emulator: compiling the kernel failed ({cmd[0]} exit {r.returncode}).\n"
                            f"generated source: {src}\n{msg}")
                _publish(Path(tmp), so)
        try:
            lib = ctypes.CDLL(str(so), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as e:
            raise EmulatorCompileError(f"emulator: loading {so} failed: {e}\ngenerated source: {src}") from e
        lib.mmt_emu_launch.restype = ctypes.c_int
        lib.mmt_emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong),
                                       ctypes.POINTER(ctypes.c_longlong), ctypes.c_char_p, ctypes.c_int]
        lib.mmt_emu_source_path = str(src)
        _LIB_CACHE[key] = lib
        return lib


# ---------------------------------------------------------------------------------------------
# launcher generation
# ---------------------------------------------------------------------------------------------
def _c_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _launcher(entry_call: str, prologue: str, bufs: list[tuple[str, int, bool]]) -> str:
    names = ", ".join(_c_str(n) for n, _, _ in bufs)
    elems = ", ".join(str(e) for _, e, _ in bufs)
    outs = ", ".join("1" if o else "0" for _, _, o in bufs)
    nb = len(bufs)
    return f"""
// ---- emulator launcher (generated) ----
static void mmt_emu_entry(::mmt_emu::Fiber* f_) {{
  ::mmt_emu::Group* g_ = f_->g;
  ::mmt_emu::Launch* L_ = g_->L;
  void** B_ = L_->bufs;
  (void)g_; (void)B_;
{prologue}
  {entry_call};
}}

extern "C" MMT_EMU_RT int mmt_emu_launch(void** bufs, const long long* nbytes, const long long* P, char* err, int errlen) {{
  static const char* names_[] = {{{names}}};
  static const int elems_[] = {{{elems}}};
  static const int outs_[] = {{{outs}}};
  constexpr int nb = {nb};
  ::mmt_emu::Launch* L = new ::mmt_emu::Launch();
  for (int d = 0; d < 3; d++) {{
    L->groups[d] = uint32_t(P[d]);
    L->tg[d] = uint32_t(P[3 + d]);
    L->grid[d] = uint32_t(P[6 + d]);
  }}
  L->partial = int(P[9]);
  L->check = int(P[10]);
  L->dyn_smem = size_t(P[11]);
  const int nworkers = int(P[12]);
  L->tg_limit = size_t(P[13]);
  const size_t arena = size_t(P[14]);
  L->dialect = int(P[15]);
  L->tg_limit_what = L->dialect == 0 ? "Apple threadgroup memory" : "CUDA shared memory";
  L->kernel_name = {_c_str("")} MMT_EMU_KERNEL_NAME;
  L->entry = &mmt_emu_entry;
  std::vector<void*> ptrs(nb + 1);
  std::vector<::mmt_emu::Buffer> table(nb + 1);
  std::vector<::mmt_emu::Guarded> guards(nb + 1);
  for (int i = 0; i < nb; i++) {{
    char* p = static_cast<char*>(bufs[i]);
    if (L->check) {{
      guards[i] = ::mmt_emu::guard_buffer(p, size_t(nbytes[i]));
      if (!guards[i].data) {{ snprintf(err, errlen, "emulator: cannot map guarded buffer"); delete L; return 2; }}
      p = guards[i].data;
    }}
    ptrs[i] = p;
    table[i] = ::mmt_emu::Buffer{{p, p + nbytes[i], names_[i], elems_[i]}};
  }}
  L->bufs = ptrs.data();
  L->buffers = table.data();
  L->nbufs = nb;
  const int rc = ::mmt_emu::run_launch(L, nworkers, arena);
  if (L->check) {{
    for (int i = 0; i < nb; i++) {{
      if (outs_[i] && rc == 0) memcpy(bufs[i], guards[i].data, size_t(nbytes[i]));
      munmap(guards[i].map, guards[i].map_bytes);
    }}
  }}
  if (rc) snprintf(err, errlen, "%s", L->err);
  delete L;
  return rc;
}}
"""


# ---------------------------------------------------------------------------------------------
# the kernel objects
# ---------------------------------------------------------------------------------------------
def _as_triple(v, what) -> tuple[int, int, int]:
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"{what} must have 3 entries, got {v!r}")
    if any(x < 0 for x in t):
        raise ValueError(f"{what} entries must be >= 0, got {v!r}")
    return t


def _workers() -> int:
    n = os.cpu_count() or 1
    env = os.environ.get(ENV_THREADS)
    if env:
        n = max(1, int(env))
    return n


class _Kernel:
    dialect = ""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True):
        if not output_names:
            raise ValueError(f"[{self.dialect}_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous

    # subclass hooks
    def _generate(self, inputs, output_dtypes, template):
        raise NotImplementedError

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None, check=None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[{self.dialect}_kernel] Expected `inputs` to have size {len(self.input_names)} "
                             f"but got size {len(inputs)}.")
        if len(output_shapes) != len(self.output_names):
            raise ValueError(f"[{self.dialect}_kernel] Expected `output_shapes` to have size "
                             f"{len(self.output_names)} but got size {len(output_shapes)}.")
        if len(output_dtypes) != len(self.output_names):
            raise ValueError(f"[{self.dialect}_kernel] Expected `output_dtypes` to have size "
                             f"{len(self.output_names)} but got size {len(output_dtypes)}.")
        if check is None:
            check = os.environ.get(ENV_CHECK, "") not in ("", "0")
        arrs, from_mx = [], False
        for x in inputs:
            a, m = _to_arr(x)
            arrs.append(a)
            from_mx |= m
        odt = [dtype_name(d) for d in output_dtypes]
        oshapes = [tuple(int(s) for s in sh) for sh in output_shapes]
        grid = _as_triple(grid, "grid")
        tg = _as_triple(threadgroup, "threadgroup")
        if any(t == 0 for t in tg):
            raise ValueError(f"threadgroup entries must be >= 1, got {threadgroup!r}")
        for n, v in template or []:
            _targ_kind(v)

        kname, mlx_text, tu, params, bufspec = self._generate(arrs, odt, template, grid, tg)
        if verbose:
            print(f"Generated source code for `{kname if self.dialect == 'cuda' else self.name}`:\n```\n{mlx_text}\n```")
        lib = compile_library(tu, bool(check))

        # buffers: inputs (+ helpers), then outputs
        outs = []
        for sh, d in zip(oshapes, odt):
            st = _DTYPES[d].storage
            if init_value is not None:
                if d == "bfloat16":
                    o = np.full(sh, f32_to_bf16_bits(np.float32(init_value)), dtype=np.uint16)
                else:
                    o = np.full(sh, init_value, dtype=st)
            else:
                o = np.empty(sh, dtype=st)
                o.view(np.uint8).fill(0xFF)  # uninitialized: NaN / -1 pattern
            outs.append(o)
        buffers = []
        for kind, idx in bufspec:
            if kind == "in":
                buffers.append(arrs[idx].data)
            elif kind == "shape":
                sh = list(arrs[idx].shape)
                if self.dialect == "cuda":
                    sh = (sh + [0] * CUDA_MAX_NDIM)[:CUDA_MAX_NDIM]
                buffers.append(np.array(sh or [0], dtype=np.int32))
            elif kind == "strides":
                sh = arrs[idx].shape
                st = [int(np.prod(sh[i + 1:])) if sh else 1 for i in range(len(sh))]
                if self.dialect == "cuda":
                    st = (st + [0] * CUDA_MAX_NDIM)[:CUDA_MAX_NDIM]
                buffers.append(np.array(st or [0], dtype=np.int64))
            elif kind == "ndim":
                buffers.append(np.array([arrs[idx].ndim], dtype=np.int32))
            else:
                buffers.append(outs[idx])
        buffers = [b if b.ctypes.data % 64 == 0 or b.nbytes == 0 else _aligned_copy(b) for b in buffers]
        # outputs may have been replaced by aligned copies: keep the ones we pass
        out_bufs = [buffers[i] for i, (k, _) in enumerate(bufspec) if k == "out"]
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[b.ctypes.data for b in buffers])
        nbytes = (ctypes.c_longlong * max(1, len(buffers)))(*[b.nbytes for b in buffers])
        P = (ctypes.c_longlong * 16)(*params[:9], params[9], int(bool(check)), params[11], _workers(),
                                     params[13], params[14], params[15])
        err = ctypes.create_string_buffer(4096)
        rc = lib.mmt_emu_launch(ptrs, nbytes, P, err, 4096)
        if rc != 0:
            msg = err.value.decode(errors="replace")
            cls = EmulatorCheckError if (check and ("out-of-bounds" in msg or "race" in msg or "divergent" in msg)) \
                else EmulatorError
            raise cls(f"{msg}\n(generated source: {lib.mmt_emu_source_path})")
        res = []
        for o, d in zip(out_bufs, odt):
            res.append(_wrap_out(o, d, from_mx))
        return res


def _aligned_copy(b: np.ndarray) -> np.ndarray:
    raw = np.empty(b.nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    out = raw[off : off + b.nbytes].view(b.dtype).reshape(b.shape)
    out[...] = b
    return out


def _wrap_out(o: np.ndarray, d: str, as_mx: bool):
    if as_mx:
        mx = _mx()
        if d == "bfloat16":
            return mx.array(o).view(mx.bfloat16)
        return mx.array(o)
    if d == "bfloat16":
        bf = _ml_bf16()
        return o.view(bf) if bf is not None else o
    return o


class MetalKernel(_Kernel):
    dialect = "metal"

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False):
        super().__init__(name, input_names, output_names, source, header, ensure_row_contiguous)
        self.atomic_outputs = atomic_outputs

    def _generate(self, arrs, odt, template, grid, tg):
        kname, text = metal_source(self.name, self.input_names, self.output_names, self.source, self.header,
                                   arrs, odt, template, self.atomic_outputs)
        tgx = tuple(min(t, g) if g > 0 else t for t, g in zip(tg, grid))
        if tgx[0] * tgx[1] * tgx[2] > 1024:
            raise ValueError(f"[metal_kernel] threadgroup {threadgroup_str(tg)} has more than 1024 threads")
        groups = tuple((g + t - 1) // t for g, t in zip(grid, tgx))
        # argument list of the generated signature, in order
        shape_infos = _shape_infos(self.source, self.input_names)
        args, bufspec = [], []
        for i, a in enumerate(arrs):
            t = _DTYPES[a.dtype].metal
            b = len(bufspec)
            bufspec.append(("in", i))
            args.append(f"*(const {t}*)B_[{b}]" if a.ndim == 0 else f"(const {t}*)B_[{b}]")
            if a.ndim > 0:
                sh, st, nd = shape_infos[i]
                if sh:
                    args.append(f"(const int*)B_[{len(bufspec)}]")
                    bufspec.append(("shape", i))
                if st:
                    args.append(f"(const int64_t*)B_[{len(bufspec)}]")
                    bufspec.append(("strides", i))
                if nd:
                    args.append(f"*(const int*)B_[{len(bufspec)}]")
                    bufspec.append(("ndim", i))
        for i, d in enumerate(odt):
            t = _DTYPES[d].metal
            t = f"metal::atomic<{t}>" if self.atomic_outputs else t
            args.append(f"({t}*)B_[{len(bufspec)}]")
            bufspec.append(("out", i))
        attrs = [a for a, _ in METAL_ATTRIBUTES if a in self.source]
        args += [f"mmt_attr_{a}_" for a in attrs]
        prologue = "\n".join(f"  const auto mmt_attr_{a}_ = {_ATTR_EXPR[a]};" for a in attrs)
        tmpl = ""
        if template:
            parts = []
            for _, v in template:
                k = _targ_kind(v)
                parts.append(str(int(v)) if k in ("int", "bool") else _DTYPES[dtype_name(v)].metal)
            tmpl = "<" + ", ".join(parts) + ">"
        call = f"{kname}{tmpl}({', '.join(args)})"
        _scan_unsupported("metal", strip_comments(self.header + "\n" + self.source))
        m = _METAL_TG_DECL.search(strip_comments(self.header))
        if m:  # Apple's compiler allows threadgroup variables only in the kernel function itself
            raise EmulatorUnsupportedError(
                f"metal_kernel {self.name!r}: threadgroup variable '{m.group('name')}' is declared in the header "
                "(a helper function); Metal only allows threadgroup declarations at kernel scope: declare it in "
                "the kernel body and pass a `threadgroup T*` down")
        body = rewrite_metal(text)
        tu = (f'#include "metal_shim.h"\n#define MMT_EMU_KERNEL_NAME {_c_str(self.name)}\n#line 1 "kernel.metal"\n'
              + body + _launcher(call, prologue, self._bufnames(arrs, bufspec, odt)))
        params = [*groups, *tgx, *grid, 1, 0, 0, 0, 32768, 65536, 0]
        return kname, text, tu, params, bufspec

    def _bufnames(self, arrs, bufspec, odt):
        out = []
        for kind, i in bufspec:
            if kind == "in":
                out.append((self.input_names[i], arrs[i].data.itemsize, False))
            elif kind == "out":
                out.append((self.output_names[i], np.dtype(_DTYPES[odt[i]].storage).itemsize, True))
            elif kind == "strides":
                out.append((f"{self.input_names[i]}_strides", 8, False))
            else:
                out.append((f"{self.input_names[i]}_{kind}", 4, False))
        return out


def threadgroup_str(t) -> str:
    return "(" + ", ".join(str(x) for x in t) + ")"


class CudaKernel(_Kernel):
    dialect = "cuda"

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 shared_memory=0):
        super().__init__(name, input_names, output_names, source, header, ensure_row_contiguous)
        if shared_memory < 0:
            raise ValueError(f"shared_memory must be >= 0, got {shared_memory}")
        self.shared_memory = int(shared_memory)

    def _generate(self, arrs, odt, template, grid, tg):
        kname, text = cuda_source(self.name, self.input_names, self.output_names, self.source, self.header,
                                  arrs, odt, template)
        block = tuple(min(t, g) for t, g in zip(tg, grid))
        groups = tuple((g + t - 1) // t for g, t in zip(grid, tg))
        if block[0] > 1024 or block[1] > 1024 or block[2] > 64 or block[0] * block[1] * block[2] > 1024:
            raise ValueError(f"[cuda_kernel] invalid block {threadgroup_str(block)}: at most 1024 threads, "
                             "z <= 64")
        if groups[1] > 65535 or groups[2] > 65535 or groups[0] > 2**31 - 1:
            raise ValueError(f"[cuda_kernel] grid of {threadgroup_str(groups)} blocks exceeds CUDA's limits "
                             "(gridDim.y, gridDim.z <= 65535): put the long axis on x")
        if self.shared_memory > 232448:
            raise ValueError(f"[cuda_kernel] shared_memory={self.shared_memory} exceeds 227 KB")
        shape_infos = _shape_infos(self.source, self.input_names)
        args, bufspec = [], []
        for i, a in enumerate(arrs):
            t = _DTYPES[a.dtype].cuda
            args.append(f"(const {t}*)B_[{len(bufspec)}]")
            bufspec.append(("in", i))
            if a.ndim > 0:
                sh, st, nd = shape_infos[i]
                if sh:
                    args.append(f"::mlx::core::cu::Shape::load((const int32_t*)B_[{len(bufspec)}])")
                    bufspec.append(("shape", i))
                if st:
                    args.append(f"::mlx::core::cu::Strides::load((const int64_t*)B_[{len(bufspec)}])")
                    bufspec.append(("strides", i))
                if nd:
                    args.append(f"*(const int*)B_[{len(bufspec)}]")
                    bufspec.append(("ndim", i))
        for i, d in enumerate(odt):
            args.append(f"({_DTYPES[d].cuda}*)B_[{len(bufspec)}]")
            bufspec.append(("out", i))
        call = f"::mlx::core::cu::{kname}({', '.join(args)})"
        _scan_unsupported("cuda", strip_comments(self.header + "\n" + self.source))
        body = rewrite_cuda(text)
        tu = (f'#include "cuda_shim.h"\n#define MMT_EMU_KERNEL_NAME {_c_str(self.name)}\n#line 1 "kernel.cu"\n'
              + body + _launcher(call, "", MetalKernel._bufnames(self, arrs, bufspec, odt)))
        full = tuple(b * t for b, t in zip(groups, block))
        params = [*groups, *block, *full, 0, 0, self.shared_memory, 0, 232448, self.shared_memory + 262144, 1]
        return kname, text, tu, params, bufspec


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False) -> MetalKernel:
    """Emulated `mx.fast.metal_kernel` (same arguments; the call also takes `check=`)."""
    return MetalKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)


def cuda_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                header: str = "", ensure_row_contiguous: bool = True, shared_memory: int = 0) -> CudaKernel:
    """Emulated `mx.fast.cuda_kernel` (same arguments; the call also takes `check=`)."""
    return CudaKernel(name, input_names, output_names, source, header, ensure_row_contiguous, shared_memory)
