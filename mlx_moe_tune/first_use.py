"""Fail-safe first use of a kernel on a real GPU.

Before the op (and so the mlx-lm patch) runs a (family, config, format, dtype) on a Metal or CUDA
device for the first time, it compiles and runs that kernel on a tiny problem against the numpy
reference (selftest's own runner). A kernel that fails sends the call to `mx.gather_qmm`, with
one warning naming the kernel and the error. The verdict is cached on disk per device, MLX
version and kernel source hash (`~/.cache/mlx-moe-tune/first-use/`), so the check costs nothing
the second time; `mlx-moe-tune selftest --cache` prints the verdicts.

The emulator backends skip this: CI proves every shipped config there (tests/test_metal_kernels.py,
selftest). `MLX_MOE_TUNE_FIRST_USE=0` turns the check off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

ENV = "MLX_MOE_TUNE_FIRST_USE"
STOCK = "stock (first-use check failed)"  # the _Spec source of a call sent to mx.gather_qmm

# MLX's errors for an eval inside mx.compile / vmap tracing
_TRACING = ("function transformations", "If you are compiling a function")
_VERDICTS: dict[str, dict] = {}  # in-process memo: key -> record
_WARNED: set[str] = set()


class FirstUseWarning(UserWarning):
    """A kernel failed its first-use check on this device; the call runs mx.gather_qmm."""


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("0", "", "off", "false")


def cache_dir() -> Path:
    from .emulator.kernel import cache_dir as emu

    d = emu().parent / "first-use"
    d.mkdir(parents=True, exist_ok=True)
    return d


def device_name(backend) -> str:
    import mlx.core as mx

    try:
        info = mx.device_info()
        dev = str(info.get("device_name") or info.get("architecture") or "")
    except Exception:  # noqa: BLE001 - no device info: the backend's name still keys the verdict
        dev = ""
    return f"{backend.name}:{dev}" if dev else backend.name


def _label(fam) -> str:
    return getattr(fam, "label", fam.name)


def _source_hash(fam, dialect: str) -> str:
    body, header = fam.sources[dialect].text()
    return hashlib.sha256(f"{header}\0{body}".encode()).hexdigest()[:16]


def _key(fam, problem, config, backend, x_div: int) -> tuple[str, dict]:
    import mlx.core as mx

    from .kernels.family import config_id

    rec = dict(device=device_name(backend), mlx=mx.__version__, kernel=_label(fam),
               source=_source_hash(fam, backend.dialect), config=config_id(config), mode=problem.mode,
               bits=problem.bits, group_size=problem.group_size, dtype=problem.dtype, decode_layout=x_div > 1)
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:32], rec


def tiny_case(fam, problem, config, backend, x_div: int):
    """A selftest Case of this format on which `config` is valid (ragged rows, an expert with
    none), or None when the tile cannot run any small problem."""
    from .selftest import Case

    gs = problem.group_size
    for k, n in ((max(128, 2 * gs), 72), (problem.k, min(problem.n, 136))):
        case = Case("first-use", counts=(0, 1, 5, 37), k=k, n=n, bits=problem.bits, group_size=gs,
                    dtype=problem.dtype, x_div=x_div)
        if fam.check(case.problem(), config, backend) is None:
            return case
    return None


def check(fam, problem, config, backend, x_div: int = 1) -> dict:
    """The first-use verdict of one kernel (cached in memory and on disk): a record with `ok`,
    `error` and what it was keyed by."""
    key, rec = _key(fam, problem, config, backend, x_div)
    if key in _VERDICTS:
        return _VERDICTS[key]
    path = cache_dir() / f"{key}.json"
    try:
        hit = json.loads(path.read_text())
        _VERDICTS[key] = hit
        return hit
    except (OSError, ValueError):
        pass
    from .selftest import _run_one, build_inputs

    t0 = time.perf_counter()
    case = tiny_case(fam, problem, config, backend, x_div)
    if case is None:  # nothing small to run it on: let it run (the selftest covers it elsewhere)
        ok, err, msg = True, None, "no tiny problem takes this tile (not checked)"
    else:
        try:
            r = _run_one(fam, backend, case, dict(config), build_inputs(case), False)
            ok, err, msg = r.ok, r.error, r.message
        except Exception as e:  # noqa: BLE001 - building the inputs failed
            ok, err, msg = False, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok and any(t in (msg or "") for t in _TRACING):
        # first met inside mx.compile (the patch's decode path), where nothing may be evaluated:
        # no verdict yet, the kernel runs as it would without this check, and the next call
        # outside a trace checks it
        return dict(rec, ok=True, error=None, message=f"not checked inside a trace ({msg})")
    rec.update(ok=bool(ok), error=err, message=msg, seconds=round(time.perf_counter() - t0, 3),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)
    _VERDICTS[key] = rec
    return rec


def _x_div(spec) -> int:
    for k, v in (spec.kwargs or {}).get("template", []):
        if k == "X_DIV":
            return int(v)
    return 1


def guard(spec):
    """`spec` (ops._Spec, a call's chosen kernel) if the kernels it runs pass their first-use check
    on this device, else the spec of a stock call (source STOCK). One warning per failing kernel."""
    if (spec.fam is None or spec.backend.emulated or not enabled() or spec.config is None):
        return spec
    kernels = [spec.fam] + [t for t in [getattr(spec, "twin", None)] if t is not None]
    for fam in kernels:
        # the sorted twin reads one x row per sorted pair: its tiny problem has no x_div
        x_div = 1 if getattr(fam, "route", None) == "sorted" else _x_div(spec)
        rec = check(fam, spec.problem, spec.config, spec.backend, x_div)
        if not rec["ok"]:
            what = f"{_label(fam)} {rec['config']} ({rec['mode']} {rec['bits']}-bit gs{rec['group_size']} {rec['dtype']})"
            if what not in _WARNED:
                _WARNED.add(what)
                warnings.warn(f"mlx-moe-tune: kernel {what} failed its first-use check on {rec['device']}: "
                              f"{rec['message'] or rec['error']}; these calls run mx.gather_qmm instead "
                              f"(verdict cached in {cache_dir()}; mlx-moe-tune selftest --cache lists them)",
                              FirstUseWarning, stacklevel=4)
            extra = {"twin": None} if hasattr(spec, "twin") else {}
            return dataclasses.replace(spec, fam=None, source=STOCK, **extra)
    return spec


def stock(x, wsets, indices, group_size, bits, mode, sorted_indices):
    """What mx.gather_qmm gives for the op's call (both weight sets and the SwiGLU for the fused op)."""
    import mlx.core as mx

    ys = [mx.gather_qmm(x, w, s, b, rhs_indices=indices, transpose=True, group_size=group_size, bits=bits,
                        mode=mode, sorted_indices=sorted_indices) for w, s, b in wsets]
    if len(ys) == 1:
        return ys[0]
    from .ops import _swiglu

    return _swiglu(ys[0], ys[1])


def records() -> list[dict]:
    """Every cached verdict on this machine, newest first."""
    out = []
    for p in cache_dir().glob("*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("date", ""), reverse=True)


def format_records(recs: list[dict]) -> str:
    lines = [f"first-use verdicts ({cache_dir()}): {len(recs)}"]
    for r in recs:
        status = "pass" if r.get("ok") else "FAIL"
        lines.append(f"  {status:<4} {r.get('device', '?'):<28} mlx {r.get('mlx', '?'):<8} {r.get('kernel', '?'):<10} "
                     f"{r.get('config', '?'):<32} {r.get('mode', '?')} {r.get('bits', '?')}-bit gs{r.get('group_size', '?')} "
                     f"{r.get('dtype', '?'):<8} src {r.get('source', '?')}  {r.get('message') or ''}")
    return "\n".join(lines)


def clear_memo() -> None:
    """Forget the in-process verdicts and warnings (tests; the disk cache stays)."""
    _VERDICTS.clear()
    _WARNED.clear()
