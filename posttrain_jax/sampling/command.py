"""`posttrain-jax sample`: look at what a model says.

    posttrain-jax sample --checkpoint runs/sft-quickstart --prompt "What is 12 plus 7?" [--greedy]
    posttrain-jax sample --checkpoint HF_DIR --prompt "..." --prompt "..." --num-samples 4 --temperature 0.7

`--checkpoint` is a run directory (or one of its checkpoint steps) written by a
posttrain-jax trainer, or a Hugging Face model directory (config.json +
safetensors). The tokenizer and chat template default to the run's own (from
its saved config) or the HF directory's tokenizer and its own chat template.
"""

from __future__ import annotations

import argparse
import os

from posttrain_jax.checkpointing import read_metadata, resolve_step_dir
from posttrain_jax.tokenizer import load_tokenizer, render_chat


def load_for_sampling(checkpoint: str, tokenizer: str | None, template: str | None):
    """(model, tokenizer, template) from a run checkpoint or a Hugging Face directory."""
    if os.path.exists(os.path.join(checkpoint, "config.json")):
        from posttrain_jax.models import load_hf
        model = load_hf(checkpoint)
        return model, load_tokenizer(tokenizer or checkpoint), template or "auto"
    from posttrain_jax.models.from_config import load_checkpoint_model
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):  # a run directory
        checkpoint = os.path.join(checkpoint, "checkpoints")
    step_dir = resolve_step_dir(checkpoint)
    saved = ((read_metadata(step_dir) or {}).get("config") or {})
    model = load_checkpoint_model(checkpoint)
    tokenizer = tokenizer or saved.get("tokenizer")
    if not tokenizer:
        raise ValueError(f"{step_dir}: the run's config names no tokenizer; pass --tokenizer")
    return model, load_tokenizer(tokenizer), template or saved.get("chat_template") or "auto"


def main(argv: list[str]) -> None:
    from flax import nnx

    from posttrain_jax.sampling import Sampler, SamplingParams
    from posttrain_jax.sampling.text import completion_text, stop_tokens_for

    parser = argparse.ArgumentParser(prog="posttrain-jax sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory / checkpoint step, or an HF model dir")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeat for a batch)")
    parser.add_argument("--tokenizer", help="default: the run's tokenizer, or the HF directory's")
    parser.add_argument("--chat-template", help="auto (the model's own) | a built-in name (llama3, llama3.1, chatml, "
                        "qwen2.5, qwen3, gemma) | a .jinja file (default: the run's, else auto)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt text as is, no chat template")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, tokenizer, template = load_for_sampling(args.checkpoint, args.tokenizer, args.chat_template)
    if args.raw:
        prompts = [tokenizer.encode(p, add_bos=True) for p in args.prompt]
    else:
        prompts = [render_chat(tokenizer, [{"role": "user", "content": p}], template=template,
                               add_generation_prompt=True).ids for p in args.prompt]
    stops = stop_tokens_for(tokenizer, template)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop_tokens=stops, pad_token=pad,
                            num_samples=args.num_samples)
    graphdef, state = nnx.split(model)
    out = Sampler(graphdef, model.config)(state, prompts, params, seed=args.seed)
    for row in range(out.tokens.shape[0]):
        prompt = args.prompt[row // args.num_samples]
        text = completion_text(tokenizer, out.tokens[row], int(out.lengths[row]), bool(out.stopped[row]))
        tag = f" [sample {row % args.num_samples}]" if args.num_samples > 1 else ""
        end = "" if out.stopped[row] else " [max tokens]"
        print(f">>> {prompt}{tag}\n{text}{end}\n")
