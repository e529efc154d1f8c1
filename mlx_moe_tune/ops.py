"""`gather_qmm`: mx.gather_qmm (transpose=True, rhs_indices only) on tile-tuned kernels.

Covers the two call layouts mlx-lm uses:
- sorted:   x (P, 1, K),       indices (P,)       -> (P, 1, N)
- unsorted: x (..., 1, 1, K),  indices (..., k)   -> (..., k, 1, N)
and any other x batch that broadcasts against `indices` (materialized once). The kernel family
and tile come from, in order: the `family`/`config` arguments, a tuning table
(`tables.lookup`, tuned entries only), then `default_choice` below (measured on the H100).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx

from . import first_use
from .backend import Backend, get_backend
from .kernels import registry
from .kernels.common import as_dtype, dtype_name
from .kernels import metal_tiles
from .kernels.family import Problem, parse_config_id
from .kernels.plan import Plan, as_plan, make_plan


def _layout(x: mx.array, indices: mx.array) -> tuple[mx.array, mx.array, int, tuple[int, ...]]:
    """(x rows (X, K), flat indices (P,), X_DIV, output batch shape)."""
    if x.ndim < 2:
        raise ValueError(f"x must be (..., M, K), got shape {x.shape}")
    if x.shape[-2] != 1:
        raise ValueError(f"x must have M=1 row per (token, expert) pair (x.shape[-2]), got shape {x.shape}")
    bx = tuple(x.shape[:-2])
    try:
        batch = tuple(mx.broadcast_shapes(bx, tuple(indices.shape)))
    except ValueError:
        raise ValueError(f"x batch shape {bx} does not broadcast with indices shape {indices.shape}") from None
    K = x.shape[-1]
    P = 1
    for d in batch:
        P *= d
    flat = mx.broadcast_to(indices, batch).reshape(-1) if tuple(indices.shape) != batch else indices.reshape(-1)
    if bx == batch:  # one x row per pair (mlx-lm sorted layout)
        return x.reshape(P, K), flat, 1, batch
    if batch and len(bx) == len(batch) and bx[:-1] == batch[:-1] and bx[-1] == 1:
        return x.reshape(P // batch[-1], K), flat, batch[-1], batch  # per-token layout: x row = p / k
    return mx.broadcast_to(x, (*batch, 1, K)).reshape(P, K), flat, 1, batch


def _validate(x, w, scales, biases, indices, group_size, bits, mode) -> tuple[int, int, int]:
    if mode != "affine":
        raise ValueError(f"mode {mode!r} is not supported (affine only)")
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} is not supported (2, 4 or 8)")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size={group_size} is not supported (32, 64 or 128)")
    if w.ndim != 3 or w.dtype != mx.uint32:
        raise ValueError(f"w must be (E, N, K*bits/32) uint32, got shape {w.shape} dtype {w.dtype}")
    E, N, KW = w.shape
    K = KW * 32 // bits
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]} but w packs K={K} at {bits} bits")
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}")
    want = (E, N, K // group_size)
    for name, a in (("scales", scales), ("biases", biases)):
        if a is None:
            raise ValueError(f"affine mode needs {name}")
        if tuple(a.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    dtype_name(x.dtype)  # raises on an unknown activation dtype
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    return E, N, K


def _check_range(flat: mx.array, E: int) -> None:
    if flat.size == 0:
        return
    lo, hi = mx.min(flat).item(), mx.max(flat).item()  # host sync: pass validate=False in hot paths
    if lo < 0 or hi >= E:
        raise ValueError(f"expert index out of range: indices span [{lo}, {hi}] but w has {E} experts")


def default_choice(problem: Problem, sorted_layout: bool) -> tuple[str, dict[str, int]]:
    """Family and tile when no tuning table covers the problem: the best configs per m measured
    on the H100 for gemma-26b-a4b (N=1408 and 704; sweeps/results/h100/tuned-cuda.csv)."""
    m = problem.rows_per_expert
    if m <= 1.5 and problem.rows * problem.n * 4 < 2**31:
        return "qmv", {"FN": 2, "WN": 2, "WK": 2, "KU": 1}
    if m <= 8:
        return "qmm", {"BM": 8, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2}
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return "qmm", {"BM": bm, "FN": 2, "WN": 4, "WK": 1, "MC": 4, "KU": 2 if bm == 16 else 1}


_CHOICES: dict = {}


def _choice(problem, backend, family, config, glu, sorted_layout, top_k):
    """(family, config, source) for this call, source "argument", "table" or "default";
    memoized per problem, since tables.lookup walks the table directories and this runs on every
    op call (the decode hot path)."""
    key = (problem, backend.name, family, None if config is None else
           (config if isinstance(config, str) else tuple(sorted(dict(config).items()))), glu, sorted_layout, top_k)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _choose_uncached(problem, backend, family, config, glu, sorted_layout, top_k)
    return hit[0], dict(hit[1]), hit[2]


def _fit_glu(fam, problem, config, backend):
    """A single-set tile made to fit the fused kernel, which holds two weight sets: as given if
    valid, else with the N tile halved (FN=1), else one k block per step (KU=1), else both; each
    halves the registers in flight. The first valid one; the given one if none is (its check
    then says why)."""
    for change in ({}, {"FN": 1}, {"KU": 1}, {"FN": 1, "KU": 1}):
        cand = {**config, **{k: v for k, v in change.items() if k in config}}
        if fam.check(problem, cand, backend) is None:
            return cand
    return config


def _choose_uncached(problem, backend, family, config, glu, sorted_layout, top_k):
    source = "argument" if (family is not None or config is not None) else "default"
    if isinstance(config, str):
        config = parse_config_id(config)
    if family is None and config is not None:
        keys = set(config)
        family = next((n for n, f in registry.FAMILIES.items() if f.takes(keys, backend.dialect)
                       and n.endswith("_glu") == glu), None)
        if family is None:
            raise ValueError(f"config {config} matches no kernel family's tile parameters")
    if family is not None and glu and not family.endswith("_glu"):
        family += "_glu"  # qmv -> qmv_glu, qmm -> qmm_glu: the fused variant of the same tile
    if family is None:
        try:
            from . import tables

            hit = tables.lookup(problem, backend, top_k=top_k, heuristic_fallback=False)
        except ImportError:
            hit = None
        if hit is not None and hit[1] is not None:
            family, config = hit
            source = "table"
        elif backend.dialect == "metal":  # Metal tiles have their own parameters
            family, config = metal_tiles.default_choice(problem, glu)
        else:
            family, config = default_choice(problem, sorted_layout)
        if glu and not family.endswith("_glu"):  # a single-set tile (table, default) for the fused kernel
            family += "_glu"
            config = _fit_glu(registry.get(family), problem, config, backend)
    fam = registry.get(family)
    if config is not None and not fam.takes(config, backend.dialect):
        raise ValueError(f"config {dict(config)} does not have {family}'s {backend.dialect} tile parameters "
                         f"{', '.join(fam.space.get(backend.dialect, {}))}")
    if config is None:
        valid = fam.valid_configs(problem, backend)
        if not valid:
            raise ValueError(f"no valid {family} config for {problem}: {fam.check(problem, next(fam.configs(backend.dialect)), backend)}")
        config = valid[0]
    config = fam.complete(config, backend.dialect)
    why = fam.check(problem, config, backend)
    if why is not None:
        raise ValueError(f"invalid {family} config {config} for this problem: {why}")
    return fam, config, source


def _launch_kwargs(fam, problem, config, backend: Backend, x_div: int) -> tuple[dict, int]:
    """Kernel-call keywords of one (family, tile, problem), less inputs and output dtypes, and the
    dynamic shared memory the kernel object is built with (family.kernel). `config` is complete
    (family.complete: every tile param, optional ones included)."""
    launch = fam.launch(problem, config, backend)
    kwargs = dict(template=fam.call_template(problem, config, x_div), grid=launch.grid,
                  threadgroup=launch.threadgroup, output_shapes=[(problem.rows, problem.n)])
    return kwargs, launch.shared_memory


def _run(fam, problem, config, backend: Backend, inputs: list, x_div: int) -> mx.array:
    """One launch with a given tile (A/B scripts; the op itself memoizes _launch_kwargs)."""
    config = fam.complete(config, backend.dialect)  # e.g. a config id from before PF existed
    kwargs, smem = _launch_kwargs(fam, problem, config, backend, x_div)
    (y,) = fam.kernel(backend, smem)(inputs=inputs, output_dtypes=[inputs[0].dtype], **kwargs)
    return y


def _prepare(x, w, scales, biases, indices, group_size, bits, mode, backend, m, w_extra=()):
    b = get_backend(backend)
    E, N, K = _validate(x, w, scales, biases, indices, group_size, bits, mode)
    for wx, sx, bx in w_extra:
        if tuple(wx.shape) != tuple(w.shape) or tuple(sx.shape) != tuple(scales.shape) or tuple(bx.shape) != tuple(biases.shape):
            raise ValueError("gate and up weights must have the same shapes")
    x2, flat, x_div, batch = _layout(x, indices)
    problem = Problem(experts=E, k=K, n=N, rows=flat.size, bits=bits, group_size=group_size, mode=mode,
                      dtype=dtype_name(x.dtype), m=m)
    return b, problem, x2, x_div, batch


def gather_qmm(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, indices: mx.array, *,
               group_size: int = 64, bits: int = 4, mode: str = "affine", sorted_indices: bool = False,
               config: Mapping[str, int] | str | None = None, family: str | None = None,
               plan: Plan | None = None, backend: str | Backend | None = None, validate: bool = False,
               m: float | None = None) -> mx.array:
    """Same result as `mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, transpose=True,
    group_size=..., bits=..., mode=..., sorted_indices=...)`.

    plan: a `kernels.plan.make_plan(indices, E)` (or a `SharedPlan`) to reuse across calls with
    the same routing (gate, up, down); with sorted indices none is needed (the kernels find
    their rows in the ids). validate: check expert ids on the host and raise on one outside
    [0, E) (one sync per call). Off by default: the call then never syncs, and a bad id's rows
    come out as zeros (the kernels read no weights for it). m: rows per expert, if known (tile
    choice only). family/config: force a kernel family ("qmv", "qmm") and tile.
    """
    return _call(x, ((w, scales, biases),), indices, group_size, bits, mode, sorted_indices, config,
                 family, plan, backend, validate, m)


FUSED_MIN_M = 24  # rows per expert from which qmm_glu beats two calls (see gather_qmm_glu)


def gather_qmm_glu(x: mx.array, w_gate, scales_gate, biases_gate, w_up, scales_up, biases_up,
                   indices: mx.array, *, group_size: int = 64, bits: int = 4, mode: str = "affine",
                   sorted_indices: bool = False, config: Mapping[str, int] | str | None = None,
                   family: str | None = None, plan: Plan | None = None,
                   backend: str | Backend | None = None, validate: bool = False,
                   m: float | None = None) -> mx.array:
    """silu(gather_qmm(x, gate)) * gather_qmm(x, up) (mlx-lm SwitchGLU, SwiGLU).

    Where the tile choice is the no-reuse qmv (decode), one qmv_glu kernel runs both weight sets
    on the same x loads and applies the epilogue: one launch instead of two kernels plus the
    elementwise ops. On the reuse path, from FUSED_MIN_M rows per expert on (or whenever `config`
    or `family` is given) one qmm_glu kernel reads x once for both weight sets; below it, two
    tuned calls share the plan and are followed by a compiled silu(g) * u. Measured on the H100
    (E=128, K=2816, N=1408; sweeps/results/h100/tuned-cuda-gemma-26b-a4b-op.csv): qmm_glu's
    doubled register tile makes it 1.9x slower at m <= 8, a wash at m = 16 (+-10% between runs),
    1.15-1.18x faster at m = 32 and about even at m = 64."""
    return _call(x, ((w_gate, scales_gate, biases_gate), (w_up, scales_up, biases_up)), indices,
                 group_size, bits, mode, sorted_indices, config, family, plan, backend, validate, m)


@mx.compile
def _swiglu(g: mx.array, u: mx.array) -> mx.array:
    return (g * mx.sigmoid(g) * u).astype(g.dtype)


def _shape_key(a):
    return None if a is None else (tuple(a.shape), a.dtype)


def _call(x, wsets, indices, group_size, bits, mode, sorted_indices, config, family, plan, backend,
          validate, m):
    """gather_qmm (one weight set) or its fused SwiGLU (two). The per-shape work (validation, tile
    choice, launch geometry) is memoized in a _Spec; per call only reshapes, the optional range
    check, the plan and the launch remain (the decode hot path)."""
    ckey = config if config is None or isinstance(config, str) else tuple(dict(config).items())
    key = (tuple(x.shape), x.dtype, tuple(_shape_key(a) for ws in wsets for a in ws),
           tuple(indices.shape), indices.dtype, group_size, bits, mode, sorted_indices, family, ckey,
           backend if backend is None or isinstance(backend, str) else backend.name, m)
    spec = _SPECS.get(key)
    if spec is None:  # first call with these shapes: validate everything and choose the tile
        if len(_SPECS) > 4096:  # many distinct token counts (prefill): keep the memo bounded
            _SPECS.clear()
        spec = _SPECS[key] = first_use.guard(_spec(x, wsets, indices, group_size, bits, mode, sorted_indices,
                                                   config, family, backend, m))  # GPU: first-use check
    if spec.source == first_use.STOCK:  # its kernel failed the first-use check on this device
        return first_use.stock(x, wsets, indices, group_size, bits, mode, sorted_indices)
    if spec.problem.rows == 0:
        return mx.zeros(spec.out_shape, dtype=x.dtype)
    x2, flat, _, _ = _layout(x, indices) if spec.materialize else (
        x.reshape(spec.x_rows, spec.problem.k), indices.reshape(-1), None, None)
    flat = as_dtype(flat, mx.int32)
    if validate:
        _check_range(flat, spec.problem.experts)
    # Sorted ids with no plan given run the reuse kernels' sorted twin, which finds its rows in
    # the ids: the op is one launch. Otherwise the reuse kernels read a plan (built here once).
    twin = plan is None and sorted_indices and spec.twin is not None
    if plan is not None:  # read (and a SharedPlan built) only where a kernel consumes it
        if spec.fam is not None and spec.fam.route == "plan":
            plan = as_plan(plan, spec.problem.experts, spec.problem.rows)
    elif _needs_plan(spec, sorted_indices, twin):
        plan = make_plan(flat, spec.problem.experts, sorted_indices=sorted_indices, backend=spec.backend)
    if spec.fam is None:  # fused SwiGLU below FUSED_MIN_M: two tuned calls sharing the routing
        kw = dict(group_size=group_size, bits=bits, mode=mode, sorted_indices=sorted_indices,
                  plan=plan, backend=backend, validate=False, m=m)
        g = gather_qmm(x, *wsets[0], indices, **kw)
        return _swiglu(g, gather_qmm(x, *wsets[1], indices, **kw))
    weights = [a for w, sc, b in wsets for a in (w, as_dtype(sc, x.dtype), as_dtype(b, x.dtype))]
    if twin:
        fam, kwargs, smem, tail = spec.twin, spec.twin_kwargs, spec.twin_smem, [flat]
    else:
        fam, kwargs, smem = spec.fam, spec.kwargs, spec.smem
        tail = [flat] if fam.route == "ids" else [plan.order, plan.offsets]
    (y,) = fam.kernel(spec.backend, smem)(inputs=[x2, *weights, *tail], output_dtypes=[x.dtype], **kwargs)
    return y.reshape(spec.out_shape)


def _needs_plan(spec: "_Spec", sorted_indices: bool, twin: bool) -> bool:
    """Whether a call with no plan given builds one: for the reuse kernels unless their sorted
    twin runs, and for the fused op's two-call path (shared by both calls) unless the ids are
    sorted (each call then runs the twin)."""
    if spec.fam is None:
        return not sorted_indices
    return spec.fam.route == "plan" and not twin


def describe(x, w, scales, biases, indices, *, group_size: int = 64, bits: int = 4, mode: str = "affine",
             sorted_indices: bool = False, config=None, family=None, backend=None, m=None,
             w_up=None) -> dict:
    """What `gather_qmm` (or, with `w_up=(w, scales, biases)` of the up projection,
    `gather_qmm_glu`) runs with these arguments, without running it: family ("" for the fused
    op's two-call path), config id and where the choice came from ("table" = a tuning table,
    "default", "argument")."""
    from .kernels.family import config_id

    wsets = ((w, scales, biases),) if w_up is None else ((w, scales, biases), tuple(w_up))
    sp = _spec(x, wsets, indices, group_size, bits, mode, sorted_indices, config, family, backend, m)
    return dict(family=sp.fam.name if sp.fam else "", config=config_id(sp.config) if sp.config else "",
                source=sp.source)


@dataclass(frozen=True)
class _Spec:
    """Everything about a gather_qmm call that depends only on shapes, dtypes and arguments."""

    problem: Problem
    backend: Backend
    fam: object  # None: nothing to launch (no rows, or the fused op's two-call path)
    kwargs: dict  # kernel-call keywords except inputs and output dtypes
    x_rows: int
    materialize: bool  # x batch broadcasts another way: _layout per call
    out_shape: tuple
    config: dict | None = None  # the tile chosen
    source: str = ""  # "argument", "table" or "default"
    smem: int = 0  # dynamic shared memory bytes (CUDA)
    twin: object = None  # fam's sorted twin, for sorted ids without a plan (None: not valid here)
    twin_kwargs: dict | None = None
    twin_smem: int = 0


_SPECS: dict = {}


def _spec(x, wsets, indices, group_size, bits, mode, sorted_indices, config, family, backend, m):
    (w, scales, biases), glu = wsets[0], len(wsets) > 1
    b, problem, x2, x_div, batch = _prepare(x, w, scales, biases, indices, group_size, bits, mode, backend, m,
                                            w_extra=wsets[1:])
    out_shape = (*batch, 1, problem.n)
    materialize = tuple(indices.shape) != batch or (x_div == 1 and tuple(x.shape[:-2]) != batch)
    if problem.rows == 0:
        return _Spec(problem, b, None, {}, 0, materialize, out_shape, None, "empty")
    top_k = indices.shape[-1] if (x_div > 1 and indices.ndim) else None
    fam, cfg, source = _choice(problem, b, family, config, glu, sorted_indices, top_k)
    if (glu and fam.name == "qmm_glu" and config is None and family is None
            and problem.rows_per_expert < FUSED_MIN_M):
        return _Spec(problem, b, None, {}, x2.shape[0], materialize, out_shape, None, source)
    kwargs, smem = _launch_kwargs(fam, problem, cfg, b, x_div)
    twin, twin_kwargs, twin_smem = fam.sorted_twin if sorted_indices else None, None, 0
    if twin is not None and twin.check(problem, cfg, b) is None:
        twin_kwargs, twin_smem = _launch_kwargs(twin, problem, cfg, b, x_div)
    else:
        twin = None
    return _Spec(problem, b, fam, kwargs, x2.shape[0], materialize, out_shape, cfg, source, smem,
                 twin, twin_kwargs, twin_smem)
