"""Between token ids and text around the sampler: stop tokens of a chat template, left-padded prompt
arrays, and completions decoded without their stop token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from posttrain_jax.tokenizer import Tokenizer, end_of_turn_token


def stop_tokens_for(tokenizer: Tokenizer, template: str, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The chat template's end-of-turn token (if the tokenizer has it), the EOS, and configured ids."""
    ids, end_of_turn = [], end_of_turn_token(template, tokenizer)
    for token in (end_of_turn, tokenizer.eos_token):
        if token is not None:
            try:
                ids.append(tokenizer.token_to_id(token))
            except KeyError:
                pass
    ids += [int(t) for t in extra]
    if not ids:
        raise ValueError(f"no stop token: the tokenizer has neither {end_of_turn!r} nor an EOS; "
                         f"configure sampling.stop_tokens")
    return tuple(dict.fromkeys(ids))


def pad_prompts(prompts: Sequence, width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(prompts), width] int32 tokens and mask, each prompt (anything with `.ids`) at the right edge."""
    tokens = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p.ids):], mask[i, width - len(p.ids):] = p.ids, 1
    return tokens, mask


def completion_text(tokenizer: Tokenizer, tokens: np.ndarray, length: int, stopped: bool) -> str:
    """The completion as text, without its stop token."""
    ids = tokens[:length - 1] if stopped else tokens[:length]
    return tokenizer.decode([int(t) for t in ids])
