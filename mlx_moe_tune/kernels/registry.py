"""The gather_qmm kernel families, by name, and their sweep registration.

`FAMILIES` / `families()` are what the op, the tuner (tables.py), the selftest and the sweep
iterate; a family carries its sources per dialect, so the same list serves Metal and CUDA.
"""
from __future__ import annotations

from .family import KernelFamily
from .qmm import QMM, QMM_GLU
from .qmv import QMV

FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (QMV, QMM, QMM_GLU)}


def families() -> list[KernelFamily]:
    return list(FAMILIES.values())


def get(name: str) -> KernelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown kernel family {name!r}; choose from {sorted(FAMILIES)}") from None
