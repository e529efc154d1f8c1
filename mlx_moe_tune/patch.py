"""Swap our gather_qmm kernels into mlx-lm MoE models.

`patch_model(model)` replaces, wherever it finds them:
- `SwitchGLU` blocks whose projections are `QuantizedSwitchLinear` -> `TunedSwitchGLU`: routes once
  per call (one `plan` shared by gate, up and down), never gathers or unsorts x on the host side
  of the kernels (the expert-major kernels read and write rows in token order), and with the
  default SwiGLU activation runs gate+up as one fused kernel;
- every other `QuantizedSwitchLinear` (e.g. inside `SwitchMLP`) -> `TunedSwitchLinear`, same call
  signature `(x, indices, sorted_indices=False)`;
- the MoE block that holds a `TunedSwitchGLU` (e.g. qwen3_moe's `Qwen3MoeSparseMoeBlock`: router
  linear, softmax, top-k, experts, weighted sum) -> a subclass whose decode-sized calls replay one
  `mx.compile`d graph of the whole block (see `CompiledMoEBlock`).
Replacements subclass the mlx-lm classes and hold the very same arrays under the same names
(`weight`, `scales`, `biases`, `bias`, `global_scale`), so `load_weights`, `save_weights` and
`isinstance` checks behave as before. Formats our kernels do not cover (e.g. mxfp4, 3-bit, a
per-expert nvfp4 global scale) stay on `mx.gather_qmm`; `unpatch(model)` restores the stock
classes.
"""
from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU


def _ops():
    from . import ops  # imported lazily: it pulls in the kernel registry

    return ops


def _rebuild(cls, src: nn.Module) -> nn.Module:
    """A `cls` instance holding src's children, arrays and plain attributes (no re-init)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in src.items():
        dict.__setitem__(new, k, v)
    new.__dict__.update({k: v for k, v in vars(src).items() if not k.startswith("_mmt_")})
    return new


_PROBED: dict[tuple, str | None] = {}  # (ops module, layer format and shape, backend) -> reason


class TunedSwitchLinear(QuantizedSwitchLinear):
    """`QuantizedSwitchLinear` whose gather_qmm runs on `mlx_moe_tune.ops.gather_qmm`."""

    @classmethod
    def from_module(cls, src: QuantizedSwitchLinear, backend=None, table=None) -> "TunedSwitchLinear":
        new = _rebuild(cls, src)
        new._mmt_backend = backend
        new._mmt_table = None if table is None else os.fspath(table)
        new._mmt_reason = new._unsupported()
        return new

    def _unsupported(self) -> str | None:
        """Why our kernels cannot run this layer (it then stays on mx.gather_qmm), or None."""
        if getattr(self, "global_scale", None) is not None:
            return "nvfp4 global scale"
        w, s, b = self["weight"], self["scales"], self.get("biases")
        key = (_ops(), tuple(w.shape), s.dtype, b is None, self.group_size, self.bits, self.mode,
               getattr(self._mmt_backend, "name", self._mmt_backend))
        if key not in _PROBED:  # one probe per layer shape, not per layer
            x = mx.zeros((1, 1, self.input_dims), dtype=s.dtype if s.dtype != mx.uint8 else mx.bfloat16)
            try:  # builds the lazy graph: shape, format and tile checks (no kernel runs on a GPU)
                _ops().gather_qmm(x, w, s, b, mx.zeros((1,), mx.int32), group_size=self.group_size,
                                  bits=self.bits, mode=self.mode, backend=self._mmt_backend,
                                  validate=False)
                _PROBED[key] = None
            except Exception as e:  # noqa: BLE001 - any failure keeps this layer on mx.gather_qmm
                _PROBED[key] = f"{type(e).__name__}: {e}"
        return _PROBED[key]

    @property
    def tuned(self) -> bool:
        return self._mmt_reason is None

    def _choice(self, x: mx.array, indices: mx.array) -> dict[str, Any]:
        """family/config from the table directory given to patch_model, if it has this shape."""
        if self._mmt_table is None:
            return {}
        from . import tables
        from .kernels.common import dtype_name
        from .kernels.family import Problem

        E, N = self["weight"].shape[:2]
        problem = Problem(experts=E, k=self.input_dims, n=N, rows=indices.size, bits=self.bits,
                          group_size=self.group_size, mode=self.mode, dtype=dtype_name(x.dtype))
        top_k = indices.shape[-1] if indices.ndim > 1 else None
        hit = tables.lookup(problem, self._mmt_backend, table_dir=self._mmt_table, top_k=top_k,
                            heuristic_fallback=False)
        return {} if hit is None or hit[1] is None else {"family": hit[0], "config": hit[1]}

    def __call__(self, x, indices, sorted_indices=False, plan=None):
        if self._mmt_reason is not None:
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        try:
            y = _ops().gather_qmm(
                x, self["weight"], self["scales"], self.get("biases"), indices,
                group_size=self.group_size, bits=self.bits, mode=self.mode,
                sorted_indices=sorted_indices, plan=plan, backend=self._mmt_backend,
                validate=False,  # no host sync per layer; the kernels never read out of bounds
                **self._choice(x, indices),
            )
        except ValueError as e:  # this call's shape/dtype is outside the kernels: stock path
            self._mmt_fallback = str(e)
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


class TunedSwitchGLU(SwitchGLU):
    """`SwitchGLU` on our kernels: one routing plan for gate, up and down; no x gather/unsort.

    mlx-lm sorts x by expert above 64 pairs and unsorts the result; the expert-major kernels
    do that inside (they read x row order[i] and write y row order[i]), so x stays in token
    order: gate/up see x (..., 1, 1, D) against indices (..., k), down sees (..., k, 1, H).
    """

    @classmethod
    def from_module(cls, src: SwitchGLU, backend=None, table=None, fuse: bool = True,
                    compile: bool = True) -> "TunedSwitchGLU":
        new = _rebuild(cls, src)
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = new[name]
            if isinstance(proj, QuantizedSwitchLinear) and not isinstance(proj, TunedSwitchLinear):
                dict.__setitem__(new, name, TunedSwitchLinear.from_module(proj, backend, table))
        g, u = new["gate_proj"], new["up_proj"]
        # the fused kernel computes silu(gate) * up: only for mlx-lm's plain SwiGLU, no biases
        new._mmt_fuse = bool(
            fuse and type(new["activation"]) is SwiGLU and g.tuned and u.tuned
            and "bias" not in g and "bias" not in u and g._mmt_table is None
            and (g.group_size, g.bits, g.mode) == (u.group_size, u.bits, u.mode)
            and hasattr(_ops(), "gather_qmm_glu")
        )
        new._mmt_backend = backend
        new._mmt_compile = bool(compile) and _traceable(backend)  # see patch_model
        return new

    @property
    def tuned(self) -> bool:
        return all(self[n].tuned for n in ("gate_proj", "up_proj", "down_proj")
                   if isinstance(self[n], TunedSwitchLinear))

    def __call__(self, x, indices) -> mx.array:
        g, u, d = self["gate_proj"], self["up_proj"], self["down_proj"]
        if not all(isinstance(p, TunedSwitchLinear) and p.tuned for p in (g, u, d)):
            return super().__call__(x, indices)  # some projection stays stock: mlx-lm's path
        if _tokens(indices) <= COMPILE_MAX_TOKENS and getattr(self, "_mmt_compile", False):
            # Decode (patch_model(compile=True), the default): the host time to build this layer's graph
            # outweighs the kernel time saved (H200: 55 us vs stock's 24 us per layer), and a
            # compiled function replays it instead. inputs=self.state: the weights are read live.
            try:
                fn = self.__dict__.get("_mmt_compiled")
                if fn is None:
                    fn = self._mmt_compiled = mx.compile(self._forward, inputs=self.state)
                return fn(x, indices)
            except Exception as e:  # noqa: BLE001 - a backend whose kernels cannot be traced
                self._mmt_compile, self._mmt_compile_error = False, f"{type(e).__name__}: {e}"
        return self._forward(x, indices)

    def _forward(self, x, indices) -> mx.array:
        g, u, d = self["gate_proj"], self["up_proj"], self["down_proj"]
        from .kernels.plan import SharedPlan

        xe = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        # sorted once, shared by all three; built only if a reuse kernel runs (not at decode)
        plan = SharedPlan(indices, g["weight"].shape[0], backend=self._mmt_backend)
        h = None
        if self._mmt_fuse:
            try:
                h = _ops().gather_qmm_glu(
                    xe, g["weight"], g["scales"], g.get("biases"), u["weight"], u["scales"],
                    u.get("biases"), indices, group_size=g.group_size, bits=g.bits,
                    mode=g.mode, plan=plan, backend=self._mmt_backend, validate=False)
            except ValueError as e:  # e.g. no fused tile for this shape: separate kernels
                self._mmt_fallback = str(e)
        if h is None:
            h = self.activation(u(xe, indices, plan=plan), g(xe, indices, plan=plan))
        return d(h, indices, plan=plan).squeeze(-2)


def _traceable(backend) -> bool:
    """Whether mx.compile can trace the op's kernels on `backend`. Not the emulator's: they run
    eagerly on host arrays, so a trace fails inside the op, and the op's ValueError fallback
    would then trace mlx-lm's stock layers in their place, silently."""
    from .backend import get_backend

    return not get_backend(backend).emulated


# Calls of at most this many tokens are decode steps (batch_generate decodes one token per
# sequence): their graph is replayed by mx.compile. Prefill chunks are larger, and there the
# kernels' time, not the host's, dominates; each new shape costs one trace.
COMPILE_MAX_TOKENS = 128


def _tokens(a: mx.array) -> int:
    """Tokens in a router-indices (..., k) or hidden-state (..., D) array."""
    return a.size // max(1, a.shape[-1]) if a.ndim else 1


class CompiledMoEBlock:
    """Mixin for an mlx-lm MoE block (the module whose `switch_mlp` is a `TunedSwitchGLU`).

    A stock decode step builds the block's graph op by op on the host: the router's linear,
    softmax, top-k and renormalisation, the experts, and the weighted sum, each a launch.
    Replaying one `mx.compile`d graph of the whole block costs the host a lookup and lets MLX
    fuse the element-wise ops into fewer kernels. Only for decode-sized calls (see
    COMPILE_MAX_TOKENS) with a single array argument and no sharding group; anything else, or a
    block whose code cannot be traced, runs the stock `__call__`.
    """

    _mmt_stock_class: type

    def __call__(self, x, *args, **kwargs):
        if (args or kwargs or not getattr(self, "_mmt_compile", False) or not isinstance(x, mx.array)
                or _tokens(x) > COMPILE_MAX_TOKENS or getattr(self, "sharding_group", None) is not None):
            return super().__call__(x, *args, **kwargs)
        try:
            fn = self.__dict__.get("_mmt_compiled")
            if fn is None:
                fn = self._mmt_compiled = mx.compile(super().__call__, inputs=self.state)
            return fn(x)
        except Exception as e:  # noqa: BLE001 - code mx.compile cannot trace: the stock path
            self._mmt_compile, self._mmt_compile_error = False, f"{type(e).__name__}: {e}"
            return super().__call__(x)


_BLOCK_CLASSES: dict[type, type] = {}


def _compiled_block_class(cls: type) -> type:
    """`Compiled<cls>`: cls with CompiledMoEBlock's __call__ (one class per stock class)."""
    if cls not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[cls] = type(f"Compiled{cls.__name__}", (CompiledMoEBlock, cls),
                                   {"_mmt_stock_class": cls, "__module__": __name__})
    return _BLOCK_CLASSES[cls]


def _wrap_blocks(model: nn.Module, swaps: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """`swaps` with each TunedSwitchGLU moved into a Compiled<block> copy of its parent block.
    The stock block is left as it was (still holding the stock SwitchGLU), so a caller that kept
    it (bench-model's stock variant) still has mlx-lm's modules."""
    mods = dict(model.named_modules())
    out, parents = [], {}
    for path, new in swaps:
        parent_path, _, name = path.rpartition(".")
        parent = mods.get(parent_path) if parent_path else None
        if (type(new) is not TunedSwitchGLU or parent is None or isinstance(parent, (CompiledMoEBlock, SwitchGLU))
                or not isinstance(parent.get(name), SwitchGLU)):
            out.append((path, new))
            continue
        if parent_path not in parents:
            block = _rebuild(_compiled_block_class(type(parent)), parent)
            block._mmt_compile = True
            parents[parent_path] = block
        dict.__setitem__(parents[parent_path], name, new)
    return out + list(parents.items())


def _named(model: nn.Module, cls) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if type(m) is cls]


def patch_model(model: nn.Module, backend=None, table=None, *, fuse: bool = True,
                compile: bool = True) -> int:
    """Swap our kernels into every MoE layer of an mlx-lm model, in place.

    backend: a `mlx_moe_tune.backend` name or Backend (default: the GPU, else the emulator).
    table: a tuning-table directory searched before ops' own lookup (user dir, shipped tables).
    fuse: run gate+up as one fused kernel where the activation is SwiGLU.
    compile: replay decode-sized calls (<= COMPILE_MAX_TOKENS tokens) of each SwitchGLU, and of
    the MoE block around it, through mx.compile, which removes the per-call host cost of
    building the graph and fuses the router's and the weighted sum's element-wise ops (on by
    default). On the H200 it
    passes the same GPU tests as the uncompiled path (tests/test_patch.py: one SwitchGLU with
    fixed expert ids, and a model's step-by-step KV-cache decode, against stock on the CPU
    stream). An earlier failure of that model test came from MLX's own CUDA quantized_matmul in
    the test model's attention layers, not from this path (scripts/qlinear_probe.py). On the
    emulator it is off (see _traceable).
    Returns how many `QuantizedSwitchLinear` projections now run our kernels (layers whose
    format the kernels do not cover are left on mx.gather_qmm and not counted).
    """
    if backend is not None:
        from .backend import get_backend

        backend = get_backend(backend)  # fail now, not at the first forward
    if table is not None and not os.path.isdir(os.path.expanduser(table)):
        what = "is a file" if os.path.exists(os.path.expanduser(table)) else "does not exist"
        raise ValueError(f"patch_model(table={str(table)!r}): {what}; expected a tuning-table directory "
                         "(what `mlx-moe-tune tune --table DIR` writes), or None for the default lookup")
    swaps = []
    inside = set()
    for path, m in _named(model, SwitchGLU):
        if any(isinstance(m[n], QuantizedSwitchLinear) for n in ("gate_proj", "up_proj", "down_proj")):
            swaps.append((path, TunedSwitchGLU.from_module(m, backend, table, fuse, compile)))
            inside.add(path)
    for path, m in _named(model, QuantizedSwitchLinear):
        if path.rsplit(".", 1)[0] not in inside:
            swaps.append((path, TunedSwitchLinear.from_module(m, backend, table)))
    if compile and _traceable(backend):
        swaps = _wrap_blocks(model, swaps)
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return sum(1 for _, m in model.named_modules() if isinstance(m, TunedSwitchLinear) and m.tuned)


def unpatch(model: nn.Module) -> int:
    """Restore mlx-lm's classes (same arrays). Returns how many modules were restored."""
    blocks = [(p, _rebuild(m._mmt_stock_class, m)) for p, m in model.named_modules()
              if isinstance(m, CompiledMoEBlock)]
    if blocks:  # first, so that the paths below find the stock blocks
        model.update_modules(tree_unflatten(blocks))
    swaps = [(p, _rebuild(SwitchGLU, m)) for p, m in _named(model, TunedSwitchGLU)]
    for p, m in swaps:  # its projections too
        for n in ("gate_proj", "up_proj", "down_proj"):
            if isinstance(m[n], TunedSwitchLinear):
                dict.__setitem__(m, n, _rebuild(QuantizedSwitchLinear, m[n]))
    glu = {p for p, _ in swaps}
    swaps += [(p, _rebuild(QuantizedSwitchLinear, m)) for p, m in _named(model, TunedSwitchLinear)
              if p.rsplit(".", 1)[0] not in glu]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps) + len(blocks)


def patched_layers(model: nn.Module) -> dict[str, str | None]:
    """path -> None for projections on our kernels, or why one stayed on mx.gather_qmm."""
    return {p: m._mmt_reason for p, m in model.named_modules() if isinstance(m, TunedSwitchLinear)}
