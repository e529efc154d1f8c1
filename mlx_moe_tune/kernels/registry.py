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


def variants() -> list[KernelFamily]:
    """Every kernel the op can launch: each family and its sorted twin (same tiles, no plan)."""
    return [v for f in FAMILIES.values() for v in (f, f.sorted_twin) if v is not None]


def get_variant(label: str) -> KernelFamily:
    """A variant by its `label` ("qmm", "qmm.sorted")."""
    for v in variants():
        if v.label == label:
            return v
    raise ValueError(f"unknown kernel variant {label!r}; choose from {sorted(v.label for v in variants())}")


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
    glu = fam.weight_sets == 2  # gate and up: two weight copies per call, the fused op
    decode = fam.route == "ids"  # qmv reads expert ids: mlx-lm's per-token layout

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


def _layout(case, sorted_layout: bool):
    return (case.x_sorted, case.idx_sorted) if sorted_layout else (case.x_unsorted, case.idx_unsorted)


def _auto_config(sorted_layout: bool):
    """The op's own choice, as the sweep row's config: `family:CONFIG@source` (source: table or
    default), so a sweep after a tune shows the tuned tile being picked."""
    def configs(case):
        from .. import ops

        w, s, b = case.weights(0)
        x, idx = _layout(case, sorted_layout)
        d = ops.describe(x, w, s, b, idx, **case.quant, sorted_indices=sorted_layout, backend=case.backend)
        return [f"{d['family']}:{d['config']}@{d['source']}"]

    return configs


def _build_auto(sorted_layout: bool):
    """The op end to end as a user calls it (routing inside the call)."""
    def build(case, config):
        from .. import ops

        nxt, q = case.rotation(), case.quant
        x, idx = _layout(case, sorted_layout)

        def call():
            return ops.gather_qmm(x, *nxt(), idx, **q, sorted_indices=sorted_layout, backend=case.backend)
        return call

    return build


def _build_pick(sorted_layout: bool):
    """The kernel alone at the op's pick: the same family and tile with the routing plan computed
    once outside the timed calls (what the tuner times), so `tuned.auto*` minus this is what the
    op adds."""
    def build(case, config):
        from .. import ops
        from .plan import make_plan

        family, cfg = config.split("@")[0].split(":")
        nxt, q = case.rotation(), case.quant
        x, idx = _layout(case, sorted_layout)
        plan = None
        if get(family).route == "plan":
            import mlx.core as mx

            plan = _sorted_plan(case) if sorted_layout else make_plan(idx, case.problem.experts, backend=case.backend)
            mx.eval(plan.order, plan.offsets)

        def call():
            return ops.gather_qmm(x, *nxt(), idx, **q, sorted_indices=sorted_layout, family=family,
                                  config=cfg, plan=plan, backend=case.backend)
        return call

    return build


def _register_sweep() -> None:
    try:
        from .. import sweep
    except ImportError:  # a build without the sweep module
        return
    for fam in families():
        glu = fam.weight_sets == 2  # two weight sets: twice the bytes and flops
        nbytes = (lambda case: 2 * case.weight_bytes) if glu else None
        flops = (lambda case: 4.0 * case.rows * case.problem.k * case.problem.n) if glu else None
        sweep.register(sweep.SweepKernel(f"tuned.{fam.name}", _configs(fam), _build(fam), check=_check(fam),
                                         nbytes=nbytes, flops=flops, family=fam))
    for suffix, sorted_layout in (("", True), ("_unsorted", False)):
        layout = "sorted" if sorted_layout else "unsorted"
        sweep.register(sweep.SweepKernel(f"tuned.auto{suffix}", _auto_config(sorted_layout), _build_auto(sorted_layout),
                                         layout=layout))
        sweep.register(sweep.SweepKernel(f"tuned.pick{suffix}", _auto_config(sorted_layout), _build_pick(sorted_layout),
                                         layout=layout))


_register_sweep()
