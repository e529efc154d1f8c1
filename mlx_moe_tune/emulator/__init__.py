"""CPU SIMT emulator for Metal and CUDA kernel sources (see README.md in this folder).

`metal_kernel(...)` / `cuda_kernel(...)` are drop-in stand-ins for `mx.fast.metal_kernel` /
`mx.fast.cuda_kernel`: same constructor and call arguments, plus `check=True` on the call (or
env MLX_MOE_TUNE_EMULATOR_CHECK=1) for out-of-bounds / race / divergent-barrier checking.
"""
from __future__ import annotations

from .kernel import (
    CudaKernel,
    EmulatorCheckError,
    EmulatorCompileError,
    EmulatorError,
    EmulatorUnsupportedError,
    MetalKernel,
    bf16_bits_to_f32,
    cuda_kernel,
    cuda_source,
    f32_to_bf16_bits,
    metal_kernel,
    metal_source,
)

__all__ = [
    "CudaKernel",
    "EmulatorCheckError",
    "EmulatorCompileError",
    "EmulatorError",
    "EmulatorUnsupportedError",
    "MetalKernel",
    "bf16_bits_to_f32",
    "cuda_kernel",
    "cuda_source",
    "f32_to_bf16_bits",
    "metal_kernel",
    "metal_source",
]
