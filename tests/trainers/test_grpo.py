"""GRPO trainer: rollout layout vs the sampler, an 8-device pulse, exact resume, configs."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.config import apply_overrides, load_config
from posttrain_jax.data import synthetic
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.trainers import grpo
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.rl.objectives import sequence_token_logps
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.rl.rollout import sample_and_score, training_batch
from posttrain_jax.sampling.text import stop_tokens_for

MESH = "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    for name, n, seed in (("train", 64, 5), ("eval", 16, 6)):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in synthetic.generate_problems(n, seed=seed, max_operand=9):
                f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    # A random reward model (scalar head), saved as a run checkpoint, for the model-based reward.
    rm = create_model(preset("quickstart", head="scalar"), seed=1)
    with RunCheckpointer(d / "rm", async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(rm)}, metadata={MODEL_CONFIG_KEY: model_config_to_dict(rm.config)},
                          force=True)
    return d, str(synthetic.train_sentencepiece(d / "tok", synthetic.corpus(seed=0)))


def _config(out, task, *extra):
    d, tokenizer = task
    return apply_overrides(grpo.default_config(), [
        f"--config.output_dir={out}", "--config.data.quickstart_task=False", f"--config.tokenizer={tokenizer}",
        f"--config.data.path={d}/train.jsonl", f"--config.data.eval_path={d}/eval.jsonl", "--config.data.eval_batch=8",
        "--config.data.eval_samples=0",
        "--config.model.checkpoint=", "--config.grpo.prompts_per_step=4", "--config.grpo.group_size=4",
        "--config.sampling.max_new_tokens=6", "--config.train.log_every=1", "--config.optim.learning_rate=1e-3",
        MESH, *extra])


def test_training_forward_reproduces_the_sampler_logprobs(task):
    """The training batch lays prompt + completion out exactly as the sampler decoded them."""
    d, tokenizer_path = task
    tokenizer = load_tokenizer(tokenizer_path)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = create_model(preset("quickstart"), mesh=mesh, seed=3)
    graphdef, state = nnx.split(model)
    prompts, _ = load_prompts(f"{d}/train.jsonl", tokenizer, template="chatml", max_prompt_length=48)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, num_samples=2, pad_token=3,
                            stop_tokens=stop_tokens_for(tokenizer, "chatml"))
    rewards = build_rewards([{"name": "math", "extract": "last_number", "correct": 1.0}])
    sampler = Sampler(graphdef, model.config, mesh=mesh)
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        rollout = sample_and_score(sampler, state, prompts[:4], params, jax.random.key(1), tokenizer=tokenizer,
                                   rewards=rewards, max_prompt_length=48)
        host = training_batch(rollout, pad=3)
        logps = np.asarray(jax.jit(lambda s, b: sequence_token_logps(nnx.merge(graphdef, s), b, temperature=0.8))(
            state, shard_batch(host, mesh)))
    assert rollout.tokens.shape == (8, 8) and len(rollout.texts) == 8
    mask = host["loss_mask"].astype(bool)
    assert mask.sum() == rollout.lengths.sum()
    new = np.arange(8)[None, :] < rollout.lengths[:, None]
    np.testing.assert_allclose(logps[mask], rollout.logprobs[new], atol=2e-5, rtol=0)
    assert rollout.rewards.total.shape == (8,)


def test_grpo_pulse_on_eight_devices(tmp_path, task):
    # Two passes over the rollout (old log-probs recomputed), a KL to the reference, clip-higher, and a
    # reward model next to the verifier (it scores on its own devices, inside the trainer's mesh).
    rewards = [{"name": "math", "extract": "last_number", "correct": 1.0},
               {"name": "reward_model", "checkpoint": str(task[0] / "rm"), "tokenizer": task[1], "weight": 0.1,
                "max_length": 128}]
    config = _config(tmp_path, task, "--config.train.steps=2", "--config.grpo.beta=0.04",
                                "--config.grpo.num_iterations=2", "--config.grpo.epsilon_high=0.28",
                                "--config.grpo.loss_aggregation=sequence_mean")
    config.rewards = rewards
    summary = grpo.main(config)
    assert summary["final_step"] == 2 and summary["compilations"] == {"train_step": 1, "sampler": 2, "score": 1}
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2
    for key in ("reward_mean", "reward_std", "accuracy", "rewards/math/mean", "rewards/reward_model/std", "kl", "clip_fraction", "entropy",
                "completion_length_mean", "rollout_tokens_per_s", "train_tokens_per_s", "grad_norm"):
        assert np.isfinite(train[-1][f"train/{key}"]), key
    assert train[0]["train/kl"] >= 0 and train[-1]["train/learning_rate"] > 0
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]


def test_on_policy_ratio_is_one_and_resume_is_exact(tmp_path, task):
    straight = grpo.main(_config(tmp_path / "a", task, "--config.train.steps=2"))
    history = straight["history"]
    assert all(r["train/ratio_mean"] == 1.0 and r["train/clip_fraction"] == 0.0 for r in history)
    # The default schedule is constant, so a 1-step run is the first step of the 2-step one.
    grpo.main(_config(tmp_path / "b", task, "--config.train.steps=1"))
    resumed = grpo.main(_config(tmp_path / "b", task, "--config.train.steps=2"), resume=True)
    assert [r["train/loss"] for r in resumed["history"]] == [history[1]["train/loss"]]
    assert resumed["history"][0]["train/reward_mean"] == history[1]["train/reward_mean"]
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["deepseekmath", "qwen25", "tulu31"])
def test_recipe_configs_load(name):
    config = load_config(f"configs/grpo/{name}.py")
    assert set(config.keys()) == set(grpo.default_config().keys())
    grpo._check(config)


def test_bad_config_fails_clearly(tmp_path, task):
    with pytest.raises(ValueError, match="group_size=1"):
        grpo.main(_config(tmp_path, task, "--config.grpo.group_size=1"))
    with pytest.raises(ValueError, match="loss_aggregation='bnpo'"):
        grpo.main(_config(tmp_path, task, "--config.grpo.loss_aggregation=bnpo"))
