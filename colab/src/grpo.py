# %% [markdown]
# # GRPO with a verifiable reward
#
# Group Relative Policy Optimization (DeepSeekMath, DeepSeek-R1, Qwen2.5) is reinforcement learning without a
# value model. For each prompt the current policy samples a **group** of completions; a reward function scores
# them; each completion's **advantage** is its reward minus the group's mean, divided by the group's std; and
# a PPO-style clipped objective raises the log-probability of the better-than-average completions. Rewards
# here are **verifiable**: a completion earns 1 when its last number is the right answer, else 0 (Tülu 3's
# RLVR), so there is no reward model to fool.
#
# This notebook runs the `posttrain-jax grpo` quickstart:
#
# 1. a short **SFT quickstart** first: RL needs a policy that already answers in the right form, sometimes
#    correctly;
# 2. **GRPO** on arithmetic word problems with larger operands (up to 29) than SFT saw (up to 19), sampled
#    on-policy by the jitted sampler on the same mesh and parameters as training;
# 3. the **reward, accuracy, KL and completion-length curves**, held-out greedy accuracy before and after,
#    and one sampled group with its rewards and advantages.

# %% include: setup

# %% include: devices

# %% [markdown]
# ## Step 1: the SFT model
#
# The SFT quickstart (see `sft_quickstart.ipynb`); reused if this runtime trained it already.

# %%
from posttrain_jax.trainers import sft

sft_config = sft.default_config()
sft_config.output_dir = os.path.join(RUNS_DIR, "sft-quickstart-fast" if FAST else "sft-quickstart")
sft_config.mesh = MESH
if FAST:
    sft_config.data.quickstart_num_train = 400
    sft_config.data.quickstart_num_eval = 32
    sft_config.train.steps = 8
sft_checkpoints = os.path.join(sft_config.output_dir, "checkpoints")
if os.path.isdir(sft_checkpoints) and os.listdir(sft_checkpoints):
    print(f"reusing the SFT model in {sft_checkpoints}")
else:
    sft_summary = sft.main(sft_config)

# %% [markdown]
# ## Step 2: the GRPO configuration
#
# `grpo.default_config()` is the quickstart; it points at `runs/sft-quickstart`, so we point it at the model we
# just trained. Per step: `grpo.prompts_per_step` prompts x `grpo.group_size` completions of at most
# `sampling.max_new_tokens` tokens; `rewards` lists the reward functions and their weights. One change from the
# command's defaults: `grpo.beta = 0.04` (DeepSeekMath's value) adds a KL penalty to a frozen reference, so we
# can watch how far the policy moves. The default, 0, keeps no reference (DAPO and Dr. GRPO drop it); the same
# run from a shell is `posttrain-jax grpo --config.grpo.beta=0.04`.

# %%
from posttrain_jax.trainers import grpo

sft_data = os.path.join(sft_config.output_dir, "data")
config = grpo.default_config()
config.output_dir = os.path.join(RUNS_DIR, "grpo-quickstart-fast" if FAST else "grpo-quickstart")
config.mesh = MESH
config.model.checkpoint = sft_checkpoints
config.tokenizer = os.path.join(sft_data, "tokenizer.model")
config.grpo.beta = 0.04
if FAST:
    config.data.quickstart_num_train = 64  # the quickstart: 4,000 prompts (60 steps use 960 of them)
    config.data.quickstart_num_eval = 16  # ... and 200 held out
    config.data.eval_batch = 16
    config.grpo.prompts_per_step = 4
    config.grpo.group_size = 4
    config.train.steps = 3
    config.train.log_every = 1
print(config)

# %% [markdown]
# ## Step 3: train
#
# Each step samples, scores, computes group advantages and takes one optimizer step; held-out accuracy is
# measured with greedy decoding before and after.

# %%
summary = grpo.main(config)

# %%
before, after = summary["eval_before"], summary["eval_after"]
print(f"held-out greedy accuracy ({int(after['prompts'])} problems): {before['accuracy']:.1%} before -> "
      f"{after['accuracy']:.1%} after")
for key in after:  # every held-out metric the trainer reports
    print(f"  {key:>32}: {before.get(key, float('nan')):.4g} -> {after[key]:.4g}")
print("compilations:", summary["compilations"])

# %% [markdown]
# ## Step 4: the curves
#
# From `<output_dir>/metrics.jsonl`: the mean reward and accuracy of each step's sampled completions, the KL
# to the reference (per token, k3 estimator) and the mean completion length.

# %%
import json

import matplotlib.pyplot as plt

rows = [json.loads(line) for line in open(summary["metrics"])]
train = [r for r in rows if "train/reward_mean" in r]
evals = [r for r in rows if "eval/accuracy" in r]
steps = [r["step"] for r in train]

fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
axes[0].plot(steps, [r["train/reward_mean"] for r in train])
axes[0].set(title="mean reward of the samples", xlabel="step")
axes[1].plot(steps, [r.get("train/accuracy", float("nan")) for r in train], label="samples")
axes[1].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o", label="held out (greedy)")
axes[1].set(title="accuracy", xlabel="step")
axes[1].legend()
axes[2].plot(steps, [r.get("train/kl", float("nan")) for r in train])
axes[2].set(title="KL to the reference (per token)", xlabel="step")
axes[3].plot(steps, [r["train/completion_length_mean"] for r in train])
axes[3].set(title="mean completion length (tokens)", xlabel="step")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Groups, scored
#
# What a training step sees, here for held-out prompts and the trained policy: `grpo.group_size` completions
# per prompt, sampled exactly as in training, their rewards and their group-relative advantages. A group whose
# completions are all right (or all wrong) has advantage 0 everywhere and teaches nothing.

# %%
import jax.numpy as jnp
from flax import nnx

from posttrain_jax.losses.grpo import group_advantages
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.sampling.text import completion_text, stop_tokens_for

tokenizer = load_tokenizer(config.tokenizer)
model_config = nnx.merge(summary["graphdef"], summary["params"]).config
mesh, rules = mesh_and_rules(config)
g, s = config.grpo, config.sampling
with open(config.data.eval_path) as f:
    rows = [json.loads(line) for line, _ in zip(f, range(g.prompts_per_step))]
messages = [[{"role": "user", "content": row["prompt"]}] for row in rows]
prompts = [render_chat(tokenizer, m, template=config.chat_template, add_generation_prompt=True).ids for m in messages]
params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        stop_tokens=stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens),
                        pad_token=model_config.pad_token_id, num_samples=g.group_size)
sampler = Sampler(summary["graphdef"], model_config, mesh=mesh, rules=rules)
out = sampler(summary["params"], prompts, params, seed=1, prompt_bucket=config.data.max_prompt_length)
texts = [completion_text(tokenizer, out.tokens[i], int(out.lengths[i]), bool(out.stopped[i]))
         for i in range(len(out.lengths))]
repeat = lambda items: [item for item in items for _ in range(g.group_size)]  # noqa: E731
scored = build_rewards([dict(r) for r in config.rewards])(texts, prompts=repeat(messages), rows=repeat(rows))
advantages = group_advantages(jnp.asarray(scored.total), g.group_size, scale=g.advantage_scale,
                              std_ddof=g.std_ddof, eps=g.advantage_eps).advantages
spread = scored.total.reshape(-1, g.group_size).std(axis=1)
for i in sorted(range(len(rows)), key=lambda i: -spread[i])[:2]:  # two groups, mixed ones (they teach) first
    print(f"{rows[i]['prompt']}  (answer {rows[i]['answer']})")
    for j in range(i * g.group_size, (i + 1) * g.group_size):
        print(f"  reward {scored.total[j]:.0f}  advantage {float(advantages[j]):+.2f}  {texts[j]!r}")

# %% [markdown]
# ## Next
#
# - From a shell: `posttrain-jax sft` then `posttrain-jax grpo`.
# - Other objectives: `--config.grpo.loss_aggregation=sequence_mean` (GRPO's per-sequence mean) or `constant`
#   with `--config.grpo.advantage_scale=none` (Dr. GRPO); `--config.grpo.epsilon_high=0.28` (DAPO's
#   clip-higher); several updates per batch with `grpo.num_iterations` / `grpo.num_minibatches`.
# - Rewards: `math`, `exact_match`, `format` and `reward_model` terms with weights in `config.rewards`.
