"""Model-based reward: a trained reward model (scalar head) as a reward function.

The reward is read exactly where `posttrain_jax.trainers.rm` trains and
scores it, and where transformers' ``*ForSequenceClassification`` reads it:
the conversation (prompt + completion as the assistant turn) is rendered
with `render_chat` and the score is the head's output at its last token
(the last non-pad token: ``<|eot_id|>`` with Llama 3, the ``\n`` after
``<|im_end|>`` with chatml / Qwen).

Unlike `trainers.rm.score`, which pads each batch to its own longest row,
every forward here has one fixed shape: `batch_size` rows (the last chunk is
padded with empty rows) of `max_length` tokens, or, without `max_length`, a
power-of-two width (>= 32), so a GRPO run compiles the forward once (or once
per width bucket), not once per batch. Right padding with segment id 0 does
not change the scores of real tokens: attention is causal and segment-masked.

Params are split from the graph once and passed to the jitted forward as an
argument (never closed over), so a model updated in place between calls is
not baked into the compiled program.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posttrain_jax.rewards.compose import SampleError
from posttrain_jax.tokenizer import Tokenizer, load_tokenizer, render_chat

_MIN_BUCKET = 32


def _bucket(length: int) -> int:
    return max(_MIN_BUCKET, 1 << math.ceil(math.log2(max(length, 1))))


class ModelReward:
    """Callable reward function scoring (prompt, completion) pairs with a scalar-head model."""

    correct_score = None  # a learned reward has no "correct" value: no accuracy metric

    def __init__(self, model, tokenizer: Tokenizer, *, template: str = "auto", batch_size: int = 8,
                 max_length: int | None = None):  # fmt: skip
        if getattr(model.config, "head", None) != "scalar":
            raise ValueError("reward_model_reward needs a reward model (scalar head); this model has a "
                             f"{model.config.head!r} head")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = model.config.max_position_embeddings
        if max_length is not None and not 1 <= max_length <= limit:
            raise ValueError(f"max_length must be in [1, {limit}] (the model's max_position_embeddings), "
                             f"got {max_length}")
        self.tokenizer, self.template = tokenizer, template
        self.batch_size, self.max_length, self.position_limit = batch_size, max_length, limit
        self.graphdef, self.params = nnx.split(model)
        # Scoring runs on the mesh the params live on (also when called inside a trainer's other mesh).
        sharding = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
        self.mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        self.num_traces = 0  # how often the forward was traced (= compiled): a test asserts it stays 1

        def forward(params, tokens, segment_ids, last):
            self.num_traces += 1  # runs at trace time only
            scores = nnx.merge(self.graphdef, params)(tokens, None, segment_ids)  # [batch, width]
            return jnp.take_along_axis(scores.astype(jnp.float32), last[:, None], axis=1)[:, 0]

        self._forward = jax.jit(forward)

    def update(self, model) -> None:
        """Score with new weights of the same architecture (no recompilation)."""
        self.params = nnx.state(model)

    def encode(self, prompt, completion: str) -> list[int]:
        """The model input of one sample: the whole rendered conversation."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
            messages = list(prompt)
        else:
            raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")
        encoded = render_chat(self.tokenizer, messages + [{"role": "assistant", "content": completion}],
                              template=self.template)
        return encoded.ids

    def width(self, lengths: Sequence[int]) -> int:
        """The padded width of a batch: max_length, else the power-of-two bucket of the longest row."""
        if self.max_length is not None:
            return self.max_length
        return min(_bucket(max(lengths)), self.position_limit)

    def __call__(self, completions: Sequence[str], *, prompts: Sequence, rows: Sequence | None = None) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(prompts)} prompts")
        limit = self.max_length or self.position_limit
        encoded = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            try:
                encoded.append(self.encode(prompt, completion))
                if len(encoded[-1]) > limit:
                    # Truncating would move or drop the token the reward is read at.
                    raise ValueError(f"the rendered conversation has {len(encoded[-1])} input tokens, more than "
                                     f"{'max_length' if self.max_length else 'max_position_embeddings'} = {limit}")
            except Exception as e:
                raise SampleError(i, e) from e
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            width = self.width([len(ids) for ids in chunk])
            tokens = np.zeros((self.batch_size, width), np.int32)
            segment_ids = np.zeros_like(tokens)
            last = np.zeros(self.batch_size, np.int32)
            for r, ids in enumerate(chunk):
                tokens[r, :len(ids)], segment_ids[r, :len(ids)], last[r] = ids, 1, len(ids) - 1
            if self.mesh is not None:
                with jax.set_mesh(self.mesh):
                    out = np.asarray(self._forward(self.params, tokens, segment_ids, last))
            else:
                out = np.asarray(self._forward(self.params, tokens, segment_ids, last))
            scores += [float(x) for x in out[:len(chunk)]]
        return scores


def reward_model_reward(model, tokenizer: Tokenizer, *, template: str = "auto", batch_size: int = 8,
                        max_length: int | None = None) -> ModelReward:  # fmt: skip
    """A reward function from a reward model (scalar head) and its tokenizer; see the module docstring."""
    return ModelReward(model, tokenizer, template=template, batch_size=batch_size, max_length=max_length)


def reward_model_from_checkpoint(*, checkpoint: str, tokenizer: str, template: str = "auto", batch_size: int = 8,
                                 max_length: int | None = None, ema: bool = False,
                                 step: int | None = None, mesh=None) -> ModelReward:  # fmt: skip
    """`reward_model_reward` for a posttrain-jax RM run checkpoint (`checkpoint`, optionally its `step`
    or `ema` params) and a tokenizer file (`tokenizer`), sharded over `mesh` if given."""
    from posttrain_jax.models.from_config import load_checkpoint_model

    model = load_checkpoint_model(checkpoint, ema=ema, step=step, mesh=mesh)
    return ModelReward(model, load_tokenizer(tokenizer), template=template, batch_size=batch_size,
                       max_length=max_length)
