"""The reward-model reward: the same scores as `trainers.rm.score`, one compilation, checkpoint form."""

import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.data import synthetic
from posttrain_jax.models import create_model, preset
from posttrain_jax.rewards import RewardError, Rewards, build_rewards, reward_model_reward
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.trainers import rm
from posttrain_jax.models.config import model_config_to_dict


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(synthetic.train_sentencepiece(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def model():
    model = create_model(preset("tiny-llama", head="scalar"), seed=1)
    # A random head scores ~0.03; scaled up, scores are O(1), so rtol=1e-5 is a tight check.
    model.score[...] = model.score[...] * 100.0
    return model


def _samples(n, seed=0):
    """Prompts (strings and chat messages) and completions of varied lengths."""
    problems = synthetic.generate_problems(n, seed=seed)
    prompts, completions = [], []
    for i, p in enumerate(problems):
        prompts.append(p.question if i % 3 else [{"role": "system", "content": "Answer briefly."},
                                                  {"role": "user", "content": p.question}])
        completions.append(" ".join([p.response(show_work=True)] * (1 + i % 4)))
    return prompts, completions


def test_scores_equal_trainers_rm_score(model, tokenizer):
    prompts, completions = _samples(11)
    expected = rm.score(model, tokenizer, [{"prompt": p, "response": c} for p, c in zip(prompts, completions)],
                        batch_size=4)
    for kwargs in ({"max_length": 160}, {}):  # fixed width; power-of-two buckets
        fn = reward_model_reward(model, tokenizer, batch_size=4, **kwargs)
        got = fn(completions, prompts=prompts, rows=[{}] * len(prompts))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.std(expected) > 0.5  # a random head still tells the samples apart: the check is not vacuous
    llama3 = reward_model_reward(model, tokenizer, template="llama3", batch_size=4, max_length=160)
    np.testing.assert_allclose(
        llama3(completions[:5], prompts=prompts[:5]),
        rm.score(model, tokenizer, [{"prompt": p, "response": c} for p, c in zip(prompts[:5], completions[:5])],
                 template="llama3"), rtol=1e-5, atol=1e-6)


def test_compiles_once_across_batches_of_different_lengths(model, tokenizer):
    fn = reward_model_reward(model, tokenizer, batch_size=4, max_length=160)
    for n, seed in ((3, 1), (9, 2), (4, 3), (1, 4)):
        prompts, completions = _samples(n, seed)
        fn(completions, prompts=prompts, rows=[{}] * n)
    assert fn.num_traces == 1 and fn._forward._cache_size() == 1
    # New weights of the same model: no recompilation, different scores.
    before = fn(["12 + 7 = 19"], prompts=["What is 12 plus 7?"])
    fn.update(create_model(preset("tiny-llama", head="scalar"), seed=2))
    assert fn(["12 + 7 = 19"], prompts=["What is 12 plus 7?"]) != before and fn.num_traces == 1
    buckets = reward_model_reward(model, tokenizer, batch_size=4)
    buckets(["1"], prompts=["What is 1 minus 0?"])
    buckets(["2" * 20], prompts=["What is 1 plus 1?"])  # same bucket of 32 or 64
    assert buckets.width([10]) == 32 and buckets.width([33]) == 64 and buckets.width([10_000]) == 512
    assert buckets.num_traces <= 2


def test_too_long_samples_and_lm_heads_are_errors(model, tokenizer):
    rewards = Rewards([("rm", reward_model_reward(model, tokenizer, max_length=40), 1.0)])
    with pytest.raises(RewardError, match=r"'rm' failed on sample 1 of 2: ValueError: .* more than max_length = 40"):
        rewards(["5", "5 " * 40], prompts=["What is 2 plus 3?"] * 2, rows=[{}, {}])
    with pytest.raises(ValueError, match="scalar head"):
        reward_model_reward(create_model(preset("tiny-llama")), tokenizer)
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 512\]"):
        reward_model_reward(model, tokenizer, max_length=1000)


def test_checkpoint_form_via_build_rewards(tmp_path, model, tokenizer, tokenizer_path):
    with RunCheckpointer(tmp_path / "ckpt", async_save=False) as checkpointer:
        metadata = {MODEL_CONFIG_KEY: model_config_to_dict(model.config)}
        checkpointer.save(7, {"params": nnx.state(model)}, metadata=metadata, force=True)
    rewards = build_rewards([{"name": "reward_model", "checkpoint": str(tmp_path / "ckpt"),
                              "tokenizer": tokenizer_path, "max_length": 128, "batch_size": 2}])
    prompts, completions = _samples(3)
    out = rewards(completions, prompts=prompts, rows=[{}] * 3)
    expected = reward_model_reward(model, tokenizer, max_length=128)(completions, prompts=prompts)
    np.testing.assert_allclose(out.scores["reward_model"], expected, rtol=1e-6, atol=1e-6)
    assert "rewards/reward_model/accuracy" not in out.metrics()


def test_sharded_model_on_a_mesh_scores_the_same(model, tokenizer):
    import jax

    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.models import model_shardings

    prompts, completions = _samples(6)
    expected = reward_model_reward(model, tokenizer, batch_size=8, max_length=128)(completions, prompts=prompts)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, params = nnx.split(model)
    with jax.set_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(params, model_shardings(model.config, mesh)))
        got = reward_model_reward(sharded, tokenizer, batch_size=8, max_length=128)(completions, prompts=prompts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
