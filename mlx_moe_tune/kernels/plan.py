"""The routing plan the reuse kernels consume: pairs sorted by expert, and per-expert offsets.

Unsorted indices go through `mlx_moe_tune.routing.plan` (H-formats; stable sort, MLX ops, no
host sync). Indices that are already grouped by expert (mlx-lm's sorted layout) skip the sort:
the order is the identity and only the per-expert offsets are computed. Any object with
`order` (P,) and `offsets` (E+1,) int32 arrays (e.g. a `routing.Plan`) can be passed to the op.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .. import routing


@dataclass(frozen=True)
class Plan:
    order: mx.array  # (P,) int32: pair ids sorted by expert
    offsets: mx.array  # (E+1,) int32: row offsets per expert in sorted order
    experts: int
    pairs: int


def make_plan(indices: mx.array, experts: int, *, sorted_indices: bool = False) -> Plan:
    """Plan for the flattened `indices` (any shape; pair p = flat position p)."""
    flat = indices.reshape(-1).astype(mx.int32)
    if not sorted_indices:
        p = routing.plan(flat, experts)
        return Plan(p.order, p.offsets, experts, flat.size)
    P = flat.size
    offsets = routing.expert_offsets(flat, experts)
    return Plan(mx.arange(P, dtype=mx.int32), offsets, experts, P)


def as_plan(plan, experts: int, pairs: int) -> Plan:
    """Accept our Plan or any object with order/offsets (routing.Plan); check it fits the call."""
    order, offsets = getattr(plan, "order", None), getattr(plan, "offsets", None)
    if order is None or offsets is None:
        raise ValueError(f"plan must have `order` and `offsets` arrays, got {type(plan).__name__}")
    if order.size != pairs or offsets.size != experts + 1:
        raise ValueError(f"plan is for {order.size} pairs / {offsets.size - 1} experts, "
                         f"this call has {pairs} / {experts}")
    return Plan(order.astype(mx.int32), offsets.astype(mx.int32), experts, pairs)
