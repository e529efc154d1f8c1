"""A kernel family is data: per-dialect sources, a tile space, a validity check and a launch rule.

The same family object serves Metal, CUDA and the emulator; the backend only decides which
`*_kernel` constructor compiles the source (see backend.Backend.kernel_factory).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from ..backend import Backend
from ..sources import read_source
from .common import template_args

Config = Mapping[str, int]

# Tile-space overrides for this process and its children (sweep/tune `--space KEY=V1,V2`): every
# family with param KEY searches these values instead of its own, e.g. PF=0,3 before a value of
# PF is in the shipped space. Format: "KEY=V1,V2;KEY2=V1".
SPACE_ENV = "MLX_MOE_TUNE_SPACE"


def parse_space(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """["PF=0,3", "WS=0,1"] -> {"PF": (0, 3), "WS": (0, 1)}; ValueError naming a malformed item."""
    out = {}
    for item in items:
        key, eq, vals = item.partition("=")
        try:
            values = tuple(int(v) for v in vals.split(","))
        except ValueError:
            values = ()
        if not eq or not key.strip().isalpha() or not values:
            raise ValueError(f"--space {item!r}: expected KEY=V1,V2,... with integer values (e.g. PF=0,3)")
        out[key.strip()] = values
    return out


def space_overrides() -> dict[str, tuple[int, ...]]:
    text = os.environ.get(SPACE_ENV, "")
    return parse_space([t for t in text.split(";") if t]) if text else {}


@dataclass(frozen=True)
class Problem:
    """One gather_qmm call as the kernels see it: `rows` (token, expert) pairs over E experts."""

    experts: int
    k: int  # input features (reduction)
    n: int  # output features
    rows: int  # T * top_k
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    dtype: str = "bfloat16"  # activation / output dtype
    m: float | None = None  # rows per active expert, when known (tile choice only)

    @property
    def rows_per_expert(self) -> float:
        return self.m if self.m is not None else self.rows / self.experts


@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]  # in threads, like mx.fast.*_kernel
    threadgroup: tuple[int, int, int]
    shared_memory: int = 0  # dynamic bytes (CUDA only)


@dataclass(frozen=True)
class DialectSource:
    body: str  # relpath of the kernel body, e.g. "cuda/qmm.cu"
    headers: tuple[str, ...] = ()  # relpaths prepended as `header`, in order

    def text(self) -> tuple[str, str]:
        return read_source(self.body), "\n".join(read_source(h) for h in self.headers)


@dataclass(frozen=True)
class KernelFamily:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sources: Mapping[str, DialectSource]  # by dialect
    space: Mapping[str, Mapping[str, Sequence[int]]]  # by dialect: ordered tile param -> values
    check: Callable[[Problem, Config, Backend], str | None]  # reason the config is invalid, or None
    launch: Callable[[Problem, Config, Backend], Launch]
    template: Callable[[Problem, Config], list[tuple[str, object]]]
    # by dialect: tile params a config may omit (tables and ids written before the param existed),
    # with the value that builds the kernel as it was then
    optional: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # how the kernel learns each pair's expert: "ids" (reads them directly), "plan" (a routing
    # plan: order + offsets) or "sorted" (ids already grouped by expert, no plan)
    route: str = "ids"
    weight_sets: int = 1  # 2: gate and up, fused SwiGLU epilogue
    # the same tiles on ids that are already sorted (route "sorted"), where this family has one
    sorted_twin: "KernelFamily | None" = None
    kernel_name: str = ""  # MLX's kernel name; default mmt_<name>
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        """Name of this kernel variant: the family's, with `.sorted` for a sorted twin."""
        return f"{self.name}.sorted" if self.route == "sorted" else self.name

    def configs(self, dialect: str) -> Iterator[dict[str, int]]:
        over = space_overrides()
        space = {k: over.get(k, v) for k, v in self.space.get(dialect, {}).items()}
        keys = list(space)
        for vals in itertools.product(*(space[k] for k in keys)):
            yield dict(zip(keys, vals))

    def takes(self, keys, dialect: str) -> bool:
        """Whether a config with exactly these keys is one of this family's (optional ones may be absent)."""
        space, opt = set(self.space.get(dialect, {})), set(self.optional.get(dialect, {}))
        return bool(space) and space - opt <= set(keys) <= space

    def complete(self, config: Config, dialect: str) -> dict[str, int]:
        """`config` with its omitted optional params filled in, in the space's order."""
        opt = self.optional.get(dialect, {})
        full = {**{k: v for k, v in opt.items() if k not in config}, **config}
        order = list(self.space.get(dialect, {}))
        return {k: full[k] for k in order if k in full} | {k: v for k, v in full.items() if k not in order}

    def call_template(self, problem: Problem, config: Config, x_div: int = 1) -> list[tuple[str, object]]:
        """Template arguments of one launch: the family's, with X_DIV (x row of pair p is
        p // X_DIV) set by the call's layout, not by the shape."""
        return [(k, x_div if k == "X_DIV" else v) for k, v in self.template(problem, config)]

    def valid_configs(self, problem: Problem, backend: Backend) -> list[dict[str, int]]:
        return [c for c in self.configs(backend.dialect) if self.check(problem, c, backend) is None]

    def kernel(self, backend: Backend, shared_memory: int = 0):
        """The compiled-kernel object for this backend (templates pick tiles). MLX takes a CUDA
        kernel's dynamic shared memory at construction, so there is one object per size."""
        key = (backend.name, shared_memory)
        if key not in self._cache:
            if backend.dialect not in self.sources:
                raise NotImplementedError(f"kernel family {self.name!r} has no {backend.dialect} source")
            body, header = self.sources[backend.dialect].text()
            factory = backend.kernel_factory()
            kwargs = dict(
                name=self.kernel_name or f"mmt_{self.name}",
                input_names=list(self.input_names),
                output_names=list(self.output_names),
                source=body,
                header=header,
                ensure_row_contiguous=True,
            )
            if shared_memory:
                if backend.dialect != "cuda":
                    raise ValueError(f"dynamic shared memory is a CUDA launch setting (backend {backend.name})")
                kwargs["shared_memory"] = int(shared_memory)
            self._cache[key] = factory(**kwargs)
        return self._cache[key]


WEIGHTS = ("w", "scales", "biases")
GLU_WEIGHTS = ("w_gate", "scales_gate", "biases_gate", "w_up", "scales_up", "biases_up")
_HEADERS = {"cuda": ("cuda/mmt_intrinsics.cuh", "cuda/mmt_gather.cuh"), "metal": ("metal/mmt_gather.h",)}
_SUFFIX = {"cuda": "cu", "metal": "metal"}
_ROUTE_INPUTS = {"ids": ("idx",), "plan": ("order", "offsets"), "sorted": ("ids",)}


def gather_families(name: str, route: str, space, check, launch,
                    optional=None) -> tuple[KernelFamily, KernelFamily]:
    """A gather kernel family and its fused SwiGLU twin `<name>_glu`: they differ only in their
    weight inputs (one set, or gate and up), their body source, `check(..., glu=)` and
    `launch(..., glu=)`. A "plan" family also gets a `sorted_twin` on the same tiles for ids
    already grouped by expert (body `<name>_sorted`, `launch(..., route="sorted")`)."""
    def make(fname: str, weights: tuple[str, ...], glu: bool, route: str, twin=None) -> KernelFamily:
        body = fname if route != "sorted" else f"{fname}_sorted"
        return KernelFamily(
            name=fname,
            input_names=("x", *weights, *_ROUTE_INPUTS[route]),
            output_names=("y",),
            sources={d: DialectSource(f"{d}/{body}.{_SUFFIX[d]}", h) for d, h in _HEADERS.items()},
            space=space,
            check=lambda p, c, b: check(p, c, b, glu=glu, route=route),
            launch=lambda p, c, b: launch(p, c, b, glu=glu, route=route),
            template=lambda problem, config: template_args(problem, config),
            optional=optional or {},
            route=route,
            weight_sets=2 if glu else 1,
            sorted_twin=twin,
            kernel_name=f"mmt_{body}",
        )

    def pair(fname: str, weights: tuple[str, ...], glu: bool) -> KernelFamily:
        twin = make(fname, weights, glu, "sorted") if route == "plan" else None
        return make(fname, weights, glu, route, twin)

    return pair(name, WEIGHTS, False), pair(f"{name}_glu", GLU_WEIGHTS, True)


def config_id(config: Config) -> str:
    """Stable, readable id: 'BM16_BN64_BK64_WM1_WN4'."""
    return "_".join(f"{k}{v}" for k, v in config.items())


def parse_config_id(text: str) -> dict[str, int]:
    import re

    out = {}
    for part in text.split("_"):
        m = re.fullmatch(r"([A-Za-z]+)(\d+)", part)
        if not m:
            raise ValueError(f"bad config id part {part!r} in {text!r}")
        out[m.group(1)] = int(m.group(2))
    return out
