"""The jitted sampler against the model's own full forward (no cache), fp32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.losses.logprobs import token_logprobs
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.sampling import Sampler, SamplingParams, truncate_logits

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def _model(name, mesh=None):
    model = create_model(preset(name), seed=1, mesh=mesh)
    graphdef, state = nnx.split(model)
    return model, graphdef, state


WIDTH = 32  # every reference forward runs at this one width: causal, so padding after a token never matters


@functools.cache
def _forward():
    return jax.jit(lambda model, tokens, segment_ids: model(tokens, None, segment_ids))


def _full_logits(model, seq):
    """Logits of a full (no cache) forward over `seq`, right-padded to WIDTH: [len(seq), vocab]."""
    tokens = np.zeros((1, WIDTH), np.int32)
    tokens[0, :len(seq)] = seq
    return _forward()(model, jnp.asarray(tokens), jnp.asarray((np.arange(WIDTH) < len(seq))[None]).astype(jnp.int32))[0, :len(seq)]


def _greedy_reference(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(_full_logits(model, seq)[-1])))
    return seq[len(prompt):]


def _recomputed_logprobs(model, prompt, completion, temperature=1.0):
    """A training-style forward over prompt + completion: log p of each completion token."""
    seq = list(prompt) + [int(t) for t in completion]
    logits = _full_logits(model, seq[:-1]) / temperature
    return np.asarray(token_logprobs(logits, jnp.asarray(seq[1:])))[len(prompt) - 1:]


@pytest.mark.parametrize("decode_layers", ["scan", "unrolled"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_greedy_equals_stepwise_argmax_of_full_forward(name, decode_layers):
    # tiny-gemma3 has a 4-token sliding window on two of its three layers: 7 + 12 tokens run far past it.
    model, graphdef, state = _model(name)
    params = SamplingParams(max_new_tokens=12, greedy=True)
    sampler = Sampler(graphdef, model.config, decode_layers=decode_layers)
    out = sampler(state, PROMPTS, params)
    assert sampler._cache.per_layer == (decode_layers == "unrolled")
    for i, prompt in enumerate(PROMPTS):
        assert out.tokens[i].tolist() == _greedy_reference(model, prompt, 12), f"prompt {i}"
        np.testing.assert_allclose(out.logprobs[i], _recomputed_logprobs(model, prompt, out.tokens[i]),
                                   rtol=0, atol=2e-5)
    assert out.lengths.tolist() == [12, 12, 12] and not out.stopped.any()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3"])
def test_sampled_logprobs_equal_training_forward(name):
    model, graphdef, state = _model(name)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.95, num_samples=3)
    out = Sampler(graphdef, model.config)(state, PROMPTS, params, seed=3)
    assert out.tokens.shape == (9, 10)
    worst = 0.0
    for row in range(9):
        prompt = PROMPTS[row // 3]
        ref = _recomputed_logprobs(model, prompt, out.tokens[row], temperature=0.7)
        worst = max(worst, float(np.max(np.abs(out.logprobs[row] - ref))))
    assert worst < 2e-5, worst
    # Three samples of one prompt differ (they are not copies of one draw).
    assert len({tuple(r) for r in out.tokens[:3].tolist()}) > 1


def test_padding_side_and_amount_do_not_change_outputs():
    model, graphdef, state = _model("tiny-llama")
    sampler = Sampler(graphdef, model.config)
    params = SamplingParams(max_new_tokens=6, greedy=True)
    width = 16
    left = np.zeros((3, width), np.int32)
    right = np.zeros((3, width), np.int32)
    for i, p in enumerate(PROMPTS):
        left[i, width - len(p):] = p
        right[i, :len(p)] = p
    outs = [sampler.generate_padded(state, t, (t != 0).astype(np.int32), params, jax.random.key(0))
            for t in (left, right)]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-6)
    compact = sampler(state, PROMPTS, params)  # bucket 16 again, the same program
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), compact.tokens)
    assert sampler.compilations() == 1


def test_stop_tokens_end_each_row_and_pad_after():
    model, graphdef, state = _model("tiny-llama")
    free = Sampler(graphdef, model.config)(state, PROMPTS, SamplingParams(max_new_tokens=8, greedy=True))
    stop = int(free.tokens[0, 2])  # row 0 stops at its third token, other rows when they meet it
    params = SamplingParams(max_new_tokens=8, greedy=True, stop_tokens=(stop,), pad_token=0)
    out = Sampler(graphdef, model.config)(state, PROMPTS, params)
    for row in range(3):
        hits = [i for i, t in enumerate(free.tokens[row].tolist()) if t == stop]
        length = hits[0] + 1 if hits else 8
        assert out.lengths[row] == length and bool(out.stopped[row]) == bool(hits)
        assert out.tokens[row, :length].tolist() == free.tokens[row, :length].tolist()
        assert (out.tokens[row, length:] == 0).all() and (out.logprobs[row, length:] == 0).all()


@pytest.mark.parametrize("decode_layers", ["scan", "unrolled"])  # scan: the TPU/GPU default; unrolled: CPU's
def test_sharded_sampling_matches_single_device_and_compiles_once(decode_layers):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, graphdef, state = _model("tiny-llama", mesh=mesh)
    params = SamplingParams(max_new_tokens=6, greedy=True, num_samples=2)
    sampler = Sampler(graphdef, model.config, mesh=mesh, decode_layers=decode_layers)
    sharded = sampler(state, PROMPTS, params)  # 3 prompts x 2 rows are padded to 4 x 2 for the 4 batch shards
    again = sampler(state, PROMPTS[::-1], params)
    assert sampler.compilations() == 1
    single_state = jax.device_put(state, jax.devices()[0])
    single = Sampler(graphdef, model.config)(single_state, PROMPTS, params)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=2e-5)
    np.testing.assert_array_equal(again.tokens[:2], single.tokens[4:])


def test_truncation_keeps_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    assert np.isfinite(truncate_logits(logits, 2, 1.0)).sum(axis=1).tolist() == [2, 2]
    # top_p 0.7: 0.5 + 0.25 reach it -> two tokens; the second row keeps 0.4 + 0.3.
    kept = np.isfinite(truncate_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert np.isfinite(truncate_logits(logits, 0, 1e-6)).sum(axis=1).tolist() == [1, 1]


def test_bad_requests_fail_clearly():
    model, graphdef, state = _model("tiny-llama")
    sampler = Sampler(graphdef, model.config, max_prompt_length=4)
    with pytest.raises(ValueError, match="prompt 0 has 7 tokens, more than max_prompt_length=4"):
        sampler(state, PROMPTS, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler(state, [[1], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="decode_layers='unroll' is not one of auto, scan, unrolled"):
        Sampler(graphdef, model.config, decode_layers="unroll")
