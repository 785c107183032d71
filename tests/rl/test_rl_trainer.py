"""`posttrain-jax rl`: a pulse per algorithm on 8 fake devices, PPO's critic and exact resume,
off-policy rollouts with truncated IS, the curriculum, configs and errors."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.config import apply_overrides, load_config
from posttrain_jax.data import synthetic
from posttrain_jax.models import create_model, preset
from posttrain_jax.rl.curriculum import CurriculumIterator
from posttrain_jax.rl.rollout import RolloutQueue
from posttrain_jax.rl.settings import ALGORITHMS, resolve, rl_config
from posttrain_jax.trainers import rl
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.data.prompts import PromptIterator

MESH = "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    for name, n, seed in (("train", 64, 5), ("eval", 8, 6)):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in synthetic.generate_problems(n, seed=seed, max_operand=9):
                f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    # A reward-model run (scalar head) to initialise PPO's critic from.
    rm = create_model(preset("tiny-llama", head="scalar"), seed=1)
    with RunCheckpointer(d / "rm", async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(rm)}, metadata={MODEL_CONFIG_KEY: model_config_to_dict(rm.config)},
                          force=True)
    return d, str(synthetic.train_sentencepiece(d / "tok", synthetic.corpus(seed=0)))


def _config(out, task, algorithm, *extra):
    d, tokenizer = task
    return apply_overrides(rl.default_config(), [
        f"--config.output_dir={out}", "--config.data.quickstart_task=False", f"--config.tokenizer={tokenizer}",
        f"--config.data.path={d}/train.jsonl", "--config.data.eval_path=", "--config.model.checkpoint=",
        "--config.model.preset=tiny-llama",
        f"--config.rl.algorithm={algorithm}", "--config.rl.prompts_per_step=4", "--config.rl.group_size=2",
        "--config.sampling.max_new_tokens=5", "--config.train.log_every=1", "--config.optim.learning_rate=1e-3",
        f"--config.critic.checkpoint={d}/rm", "--config.critic.learning_rate=1e-3", MESH, *extra])


def _check_pulse(summary, algorithm, sampler_programs=1):
    assert summary["final_step"] == 2 and summary["algorithm"] == algorithm
    compilations = summary["compilations"]
    assert compilations["train_step"] == 1 and compilations["score"] == 1
    assert compilations["sampler"] == sampler_programs
    last = summary["history"][-1]
    keys = ["loss", "grad_norm", "reward_mean", "ratio_mean", "clip_fraction", "rollout_logp_abs_diff",
            "rollout_kl", "advantages_abs_mean", "entropy"]
    if ALGORITHMS[algorithm]["kl_coef"]:
        keys += ["kl", "reward_kl"] if ALGORITHMS[algorithm]["kl_in"] == "reward" else ["kl"]
    if algorithm == "ppo":
        keys += ["value_loss", "value_clip_fraction", "explained_variance", "values_mean", "returns_mean",
                 "critic_grad_norm"]
        assert compilations["critic_step"] == 1
        assert summary["critic_params"] is not None
    for key in keys:
        assert np.isfinite(last[f"train/{key}"]), key
    # On-policy: the sampler and the training forward agree up to float32 numerics.
    assert last["train/rollout_logp_abs_diff"] < 1e-4 and abs(last["train/rollout_kl"]) < 1e-6


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp", "gspo"])  # ppo: the resume test below
def test_pulse_on_eight_devices(tmp_path, task, algorithm):
    # rloo: the scoring forwards in 2 row chunks; gspo: the reward-variance curriculum (one pool of 2 steps).
    extra = {"rloo": ["--config.rl.forward_chunks=2"],
             "gspo": ["--config.rl.curriculum=reward_variance", "--config.rl.curriculum_pool_steps=2"]}
    summary = rl.main(_config(tmp_path, task, algorithm, "--config.train.steps=2", *extra.get(algorithm, [])))
    _check_pulse(summary, algorithm, sampler_programs=2 if algorithm == "gspo" else 1)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ppo_pulse_resume_is_exact_and_checkpoints_hold_the_critic(tmp_path, task, lora):
    """A 2-step PPO run, and a run resumed from its step-1 checkpoint (prompt position included) in a fresh
    directory, repeat step 2 exactly. LoRA: policy and critic train adapters (and the critic's scalar head)."""
    import shutil

    extra = ["--config.rl.num_epochs=2", "--config.rl.num_minibatches=2", "--config.train.checkpoint_every=1"]
    if lora:
        extra += ["--config.lora.enabled=True", "--config.lora.rank=4", "--config.lora.alpha=8.0",
                  "--config.optim.learning_rate=1e-2"]
    straight = rl.main(_config(tmp_path / "a", task, "ppo", "--config.train.steps=2", *extra))
    _check_pulse(straight, "ppo")
    history = straight["history"]
    shutil.copytree(tmp_path / "a" / "checkpoints" / "1", tmp_path / "b" / "checkpoints" / "1")
    resumed = rl.main(_config(tmp_path / "b", task, "ppo", "--config.train.steps=2", *extra), resume=True)
    assert [r["train/loss"] for r in resumed["history"]] == [history[1]["train/loss"]]
    assert resumed["history"][0]["train/value_loss"] == history[1]["train/value_loss"]
    for key in ("params", "critic_params"):
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from posttrain_jax.checkpointing import load_params, resolve_step_dir
    from posttrain_jax.checkpointing.trees import STATE, stored_leaves
    if not lora:
        # The policy's params sit where `posttrain-jax grpo` always put them: export/sample/model.checkpoint read them.
        params = load_params(tmp_path / "b" / "checkpoints")
        assert "critic" not in params and "embed" in params
        return
    # Fresh adapters: the policy is the base (the KL reference) at the first scoring pass, not after an update.
    assert abs(history[0]["train/reward_kl"]) < 1e-7 < abs(history[1]["train/reward_kl"])
    # Every array of the saved run state (params and optimizer moments of policy and critic) is an adapter,
    # or the critic's scalar head; the scalars are step counts and RNG keys.
    leaves = stored_leaves(resolve_step_dir(tmp_path / "b" / "checkpoints") / STATE).values()
    arrays = [leaf.path for leaf in leaves if leaf.shape and leaf.path[-1] != "rng"]
    assert any(p[0] == "opt_state" for p in arrays) and any(p[:2] == ("critic", "opt_state") for p in arrays)
    assert any(p[0] == "critic" and "score" in p for p in arrays)
    for path in arrays:
        assert any("_lora_" in k for k in path) or (path[0] == "critic" and "score" in path), path


def test_ppo_critic_warmup_holds_the_policy_still(tmp_path, task):
    """critic.critic_only_steps=1 (verl's critic_warmup): step 1 trains only the critic, so step 2's policy is still
    the reference (KL ~ 0) and only then does the policy update."""
    summary = rl.main(_config(tmp_path, task, "ppo", "--config.train.steps=2", "--config.critic.critic_only_steps=1"))
    first, second = summary["history"]
    assert first["train/policy_updated"] == 0.0 and "train/loss" not in first and first["train/value_loss"] > 0
    assert second["train/policy_updated"] == 1.0 and np.isfinite(second["train/loss"])
    assert abs(second["train/reward_kl"]) < 1e-6  # the policy did not move during the warmup
    assert summary["compilations"]["train_step"] == 1 and summary["compilations"]["critic_step"] == 1
    with pytest.raises(ValueError, match=r"critic.critic_only_steps=2 must be in \[0, 2\)"):
        rl.main(_config(tmp_path / "bad", task, "ppo", "--config.train.steps=2", "--config.critic.critic_only_steps=2"))
    with pytest.raises(ValueError, match="rl.algorithm=grpo .* has no critic"):
        rl.main(_config(tmp_path / "bad", task, "grpo", "--config.train.steps=2", "--config.critic.critic_only_steps=1"))


def test_staleness_one_trains_on_the_previous_params_with_tis(tmp_path, task):
    summary = rl.main(_config(tmp_path, task, "ppo", "--config.train.steps=2", "--config.rl.max_staleness=1",
                              "--config.rl.tis_cap=2.0", "--config.optim.learning_rate=3e-3"))
    history = summary["history"]
    # Step 1 trains on a rollout of its own params; step 2 on one sampled before step 1's update.
    assert history[0]["train/rollout_logp_abs_diff"] < 1e-4
    for row in history[1:]:
        assert row["train/rollout_logp_abs_diff"] > 1e-3 and row["train/rollout_kl"] > 0
        assert 0 < row["train/is_weight_mean"] <= 2.0


def test_rollout_queue_order_and_staleness():
    produced = []

    def produce(step, params):
        produced.append((step, params))
        return f"rollout {step} from {params}"

    queue = RolloutQueue(produce, max_staleness=1, last_step=3)
    assert queue.next(1, "p0") == "rollout 1 from p0" and queue.pending == 1
    assert queue.next(2, "p1") == "rollout 2 from p0"  # one update old
    assert queue.next(3, "p2") == "rollout 3 from p1" and queue.pending == 0
    assert produced == [(1, "p0"), (2, "p0"), (3, "p1")]
    on_policy = RolloutQueue(produce, max_staleness=0, last_step=2)
    assert on_policy.next(1, "q0") == "rollout 1 from q0" and on_policy.pending == 0


def test_curriculum_orders_each_pool_by_reward_variance():
    prompts = list(range(8))
    inner = PromptIterator(prompts, 2, seed=0, process_index=0, process_count=1)
    variance = {p: float(p % 4) for p in prompts}  # stand-in scores: the prompt's reward variance
    curriculum = CurriculumIterator(inner, 2, score=lambda rows: [variance[r] for r in rows])
    first_pool = [next(curriculum), next(curriculum)]
    flat = [p for batch in first_pool for p in batch]
    assert sorted(flat) == sorted(np.random.default_rng([0, 0]).permutation(8)[:4].tolist())
    assert [variance[p] for p in flat] == sorted((variance[p] for p in flat), reverse=True)
    assert curriculum.get_state() == {"step": 2}


def test_settings_resolve_per_algorithm_and_fail_clearly():
    assert resolve(rl_config(algorithm="ppo")).uses_critic
    gspo = resolve(rl_config(algorithm="gspo"))
    assert (gspo.policy_loss, gspo.epsilon_low, gspo.loss_aggregation) == ("sequence", 3e-4, "sequence_mean")
    assert resolve(rl_config(algorithm="rloo", kl_coef=0.0)).kl_coef == 0.0  # an explicit value wins
    with pytest.raises(ValueError, match="rl.algorithm='dpo'"):
        resolve(rl_config(algorithm="dpo"))
    with pytest.raises(ValueError, match="rl.loss_aggregation='sequence_mean'"):
        resolve(rl_config(algorithm="gspo", loss_aggregation="token_mean"))
    with pytest.raises(ValueError, match="rl.clip_ratio_c=0.5"):
        resolve(rl_config(clip_ratio_c=0.5))


@pytest.mark.parametrize("name", ["ppo", "grpo", "rloo", "reinforce_pp", "gspo"])
def test_quickstart_configs_load(name):
    config = load_config(f"configs/rl/{name}.py")
    assert set(config.keys()) == set(rl.default_config().keys())
    assert resolve(config.rl).algorithm == name


def test_tulu3_rlvr_config():
    config = load_config("configs/tulu3/rlvr_8b.py")
    s = resolve(config.rl)
    assert s.algorithm == "ppo" and s.uses_critic and s.kl_in_reward == 0.05 and s.lam == 0.95
    assert config.rewards[0]["correct"] == 10.0 and config.critic.checkpoint


def test_critic_from_an_hf_sequence_classification_directory(tmp_path):
    """The critic's per-token values are the HF reward model's score head on every position."""
    import ml_collections
    import torch

    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.rl.critic import critic_model_section
    from posttrain_jax.rl.objectives import token_values
    from posttrain_jax.sharding import DEFAULT_RULES, logical_rules
    from posttrain_jax.models.from_config import build_model, model_config
    from tests.models.hf_fixtures import make_hf_model

    hf = make_hf_model("llama", tmp_path / "rm", head="scalar", seed=2)
    critic = ml_collections.ConfigDict(dict(checkpoint="", hf_path=str(tmp_path / "rm")))
    section = critic_model_section(model_config(), critic)
    assert section.hf_path == str(tmp_path / "rm") and not section.checkpoint
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = build_model(section, mesh, DEFAULT_RULES, seed=0, head="scalar")
    tokens = np.random.default_rng(0).integers(1, 256, (4, 12)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (4, 12)),
             "segment_ids": np.ones((4, 12), np.int32)}
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        ours = np.asarray(jax.jit(token_values)(model, batch))
    with torch.no_grad():
        hidden = hf.model(torch.as_tensor(tokens, dtype=torch.long)).last_hidden_state
        theirs = hf.score(hidden)[..., 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # the HF parity tolerance (fp32)
    with pytest.raises(ValueError, match="critic.checkpoint and critic.hf_path are both set"):
        critic_model_section(model_config(), ml_collections.ConfigDict(dict(checkpoint="a", hf_path="b")))
