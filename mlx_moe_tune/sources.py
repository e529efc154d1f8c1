"""Find files shipped beside the package: kernel sources (metal/, cuda/) and sweep presets.

In a wheel they sit inside the package (hatch force-include); in a source checkout or an
editable install they sit at the repository root, one level up.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def data_dir(name: str) -> Path:
    """Directory `name` ("metal", "cuda", "sweeps") from the installed package or the checkout."""
    for cand in (_PKG / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"mlx-moe-tune: data directory {name!r} not found next to {_PKG}")


@lru_cache(maxsize=None)
def read_source(relpath: str) -> str:
    """Text of a kernel source, e.g. read_source("cuda/qmv.cu")."""
    top, _, rest = relpath.partition("/")
    return (data_dir(top) / rest).read_text()
