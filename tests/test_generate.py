"""`mlx_moe_tune.load` and `mlx-moe-tune generate` on a tiny model saved to disk with mlx-lm's own
save utilities and an offline byte-level tokenizer, against stock mlx-lm on the same directory.

The model is float32: in bf16 a random model's top-2 logits are close enough that two correct
kernels' roundings pick different greedy tokens within a few steps (the kernels' accuracy is
tests/test_patch.py's business). Our CUDA kernels take bf16/fp16 only, so on a CUDA GPU the
float32 layers would stay stock and nothing would be tested: skipped there.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_moe_tune import random_model
from mlx_moe_tune.cli import main

VOCAB = 512  # > the 259 byte-level tokens
LAYERS = 2
PROMPT = "the tuned kernels"


def _skip_on_cuda():
    from mlx_moe_tune.backend import gpu_backend

    if gpu_backend() == "cuda":
        pytest.skip("float32 test model: the CUDA kernels take bf16/fp16 only")


def _tokenizer():
    """Byte-level BPE with no merges (every byte one token): no download, loads with mlx_lm.load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny qwen3_moe directory as mlx_lm.convert would write it (weights, config with the
    quantization, tokenizer files)."""
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    d = tmp_path_factory.mktemp("tiny-moe")
    config = random_model.shape_config("tiny", layers=LAYERS, vocab=VOCAB)
    mx.random.seed(0)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    model, config = quantize_model(model, config, group_size=64, bits=4, mode="affine")
    save_model(d, model)
    save_config(config, config_path=d / "config.json")
    _tokenizer().save_pretrained(d)
    return str(d)


def _greedy(model, tokenizer, n=16):
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=n)]


def test_load_returns_what_mlx_lm_load_returns(model_dir):
    import mlx_lm

    import mlx_moe_tune
    from mlx_moe_tune.patch import TunedSwitchGLU, patched_layers

    ref = mlx_lm.load(model_dir)
    got = mlx_moe_tune.load(model_dir)
    assert len(got) == len(ref) == 2 and type(got[1]) is type(ref[1]) and type(got[0]) is type(ref[0])
    assert patched_layers(got[0]) == {f"model.layers.{i}.mlp.switch_mlp.{p}": None
                                      for i in range(LAYERS) for p in ("gate_proj", "up_proj", "down_proj")}
    *_, ref_cfg = mlx_lm.load(model_dir, return_config=True)
    model, _, cfg = mlx_moe_tune.load(model_dir, return_config=True)
    assert cfg == ref_cfg and sum(type(m) is TunedSwitchGLU for _, m in model.named_modules()) == LAYERS
    stock, _ = mlx_moe_tune.load(model_dir, patch=False)
    assert not patched_layers(stock)
    model, _ = mlx_moe_tune.load(model_dir, patch={"fuse": False})
    assert not model.layers[0].mlp.switch_mlp._mmt_fuse


def test_greedy_tokens_match_stock(model_dir):
    _skip_on_cuda()
    import mlx_lm

    import mlx_moe_tune

    ref = _greedy(*mlx_lm.load(model_dir))
    assert len(ref) == 16 and len(set(ref)) > 1, ref  # a varied sequence, not one repeated token
    model, tok = mlx_moe_tune.load(model_dir)
    assert _greedy(model, tok) == ref
    glus = [m for _, m in model.named_modules() if type(m).__name__ == "TunedSwitchGLU"]
    fell_back = {n: glu[n].__dict__["_mmt_fallback"] for glu in glus for n in ("gate_proj", "up_proj", "down_proj")
                 if "_mmt_fallback" in glu[n].__dict__}
    assert len(glus) == LAYERS and not fell_back  # our kernels ran, not mx.gather_qmm


def _split(out: str) -> tuple[str, list[str]]:
    """mlx_lm.generate's verbose output: the text between the ===== rules, the stats lines with
    their numbers masked except the token counts."""
    parts = out.split("=" * 10 + "\n")
    assert len(parts) == 3, out
    stats = [re.sub(r", [\d.]+ tokens-per-sec", ", <tps>", s) for s in parts[2].splitlines()]
    return parts[1], [re.sub(r"[\d.]+ GB", "<GB>", s) for s in stats]


def test_generate_cli_matches_mlx_lm_generate(model_dir, capsys, monkeypatch):
    _skip_on_cuda()
    mlx_generate = importlib.import_module("mlx_lm.generate")  # mlx_lm.generate is also a function
    argv = ["--model", model_dir, "--prompt", PROMPT, "--max-tokens", "16"]
    monkeypatch.setattr(sys, "argv", ["mlx_lm.generate", *argv])
    mlx_generate.main()
    ref_text, ref_stats = _split(capsys.readouterr().out)
    assert ref_stats[1] == "Generation: 16 tokens, <tps>", ref_stats

    assert main(["generate", *argv]) == 0
    cap = capsys.readouterr()
    assert _split(cap.out) == (ref_text, ref_stats)
    assert cap.err.strip() == f"mlx-moe-tune: {3 * LAYERS} of {3 * LAYERS} MoE projections on the tuned kernels"

    assert main(["generate", *argv, "--no-patch", "--temp", "0"]) == 0
    cap = capsys.readouterr()
    assert _split(cap.out) == (ref_text, ref_stats) and "--no-patch" in cap.err


def test_generate_takes_mlx_lm_flags():
    """The parser is mlx-lm's own (names, short forms, defaults), plus --no-patch."""
    import argparse

    from mlx_lm.generate import setup_arg_parser

    from mlx_moe_tune import generate

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    ours = {a.dest: (tuple(a.option_strings), a.default) for a in p._actions if a.dest != "help"}
    theirs = {a.dest: (tuple(a.option_strings), a.default) for a in setup_arg_parser()._actions if a.dest != "help"}
    assert ours.pop("no_patch") == (("--no-patch",), False)
    ours.pop("_mlx_lm_defaults", None)
    assert ours == theirs
    assert set(theirs) <= generate._HANDLED


def test_import_does_not_import_mlx_lm():
    code = ("import sys, mlx_moe_tune; assert 'mlx_lm' not in sys.modules, 'eager'; "
            "f = mlx_moe_tune.load; assert callable(f) and f.__module__ == 'mlx_moe_tune.generate'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
