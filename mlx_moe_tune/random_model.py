"""Random-weight mlx-lm MoE models, built from a config dict and quantized in memory.

Nothing is downloaded: a real model's layer shapes with random weights is enough to time its MoE
layers and to test the patch. `arch_config` gives whole architectures for `bench-model --arch`
(attention, vocabulary and MoE shapes of the public model, fewer layers); `shape_config` gives a
MoE shape on a small qwen3_moe or mixtral model, for tests and layer-level scripts.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# MoE shapes of public models (hidden, moe_intermediate, experts, top_k)
SHAPES = {
    "tiny": dict(hidden_size=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8),
    "gemma-26b-a4b": dict(hidden_size=2816, moe_intermediate_size=704, num_experts=128,
                          num_experts_per_tok=8),
}


def shape_config(name: str = "tiny", *, layers: int = 2, vocab: int = 256,
                 model_type: str = "qwen3_moe") -> dict:
    """An mlx-lm config dict (qwen3_moe or mixtral) with the MoE shape of `name`; attention and
    vocabulary kept small."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    s = SHAPES[name]
    D = s["hidden_size"]
    heads = max(2, D // 128)
    common = dict(hidden_size=D, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 2), vocab_size=vocab, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False)
    if model_type == "qwen3_moe":
        return dict(common, model_type="qwen3_moe", head_dim=D // heads,
                    intermediate_size=2 * D, num_experts=s["num_experts"],
                    num_experts_per_tok=s["num_experts_per_tok"], decoder_sparse_step=1,
                    mlp_only_layers=[], moe_intermediate_size=s["moe_intermediate_size"],
                    max_position_embeddings=4096, norm_topk_prob=True)
    if model_type == "mixtral":
        return dict(common, model_type="mixtral", intermediate_size=s["moe_intermediate_size"],
                    num_local_experts=s["num_experts"],
                    num_experts_per_tok=s["num_experts_per_tok"])
    raise ValueError(f"unsupported model_type {model_type!r} (qwen3_moe or mixtral)")


_QWEN3_MOE = dict(model_type="qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[],
                  norm_topk_prob=True, rms_norm_eps=1e-6, tie_word_embeddings=False)

# Whole architectures for `bench-model --arch NAME --random`; num_hidden_layers is set per run.
ARCHS = {
    # Qwen3-30B-A3B's config.json (48 layers in the real model)
    "qwen3_moe": dict(_QWEN3_MOE, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                      num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                      rope_theta=1e6, max_position_embeddings=40960),
    # Gemma 4 26B-A4B's MoE shape (the sweeps' gemma-26b-a4b preset) on qwen3_moe layers: mlx-lm's
    # gemma4_text adds a dense MLP beside the experts and GeGLU, whose attention shapes we do not
    # pin down here; this times the MoE part at that shape.
    "gemma-26b-a4b": dict(_QWEN3_MOE, hidden_size=2816, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128, intermediate_size=2 * 2816,
                          moe_intermediate_size=704, num_experts=128, num_experts_per_tok=8,
                          vocab_size=262144, rope_theta=1e6, max_position_embeddings=131072),
    # CI: seconds on the CPU, kernels on the emulator
    "tiny": shape_config("tiny", layers=2),
}


def arch_config(name: str, layers: int) -> dict:
    """The config of architecture `name` (see ARCHS) with `layers` decoder layers."""
    if name not in ARCHS:
        raise ValueError(f"--arch {name!r}: unknown architecture; choose from {', '.join(sorted(ARCHS))}")
    if layers < 1:
        raise ValueError(f"--layers {layers}: must be >= 1")
    return dict(ARCHS[name], num_hidden_layers=layers)


def build_model(config: dict, *, bits: int = 4, group_size: int = 64, mode: str = "affine",
                dtype=mx.bfloat16, seed: int = 0, experts_only: bool = False) -> nn.Module:
    """Random-weight mlx-lm model from `config`, cast to `dtype` and quantized: all layers, or with
    `experts_only` just the MoE experts' SwitchLinear layers (what the patch replaces). The GPU
    tests use that: MLX 0.32.4 CUDA's quantized_matmul is wrong at some small shapes
    (scripts/qlinear_probe.py), and a test of our kernels must not hinge on it."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import _get_classes, quantize_model

    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(dtype)
    pred = (lambda path, m: isinstance(m, SwitchLinear)) if experts_only else None
    model, _ = quantize_model(model, dict(config), group_size=group_size, bits=bits, mode=mode,
                              quant_predicate=pred)
    # one layer at a time: a whole large model's float weights never live at once
    for layer in getattr(getattr(model, "model", model), "layers", []):
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model
