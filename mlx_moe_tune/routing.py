"""Synthetic MoE routing and the expert-major plan the kernels consume.

`route` makes (tokens, top_k) expert indices with a chosen load pattern:
- balanced: exactly m rows per expert (T = m*E/top_k tokens), each token top_k distinct experts;
- uniform:  each token picks top_k distinct experts uniformly at random;
- skewed:   Zipf popularity (expert of rank r has weight 1/r^skew), top_k distinct per token;
- sparse:   only `active` experts (chosen at random) receive rows.
Generation runs on the host with numpy's seeded generator (reproducible across MLX versions).

`plan` sorts the (token, slot) pairs by expert with MLX ops only (no host sync), giving the
`order`/`offsets` inputs of the expert-major `qmm` kernels and the inverse permutation.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

ROUTERS = ("balanced", "uniform", "skewed", "sparse")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def resolve_tokens(tokens: int | None, experts: int, top_k: int, m: int | None) -> int:
    """Token count from `tokens` or from m rows per expert (T = m*E/top_k, must be integral)."""
    if m is not None:
        m = _positive_int("m", m)
        if (m * experts) % top_k:
            raise ValueError(
                f"m={m} rows per expert needs m*experts/top_k = {m}*{experts}/{top_k} tokens, "
                "which is not an integer"
            )
        t = m * experts // top_k
        if tokens is not None and _positive_int("tokens", tokens) != t:
            raise ValueError(f"tokens={tokens} disagrees with m={m} (which needs {t} tokens)")
        return t
    if tokens is None:
        raise ValueError("give tokens or m (rows per expert)")
    return _positive_int("tokens", tokens)


def route(router: str, tokens: int | None, experts: int, top_k: int, *, m: int | None = None,
          skew: float = 1.2, active: int | None = None, seed: int = 0) -> mx.array:
    """Expert indices (T, top_k) int32; every token's top_k experts are distinct.

    `balanced` needs m*E/top_k tokens: pass m, or tokens with tokens*top_k divisible by E.
    `sparse` spreads rows over `active` experts (default max(top_k, experts // 8)).
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
    experts = _positive_int("experts", experts)
    top_k = _positive_int("top_k", top_k)
    if top_k > experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {experts}")
    T = resolve_tokens(tokens, experts, top_k, m)
    rng = np.random.default_rng(seed)
    if router == "balanced":
        if (T * top_k) % experts:
            raise ValueError(
                f"balanced routing needs tokens*top_k divisible by experts: "
                f"{T}*{top_k} is not a multiple of {experts}"
            )
        idx = _balanced(rng, T, experts, top_k)
    elif router == "uniform":
        idx = _weighted_topk(rng, T, np.zeros(experts), top_k)
    elif router == "skewed":
        if not np.isfinite(skew) or skew < 0:
            raise ValueError(f"skew must be a finite number >= 0, got {skew!r}")
        ranks = rng.permutation(experts) + 1  # which experts are hot is random too
        idx = _weighted_topk(rng, T, -float(skew) * np.log(ranks), top_k)
    else:
        active = max(top_k, experts // 8) if active is None else _positive_int("active", active)
        if not top_k <= active <= experts:
            raise ValueError(f"active={active} must lie in [top_k={top_k}, experts={experts}]")
        chosen = rng.choice(experts, active, replace=False)
        idx = chosen[_weighted_topk(rng, T, np.zeros(active), top_k)]
    return mx.array(idx.astype(np.int32))


def _weighted_topk(rng, T: int, log_w: np.ndarray, k: int) -> np.ndarray:
    """k distinct experts per token, sampled without replacement with weights exp(log_w)
    (Gumbel top-k: the k largest of log_w + Gumbel noise)."""
    keys = log_w[None, :] + rng.gumbel(size=(T, log_w.size))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    return rng.permuted(top, axis=1)  # slot order carries no meaning


def _balanced(rng, T: int, E: int, k: int) -> np.ndarray:
    """Concatenate m random permutations of the experts and cut into rows of k. Where a row
    straddles two permutations, the next permutation starts with experts the row lacks."""
    m = T * k // E
    seq = np.empty(m * E, np.int64)
    pos = 0
    for _ in range(m):
        r = pos % k  # slots of the current row already filled by the previous permutation
        tail = seq[pos - r : pos] if r else np.empty(0, np.int64)
        perm = rng.permutation(E)
        if r:
            head_ok = ~np.isin(perm, tail)
            # k - r free slots: fill them from experts not in the row (there are E - r >= k - r)
            head = perm[head_ok][: k - r]
            perm = np.concatenate([head, rng.permutation(np.setdiff1d(perm, head))])
        seq[pos : pos + E] = perm
        pos += E
    return seq.reshape(T, k)


@dataclass
class Plan:
    """Pairs (token, slot) flattened to p = token*top_k + slot, sorted by expert (stable).

    order (P,) int32: pair ids in expert order; sorted_experts (P,) int32: their experts;
    offsets (E+1,) int32: expert e owns sorted positions offsets[e]:offsets[e+1];
    inv_order (P,) int32: sorted position of each pair (order[inv_order] == arange).
    """

    order: mx.array
    sorted_experts: mx.array
    offsets: mx.array
    inv_order: mx.array
    experts: int
    top_k: int

    @property
    def counts(self) -> mx.array:
        """Rows per expert (E,) int32."""
        return self.offsets[1:] - self.offsets[:-1]


def plan(indices: mx.array, experts: int | None = None) -> Plan:
    """Sort pairs by expert with MLX ops only (argsort, scatter-add, cumsum): no host sync.

    Pass `experts` (E); without it E is read from indices.max(), which syncs with the device.
    Ties keep pair order (the sort key is expert*P + pair), so the plan is deterministic on
    every backend whatever its argsort does with equal keys.
    """
    if not isinstance(indices, mx.array):
        indices = mx.array(np.asarray(indices))
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    top_k = indices.shape[-1] if indices.ndim >= 2 else 1  # (P,): already one pair per row
    flat = indices.reshape(-1).astype(mx.int32)
    P = flat.size
    if experts is None:
        experts = int(flat.max().item()) + 1 if P else 1  # host sync, documented above
    experts = _positive_int("experts", experts)
    pair = mx.arange(P, dtype=mx.int32)
    # ids outside [0, E) sort last, after offsets[E], as in the plan kernel: the reuse kernels
    # zero those rows. A composite key makes the sort stable; int64 only where int32 overflows.
    bucket = mx.where((flat >= 0) & (flat < experts), flat, experts)
    key = (bucket * P + pair if (experts + 1) * max(P, 1) < 2**31
           else bucket.astype(mx.int64) * P + pair)
    order = mx.argsort(key).astype(mx.int32)
    # scatter-add counts here: the fused compare-and-count of expert_offsets was no faster inside
    # the whole op on the H100 (sweeps/results/h100/op-overhead/: op 224 vs 190 us at m=1, 208 vs
    # 201 at m=4, 240 vs 230 at m=16, 407 vs 417 at m=64); the argsort dominates the plan
    offsets = expert_offsets(flat, experts, fused=False)
    inv_order = mx.zeros((P,), mx.int32).at[order].add(pair)
    return Plan(order, flat[order], offsets, inv_order, experts, top_k)


def expert_offsets(flat: mx.array, experts: int, fused: bool | None = None) -> mx.array:
    """(E+1,) int32: offsets[e] = number of pairs whose expert id is < e (ids outside [0, E) are
    not counted in any expert). `fused` (default: when P*(E+1) <= 2^24) uses one compare-and-count
    reduction instead of a scatter-add and a cumsum: for the sorted layout, where it is the whole
    plan, the scatter-add cost tens of microseconds on the H100's CUDA backend."""
    P = flat.size
    if fused if fused is not None else P * (experts + 1) <= 1 << 24:
        bounds = mx.arange(experts + 1, dtype=mx.int32)
        below = (flat[None, :] < bounds[:, None]) & (flat[None, :] >= 0)
        return below.astype(mx.int32).sum(axis=1).astype(mx.int32)
    valid = (flat >= 0) & (flat < experts)
    counts = mx.zeros((experts,), mx.int32).at[mx.where(valid, flat, 0)].add(valid.astype(mx.int32))
    return mx.concatenate([mx.zeros((1,), mx.int32), mx.cumsum(counts)]).astype(mx.int32)


def stats(indices, experts: int) -> dict:
    """Host-side load summary: active experts and rows per expert (mean over all experts,
    mean over active ones, min, max)."""
    experts = _positive_int("experts", experts)
    idx = np.asarray(indices).reshape(-1) if not isinstance(indices, mx.array) else \
        np.array(indices).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= experts):
        raise ValueError(
            f"expert index out of range: indices span [{idx.min()}, {idx.max()}] "
            f"but there are {experts} experts"
        )
    counts = np.bincount(idx.astype(np.int64), minlength=experts)
    active = int((counts > 0).sum())
    return {
        "pairs": int(idx.size),
        "experts": experts,
        "active_experts": active,
        "rows_per_expert_mean": float(counts.mean()),
        "rows_per_active_expert_mean": float(idx.size / active) if active else 0.0,
        "rows_per_expert_min": int(counts.min()),
        "rows_per_expert_max": int(counts.max()),
    }
