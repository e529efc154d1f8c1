"""mlx-moe-tune: tile-tuned quantized MoE matmul (gather_qmm) kernels for MLX."""
__version__ = "0.1.0"
