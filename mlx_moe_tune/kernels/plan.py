"""The routing plan the reuse kernels consume: pairs sorted by expert, and per-expert offsets.

`mlx_moe_tune.routing.plan` (H-formats) is the home of this computation; `make_plan` uses it
when present and otherwise computes the same fields with MLX ops (no host sync), so the op can
sort once and reuse the plan for gate, up and down projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Plan:
    order: mx.array  # (P,) int32: pair ids sorted by expert
    offsets: mx.array  # (E+1,) int32: row offsets per expert in sorted order
    experts: int
    pairs: int


def make_plan(indices: mx.array, experts: int, *, sorted_indices: bool = False) -> Plan:
    """Plan for the flattened `indices` (any shape; pair p = flat position p)."""
    flat = indices.reshape(-1).astype(mx.int32)
    try:  # H-formats' routing.plan, when it exists
        from .. import routing

        if not sorted_indices:
            p = routing.plan(indices.reshape(-1, indices.shape[-1] if indices.ndim else 1), experts)
            return Plan(p.order.astype(mx.int32), p.offsets.astype(mx.int32), experts, flat.size)
    except (ImportError, AttributeError, TypeError):
        pass
    if sorted_indices:  # already grouped by expert: identity order
        order = mx.arange(flat.size, dtype=mx.int32)
    else:
        order = mx.argsort(flat).astype(mx.int32)
    counts = mx.zeros((experts,), dtype=mx.int32).at[flat].add(mx.ones_like(flat))
    offsets = mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts).astype(mx.int32)])
    return Plan(order, offsets, experts, flat.size)
