"""Which MLX backend runs kernels here, and how kernel sources are compiled on it.

A kernel *dialect* is the language of a source (metal or cuda). A *backend* is what runs it:
MLX's Metal or CUDA custom-kernel API on a GPU, or the CPU SIMT emulator for either dialect.
Everything above this module treats the backend as a detail.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx


@dataclass(frozen=True)
class Backend:
    name: str  # "metal" | "cuda" | "emulator-metal" | "emulator-cuda"
    dialect: str  # "metal" | "cuda"
    max_threads: int  # threads per threadgroup / block
    max_shared_bytes: int  # threadgroup / shared memory per group
    simd_width: int = 32

    @property
    def emulated(self) -> bool:
        return self.name.startswith("emulator")

    def kernel_factory(self) -> Callable:
        """The `mx.fast.metal_kernel`-like constructor for this backend."""
        if self.name == "metal":
            return mx.fast.metal_kernel
        if self.name == "cuda":
            return mx.fast.cuda_kernel
        from . import emulator

        return emulator.metal_kernel if self.dialect == "metal" else emulator.cuda_kernel


# Apple: 32 KB threadgroup memory, 1024 threads. H100: 227 KB opt-in dynamic shared memory.
METAL = Backend("metal", "metal", 1024, 32 * 1024)
CUDA = Backend("cuda", "cuda", 1024, 227 * 1024)
EMULATOR_METAL = Backend("emulator-metal", "metal", 1024, 32 * 1024)
EMULATOR_CUDA = Backend("emulator-cuda", "cuda", 1024, 227 * 1024)
BACKENDS = {b.name: b for b in (METAL, CUDA, EMULATOR_METAL, EMULATOR_CUDA)}


@lru_cache(maxsize=None)
def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU backend here, else None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def default_backend(dialect: str | None = None) -> Backend:
    """The GPU backend when present; otherwise the emulator (Metal dialect unless asked)."""
    gpu = gpu_backend()
    if gpu is not None and dialect in (None, gpu):
        return BACKENDS[gpu]
    return BACKENDS[f"emulator-{dialect or 'metal'}"]


class BackendUnavailable(ValueError, RuntimeError):
    """A GPU backend asked for where MLX has none (a ValueError, so the CLI prints one line; a
    RuntimeError, as callers that catch the older exception expect)."""


def get_backend(name: str | Backend | None) -> Backend:
    if isinstance(name, Backend):
        return name
    if name is None:
        return default_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    b = BACKENDS[name]
    if not b.emulated and gpu_backend() != b.name:
        raise BackendUnavailable(f"backend {name!r} is not available here (MLX GPU backend: {gpu_backend()})")
    return b


# --- the `--backend` option every subcommand shares ------------------------------------------
# auto: the GPU when MLX has one, else the CPU; gpu: whichever GPU backend MLX has; metal / cuda:
# that GPU backend; cpu: MLX ops on the CPU, our kernels on the emulator (the GPU's dialect, else
# Metal); emulator-metal / emulator-cuda: the CPU with that emulator dialect.
CHOICES = ("auto", "gpu", "metal", "cuda", "cpu", "emulator-metal", "emulator-cuda")
CHOICES_HELP = ("auto (the GPU, else the CPU), gpu, metal, cuda, cpu (kernels on the emulator), "
                "emulator-metal, emulator-cuda (default auto)")


def add_backend_argument(p, help_prefix: str = "where MLX ops and our kernels run") -> None:
    p.add_argument("--backend", default="auto", metavar="NAME", help=f"{help_prefix}: {CHOICES_HELP}")


def resolve(choice: str | None, *, set_device: bool = False) -> Backend:
    """The kernel backend for a `--backend` choice (None = auto); with `set_device`, also make
    MLX's default device the GPU (GPU backends) or the CPU (emulated). Raises ValueError with
    one line naming the option and what was expected."""
    choice = "auto" if choice is None else str(choice)
    if choice not in CHOICES:
        raise ValueError(f"--backend {choice!r}: choose from {', '.join(CHOICES)}")
    gpu = gpu_backend()
    if choice == "auto":
        b = BACKENDS[gpu] if gpu else default_backend()
    elif choice == "gpu":
        if gpu is None:
            raise ValueError("--backend gpu: MLX has no GPU backend here (install mlx[cuda] or use a Mac); "
                             "use --backend cpu or auto")
        b = BACKENDS[gpu]
    elif choice in ("metal", "cuda"):
        if gpu != choice:
            raise ValueError(f"--backend {choice}: MLX has no {choice} backend here (GPU backend: {gpu}); "
                             f"use --backend {'auto' if gpu else 'cpu'} or emulator-{choice}")
        b = BACKENDS[choice]
    elif choice == "cpu":
        b = BACKENDS[f"emulator-{gpu or 'metal'}"]
    else:
        b = BACKENDS[choice]
    if set_device:
        mx.set_default_device(mx.cpu if b.emulated else mx.gpu)
    return b
