"""The routing plan the reuse kernels consume: pairs sorted by expert, and per-expert offsets.

Unsorted indices on a GPU go through the one-launch counting-sort kernel (`PLAN`: cuda/plan.cu,
metal/plan.metal): MLX's argsort + scatter-add + cumsum cost 50-110 us per call on the H100,
next to a 140-315 us kernel (sweeps/results/h100/op-overhead/). Its order within an expert is
arbitrary, which the kernels' output does not depend on. Elsewhere, or past its limits,
`mlx_moe_tune.routing.plan` (stable argsort, MLX ops, no host sync). Indices that are already
grouped by expert (mlx-lm's sorted layout) skip the sort: the order is the identity and only the
per-expert offsets are computed. Any object with `order` (P,) and `offsets` (E+1,) int32 arrays
(e.g. a `routing.Plan`) can be passed to the op.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .. import routing
from ..backend import Backend, get_backend
from .common import as_dtype
from .family import DialectSource, KernelFamily, Launch

PLAN_THREADS = 1024
PLAN_MAX_EXPERTS = 4096  # E+1 int counters in shared / threadgroup memory (16 KB)
PLAN_MAX_PAIRS = 1 << 20  # one block walks every pair: past this, argsort's many blocks win


def _plan_check(problem, config, backend: Backend) -> str | None:
    if not 1 <= problem.experts <= PLAN_MAX_EXPERTS:
        return f"the plan kernel takes 1..{PLAN_MAX_EXPERTS} experts (got {problem.experts})"
    if not 0 < problem.rows <= PLAN_MAX_PAIRS:
        return f"the plan kernel takes 1..{PLAN_MAX_PAIRS} pairs (got {problem.rows})"
    if config["NT"] > backend.max_threads or config["NT"] % 32:
        return f"NT={config['NT']} must be a multiple of 32 and <= {backend.max_threads}"
    return None


PLAN = KernelFamily(
    name="plan",
    input_names=("idx",),
    output_names=("order", "offsets"),
    sources={"cuda": DialectSource("cuda/plan.cu"), "metal": DialectSource("metal/plan.metal")},
    space={"cuda": {"NT": (PLAN_THREADS,)}, "metal": {"NT": (PLAN_THREADS,)}},
    check=_plan_check,
    launch=lambda problem, config, backend: Launch((config["NT"], 1, 1), (config["NT"], 1, 1)),
    template=lambda problem, config: [("E", int(problem.experts))],
)


def _plan_problem(P: int, experts: int, b: Backend):
    from .family import Problem

    return Problem(experts=int(experts), k=1, n=1, rows=int(P)), {"NT": min(PLAN_THREADS, b.max_threads)}


def kernel_plan(flat: mx.array, experts: int, backend: Backend | str | None = None) -> "Plan":
    """The one-launch plan of int32 ids `flat` (P,) on `backend` (a GPU or the emulator)."""
    b = get_backend(backend)
    P = int(flat.size)
    problem, config = _plan_problem(P, experts, b)
    why = _plan_check(problem, config, b)
    if why is not None:
        raise ValueError(why)
    launch = PLAN.launch(problem, config, b)
    order, offsets = PLAN.kernel(b)(inputs=[as_dtype(flat, mx.int32)], template=PLAN.template(problem, config),
                                    grid=launch.grid, threadgroup=launch.threadgroup,
                                    output_shapes=[(P,), (experts + 1,)], output_dtypes=[mx.int32, mx.int32])
    return Plan(order, offsets, int(experts), P)


def _use_kernel(P: int, experts: int, backend) -> bool:
    """Whether the op runs the plan kernel: on real GPUs within its limits (`_plan_check`); on the
    emulator a kernel costs a compile, so only when asked (kernel=True, as the tests do)."""
    try:
        b = get_backend(backend)
    except (ValueError, RuntimeError):
        return False
    return not b.emulated and _plan_check(*_plan_problem(P, experts, b), b) is None


@dataclass(frozen=True)
class Plan:
    order: mx.array  # (P,) int32: pair ids sorted by expert
    offsets: mx.array  # (E+1,) int32: row offsets per expert in sorted order
    experts: int
    pairs: int


def make_plan(indices: mx.array, experts: int, *, sorted_indices: bool = False,
              backend: Backend | str | None = None, kernel: bool | None = None) -> Plan:
    """Plan for the flattened `indices` (any shape; pair p = flat position p). `kernel`: use the
    one-launch plan kernel (default: on a real GPU, within its limits) or MLX's argsort."""
    flat = as_dtype(indices.reshape(-1), mx.int32)
    if not sorted_indices:
        if kernel or (kernel is None and _use_kernel(flat.size, experts, backend)):
            return kernel_plan(flat, experts, backend)
        p = routing.plan(flat, experts)
        return Plan(p.order, p.offsets, experts, flat.size)
    P = flat.size
    offsets = routing.expert_offsets(flat, experts)
    return Plan(mx.arange(P, dtype=mx.int32), offsets, experts, P)


class SharedPlan:
    """A plan that is built only when a kernel first needs it, then shared: mlx-lm's SwitchGLU
    hands one to gate, up and down, and a decode step (all qmv, which reads expert ids directly)
    never pays for building one."""

    def __init__(self, indices: mx.array, experts: int, *, sorted_indices: bool = False,
                 backend: Backend | str | None = None):
        self._args = (indices, experts, sorted_indices, backend)
        self._plan: Plan | None = None
        self.experts, self.pairs = experts, int(indices.size)

    def _get(self) -> Plan:
        if self._plan is None:
            indices, experts, sorted_indices, backend = self._args
            self._plan = make_plan(indices, experts, sorted_indices=sorted_indices, backend=backend)
        return self._plan

    @property
    def order(self) -> mx.array:
        return self._get().order

    @property
    def offsets(self) -> mx.array:
        return self._get().offsets


def as_plan(plan, experts: int, pairs: int) -> Plan:
    """Accept our Plan or any object with order/offsets (routing.Plan); check it fits the call."""
    order, offsets = getattr(plan, "order", None), getattr(plan, "offsets", None)
    if order is None or offsets is None:
        raise ValueError(f"plan must have `order` and `offsets` arrays, got {type(plan).__name__}")
    if order.size != pairs or offsets.size != experts + 1:
        raise ValueError(f"plan is for {order.size} pairs / {offsets.size - 1} experts, "
                         f"this call has {pairs} / {experts}")
    return Plan(as_dtype(order, mx.int32), as_dtype(offsets, mx.int32), experts, pairs)
