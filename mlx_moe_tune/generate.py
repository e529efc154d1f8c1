"""`mlx-moe-tune generate`: `mlx_lm.generate` with the model's MoE layers on our kernels, and
`load`, mlx_lm.load + patch_model.

The command takes mlx-lm's own flags (copied from `mlx_lm.generate.setup_arg_parser`, so they
keep mlx-lm's names and defaults) plus `--no-patch`, runs what `mlx_lm.generate`'s main() runs
and prints what it prints; one line on stderr says how many MoE projections were patched.

    mlx-moe-tune generate --model mlx-community/Qwen3-30B-A3B-4bit --prompt "hello" -m 64
    mlx-moe-tune generate --model ... --prompt "hello" --no-patch     # stock mlx-lm, to compare
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def load(path_or_hf_repo, *args, patch: bool | dict = True, **kwargs):
    """`mlx_lm.load(path_or_hf_repo, *args, **kwargs)` with the model patched in place.

    Returns exactly what mlx_lm.load returns: (model, tokenizer), or (model, tokenizer, config)
    with return_config=True. patch: False loads stock; a dict is passed to
    `mlx_moe_tune.patch.patch_model` (backend, table, fuse, compile). How many projections
    run our kernels: `mlx_moe_tune.patch.patched_layers(model)`.
    """
    import mlx_lm

    out = mlx_lm.load(path_or_hf_repo, *args, **kwargs)
    if patch is not False:
        from .patch import patch_model

        patch_model(out[0], **(patch if isinstance(patch, dict) else {}))
    return out


def _mlx_lm_parser() -> argparse.ArgumentParser:
    from mlx_lm.generate import setup_arg_parser

    return setup_arg_parser()


# the dests main() below handles; a flag a newer mlx-lm adds is refused, not silently ignored
_HANDLED = {
    "model", "trust_remote_code", "adapter_path", "extra_eos_token", "system_prompt", "prompt",
    "image", "prefill_response", "max_tokens", "temp", "top_p", "min_p", "top_k",
    "xtc_probability", "xtc_threshold", "min_tokens_to_keep", "seed", "ignore_chat_template",
    "use_default_chat_template", "chat_template_config", "verbose", "max_kv_size",
    "prefill_step_size", "prompt_cache_file", "quantize_activations", "kv_bits", "kv_group_size",
    "quantized_kv_start", "draft_model", "num_draft_tokens",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = _mlx_lm_parser()
    p.description = "mlx_lm.generate with the model patched: " + (src.description or "")
    defaults = {}
    for action in src._actions:  # what argparse's parents= does, minus the clashing -h
        if action.dest != "help":
            p._add_action(action)
            defaults[action.dest] = action.default
    p.add_argument("--no-patch", action="store_true",
                   help="run stock mlx-lm (no kernel swap), to compare")
    p.set_defaults(_mlx_lm_defaults=defaults)


def _patch_line(model, patched: bool) -> str:
    from .patch import patched_layers

    if not patched:
        return "mlx-moe-tune: --no-patch: stock mlx-lm kernels"
    layers = patched_layers(model)
    tuned = sum(r is None for r in layers.values())
    line = f"mlx-moe-tune: {tuned} of {len(layers)} MoE projections on the tuned kernels"
    stock = {r for r in layers.values() if r is not None}
    if stock:
        line += f" (the rest stay on mx.gather_qmm: {sorted(stock)[0]})"
    elif not layers:
        line += " (no QuantizedSwitchLinear layers in this model)"
    return line


def run(args) -> int:
    """mlx_lm.generate's main() (mlx-lm 0.32.2), with mlx_moe_tune.load in place of mlx_lm.load."""
    from .cli import CLIError

    unknown = [d for d, v in args._mlx_lm_defaults.items()
               if d not in _HANDLED and getattr(args, d) != v]
    if unknown:
        raise CLIError(f"--{unknown[0].replace('_', '-')}: not supported by mlx-moe-tune generate "
                       f"(newer than the mlx-lm flags it mirrors); run mlx_lm.generate for it")

    import mlx.core as mx
    import numpy as np
    g = importlib.import_module("mlx_lm.generate")  # the module: `mlx_lm.generate` is also a function

    if args.seed is not None:
        mx.random.seed(args.seed)

    using_cache = args.prompt_cache_file is not None
    if using_cache:
        prompt_cache, metadata = g.load_prompt_cache(args.prompt_cache_file, return_metadata=True)
        if isinstance(prompt_cache[0], g.QuantizedKVCache):
            if args.kv_bits is not None and args.kv_bits != prompt_cache[0].bits:
                raise ValueError("--kv-bits does not match the kv cache loaded from --prompt-cache-file.")
            if args.kv_group_size != prompt_cache[0].group_size:
                raise ValueError("--kv-group-size does not match the kv cache loaded from --prompt-cache-file.")

    tokenizer_config = {} if not using_cache else json.loads(metadata["tokenizer_config"])
    tokenizer_config["trust_remote_code"] = args.trust_remote_code

    model_path = args.model
    if using_cache:
        if model_path is None:
            model_path = metadata["model"]
        elif model_path != metadata["model"]:
            raise ValueError(f"Providing a different model ({model_path}) than that used to create "
                             f"the prompt cache ({metadata['model']}) is an error.")
    model_path = model_path or g.DEFAULT_MODEL

    model, tokenizer, config = load(
        model_path,
        patch=not args.no_patch,
        adapter_path=args.adapter_path,
        tokenizer_config=tokenizer_config,
        model_config={"quantize_activations": args.quantize_activations},
        return_config=True,
        trust_remote_code=args.trust_remote_code,
    )
    print(_patch_line(model, not args.no_patch), file=sys.stderr, flush=True)
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)

    template_kwargs = {}
    if args.chat_template_config is not None:
        template_kwargs = json.loads(args.chat_template_config)

    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        prompt = tokenizer.apply_chat_template(
            messages, tokenize=False, continue_final_message=has_prefill,
            add_generation_prompt=not has_prefill, **template_kwargs)
        if using_cache:  # the prompt is the suffix after the prefix stored in the cache
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, continue_final_message=has_prefill,
                add_generation_prompt=not has_prefill)
            prompt = prompt[test_prompt.index("<query>"):]

    if args.image:
        processor = g.load_processor(model, config)
        if processor is None:
            raise ValueError(f"The model {model_path} does not take images.")
        from PIL import Image

        images = [np.asarray(Image.open(f).convert("RGB")) for f in args.image]
        prompt, pixel_values = processor(prompt, images=images)
    else:
        pixel_values = None
    prompt = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)

    input_embeddings = None
    if pixel_values is not None:
        input_embeddings = model.embed_inputs(mx.array(prompt), pixel_values=pixel_values)
        mx.eval(input_embeddings)  # the prefill runs on another stream: vision rows first

    draft_model = None
    if args.draft_model is not None:
        draft_model, draft_tokenizer = load(args.draft_model, patch=not args.no_patch)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise ValueError("Draft model tokenizer does not match model tokenizer.")
    sampler = g.make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )
    response = g.generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, verbose=args.verbose,
        sampler=sampler, max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache if using_cache else None, kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start,
        draft_model=draft_model, num_draft_tokens=args.num_draft_tokens,
        input_embeddings=input_embeddings,
    )
    if not args.verbose:
        print(response)
    return 0
