"""Sweep presets: the MoE weight shapes of real models, read from `sweeps/<name>.toml`.

A preset is one MoE layer: the number of experts, top-k, the quantization format and one or
more weight matrices (K input features, N output features each). Example (`sweeps/tiny.toml`):

    experts = 8
    top_k = 2
    mode = "affine"; bits = 4; group_size = 64; dtype = "bfloat16"
    m = "1..64x2"            # default rows-per-expert list for `sweep`
    [[matrices]]
    name = "w"; k = 256; n = 128
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .sources import data_dir

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Matrix:
    name: str
    k: int
    n: int


@dataclass(frozen=True)
class Preset:
    name: str
    experts: int
    top_k: int
    matrices: tuple[Matrix, ...]
    mode: str = "affine"
    bits: int = 4
    group_size: int = 64
    dtype: str = "bfloat16"
    m: str = "1..64x2"
    description: str = ""
    path: str | None = field(default=None, compare=False)

    def with_format(self, mode=None, bits=None, group_size=None, dtype=None) -> "Preset":
        """A copy with the given format fields replaced (None keeps the preset's value)."""
        kw = {k: v for k, v in dict(mode=mode, bits=bits, group_size=group_size, dtype=dtype).items() if v is not None}
        return replace(self, **kw)

    @property
    def format(self) -> str:
        return f"{self.mode} {self.bits}-bit gs{self.group_size} {self.dtype}"


def presets_dir() -> Path:
    return data_dir("sweeps")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return v


def from_dict(name: str, d: dict, path: str | None = None) -> Preset:
    where = f"preset {name!r}"
    mats = d.get("matrices")
    if not isinstance(mats, list) or not mats:
        raise ValueError(f"{where}: needs at least one [[matrices]] entry with k and n")
    matrices = tuple(
        Matrix(str(mt.get("name", f"w{i}")), _int(mt, "k", where), _int(mt, "n", where)) for i, mt in enumerate(mats)
    )
    dtype = d.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} not one of {DTYPES}")
    p = Preset(
        name=name,
        experts=_int(d, "experts", where),
        top_k=_int(d, "top_k", where),
        matrices=matrices,
        mode=str(d.get("mode", "affine")),
        bits=_int(d, "bits", where) if "bits" in d else 4,
        group_size=_int(d, "group_size", where) if "group_size" in d else 64,
        dtype=dtype,
        m=str(d.get("m", "1..64x2")),
        description=str(d.get("description", "")),
        path=path,
    )
    if p.top_k > p.experts:
        raise ValueError(f"{where}: top_k {p.top_k} > experts {p.experts}")
    return p


def load_preset(name: str) -> Preset:
    """The preset `name` (a file stem in sweeps/, or a path to a .toml file)."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        name = path.stem
    else:
        path = presets_dir() / f"{name}.toml"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    with open(path, "rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"preset {name!r} ({path}): bad TOML: {e}") from None
    return from_dict(name, d, str(path))


def custom(experts: int, k: int, n: int, top_k: int, **fmt) -> Preset:
    """A one-matrix preset from `--shape E,K,N,TOPK`."""
    if min(experts, k, n, top_k) <= 0:
        raise ValueError(f"--shape values must be positive, got E={experts} K={k} N={n} TOPK={top_k}")
    if top_k > experts:
        raise ValueError(f"--shape: top_k {top_k} > experts {experts}")
    name = f"E{experts}-K{k}-N{n}-top{top_k}"
    return Preset(name=name, experts=experts, top_k=top_k, matrices=(Matrix("w", k, n),), **fmt)
