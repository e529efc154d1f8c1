"""The gather_qmm kernel families, by name, and their sweep registration.

`FAMILIES` / `families()` are what the op, the tuner (tables.py), the selftest and the sweep
iterate; a family carries its sources per dialect, so the same list serves Metal and CUDA.
"""
from __future__ import annotations

from .family import KernelFamily
from .qmm import QMM, QMM_GLU
from .qmv import QMV, QMV_GLU

FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (QMV, QMV_GLU, QMM, QMM_GLU)}


def families() -> list[KernelFamily]:
    return list(FAMILIES.values())


def add_space_argument(p) -> None:
    """`--space KEY=V1,V2` of sweep and tune (applied by set_space_overrides)."""
    p.add_argument("--space", action="append", default=None, metavar="KEY=V1,V2",
                   help="search these values of tile param KEY in every family that has it (repeatable), "
                   "e.g. PF=0,3 (L2 prefetch) or WS=0,1 (W through shared memory)")


def set_space_overrides(items) -> dict:
    """Apply `--space KEY=V1,V2` items to this process and the ones it starts (kernels.family
    SPACE_ENV); a KEY no family searches is an error. Returns the parsed overrides."""
    import os

    from .family import SPACE_ENV, parse_space

    over = parse_space(items or [])
    known = {k for f in FAMILIES.values() for sp in f.space.values() for k in sp}
    unknown = sorted(set(over) - known)
    if unknown:
        raise ValueError(f"--space: no kernel family has tile parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    if over:
        os.environ[SPACE_ENV] = ";".join(f"{k}={','.join(map(str, v))}" for k, v in over.items())
    return over


def get(name: str) -> KernelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown kernel family {name!r}; choose from {sorted(FAMILIES)}") from None


# --- sweep integration: tuned.<family> and tuned.auto -----------------------------------------
# Each call rotates weight copies (case.rotation()) so timed calls stream from memory. The reuse
# families run mlx-lm's sorted layout with the plan computed once per case (as gate/up/down
# share it); qmv runs the per-token decode layout, which needs no plan; tuned.auto is the op's
# own choice with its plan computed inside every call.


def _sorted_plan(case):
    """Plan of the sorted layout: identity order, the case's per-expert offsets (computed once)."""
    from .plan import Plan

    cached = getattr(case, "_mmt_sorted_plan", None)
    if cached is None:
        import mlx.core as mx

        P = case.rows
        cached = Plan(mx.arange(P, dtype=mx.int32), case.plan.offsets.astype(mx.int32), case.problem.experts, P)
        mx.eval(cached.order, cached.offsets)
        try:
            case._mmt_sorted_plan = cached
        except AttributeError:  # frozen case: recompute per build (still outside the timed call)
            pass
    return cached


def _configs(fam):
    def configs(case):
        return fam.valid_configs(case.problem, case.backend)

    return configs


def _check(fam):
    def check(case, config):
        return fam.check(case.problem, config, case.backend)

    return check


def _build(fam):
    glu = fam.name.endswith("_glu")  # gate and up: two weight copies per call, the fused op
    decode = "idx" in fam.input_names  # qmv reads expert ids: mlx-lm's per-token layout

    def build(case, config):
        from .. import ops  # imported lazily: ops imports this registry

        op = ops.gather_qmm_glu if glu else ops.gather_qmm
        nxt, q = case.rotation(), case.quant
        if decode:
            x, idx, extra = case.x_unsorted, case.idx_unsorted, {}
        else:
            x, idx, extra = case.x_sorted, case.idx_sorted, dict(sorted_indices=True, plan=_sorted_plan(case))

        def call():
            weights = [a for _ in range(2 if glu else 1) for a in nxt()]
            return op(x, *weights, idx, **q, family=fam.name, config=config, validate=False,
                      backend=case.backend, **extra)
        return call

    return build


def _auto_config(case):
    """The op's own choice, as the sweep row's config: `family:CONFIG@source` (source: table or
    default), so a sweep after a tune shows the tuned tile being picked."""
    from .. import ops

    w, s, b = case.weights(0)
    d = ops.describe(case.x_sorted, w, s, b, case.idx_sorted, **case.quant, sorted_indices=True,
                     backend=case.backend)
    return [f"{d['family']}:{d['config']}@{d['source']}"]


def _build_auto(case, config):
    from .. import ops

    nxt, q = case.rotation(), case.quant

    def call():
        w, s, b = nxt()
        return ops.gather_qmm(case.x_sorted, w, s, b, case.idx_sorted, **q, sorted_indices=True,
                              validate=False, backend=case.backend)
    return call


def _register_sweep() -> None:
    try:
        from .. import sweep
    except ImportError:  # a build without the sweep module
        return
    for fam in families():
        glu = fam.name.endswith("_glu")  # two weight sets: twice the bytes and flops
        nbytes = (lambda case: 2 * case.weight_bytes) if glu else None
        flops = (lambda case: 4.0 * case.rows * case.problem.k * case.problem.n) if glu else None
        sweep.register(sweep.SweepKernel(f"tuned.{fam.name}", _configs(fam), _build(fam), check=_check(fam),
                                         nbytes=nbytes, flops=flops, family=fam))
    sweep.register(sweep.SweepKernel("tuned.auto", _auto_config, _build_auto))


_register_sweep()
