"""mlx-moe-tune: tile-tuned quantized MoE matmul (gather_qmm) kernels for MLX."""
__version__ = "0.1.0"
from . import tune  # noqa: E402,F401  (callable: mlx_moe_tune.tune(shapes, ms, ...))
from .ops import gather_qmm, gather_qmm_glu  # noqa: E402,F401  (H-cuda: the tuned op)


def __getattr__(name):
    # lazy: `import mlx_moe_tune` must not import mlx-lm (and transformers) for the kernel users
    if name == "load":
        from .generate import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
