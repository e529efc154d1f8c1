"""mlx-moe-tune: tile-tuned quantized MoE matmul (gather_qmm) kernels for MLX."""
__version__ = "0.1.0"
from . import tune  # noqa: E402,F401  (callable: mlx_moe_tune.tune(shapes, ms, ...))
from .ops import gather_qmm, gather_qmm_glu  # noqa: E402,F401  (H-cuda: the tuned op)
