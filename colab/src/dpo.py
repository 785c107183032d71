# %% [markdown]
# # DPO on the quickstart preferences
#
# Direct Preference Optimization trains a policy straight from pairs *(prompt, chosen, rejected)*, with no
# reward model and no sampling. Its implicit reward of a response is
# $r(x, y) = \beta \, (\log \pi_\theta(y \mid x) - \log \pi_\text{ref}(y \mid x))$, and the loss
# $-\log \sigma(r(x, y_c) - r(x, y_r))$ pushes the chosen response's reward above the rejected one's, relative
# to a frozen **reference** copy of the starting policy. `beta` sets how far the policy may move from it.
#
# This notebook runs the `posttrain-jax dpo` quickstart:
#
# 1. a short **SFT quickstart** first, because DPO starts from an SFT model (here the arithmetic model of
#    `sft_quickstart.ipynb`);
# 2. **preference pairs** for the same task: chosen `7 + 5 = 12`, rejected the same work with a wrong answer;
# 3. **DPO** with Llama 3's recipe: learning rate 1e-5 and an NLL term (0.2 x the chosen responses' negative
#    log-likelihood) that keeps the chosen answers likely;
# 4. the **reward, margin and accuracy curves** and held-out numbers before and after.

# %% include: setup

# %% include: devices

# %% [markdown]
# ## Step 1: the SFT model
#
# The SFT quickstart (see `sft_quickstart.ipynb`). If this runtime trained it already (same `RUNS_DIR`), its
# checkpoint is reused.

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
# ## Step 2: the DPO configuration
#
# `configs/quickstart/dpo.py` is `dpo.default_config()`: it points at `runs/sft-quickstart`, so we point it at
# the model we just trained (its checkpoint, tokenizer and held-out problems). A pair's chosen and rejected
# responses share one row of `seq_len` tokens, so they always land on the same device and micro-batch.
# `train.reference="online"` computes the reference log-probs batch by batch; `"cached"` computes them once
# for the whole data stream (Tülu 3) and gives the same losses.

# %%
from posttrain_jax.trainers import dpo, preference

sft_data = os.path.join(sft_config.output_dir, "data")
config = dpo.default_config()
config.output_dir = os.path.join(RUNS_DIR, "dpo-quickstart-fast" if FAST else "dpo-quickstart")
config.mesh = MESH
config.model.checkpoint = sft_checkpoints
config.tokenizer = os.path.join(sft_data, "tokenizer.model")
config.data.sft_eval_path = os.path.join(sft_data, "eval.jsonl")  # held-out answer exact match as well
config.train.log_every = 5
if FAST:
    config.data.quickstart_num_train = 96  # the quickstart: 4,000 pairs, one pass
    config.data.quickstart_num_eval = 32  # ... and 200 held out
    config.train.steps = 4
    config.train.log_every = 1
print(config)

# %% [markdown]
# A preference pair (the quickstart writes them into `<output_dir>/data`):

# %%
import json

preference.quickstart_data(config)
with open(config.data.sources[0]["path"]) as f:
    pair = json.loads(f.readline())
print(f"prompt:   {pair['prompt']}\nchosen:   {pair['chosen']}\nrejected: {pair['rejected']}")

# %% [markdown]
# ## Step 3: train
#
# The summary holds the held-out metrics before and after: preference accuracy (how often the chosen
# response gets the strictly higher implicit reward: 0% before training, when every reward is 0), the reward
# margin, and the exact match of the SFT task's answers. Watch the last one: DPO widens a margin, which it can
# also do by making both responses less likely; the NLL term (`train.nll_coef`) is there to hold the chosen
# answers up.

# %%
summary = dpo.main(config)

# %%
before, after = summary["eval_before"], summary["eval_after"]
print(f"{'held out':28}{'before':>10}{'after':>10}")
for key, label, fmt in (("rewards_accuracy", "preference accuracy", "{:>10.1%}"),
                        ("rewards_margin", "reward margin", "{:>10.4f}"),
                        ("dpo_loss", "DPO loss", "{:>10.4f}"),
                        ("answers_exact_match", "answer exact match", "{:>10.1%}")):
    print(f"{label:28}" + fmt.format(before[key]) + fmt.format(after[key]))

# %% [markdown]
# ## Step 4: the curves
#
# From `<output_dir>/metrics.jsonl`. Training rows are per-pair means over each global batch (`train/...`);
# evaluation rows (`eval/...`) are over the whole held-out set, before and after training. At the first step
# the policy *is* the reference, so every reward is 0 and the DPO loss is log 2.

# %%
import matplotlib.pyplot as plt

rows = [json.loads(line) for line in open(summary["metrics"])]
train = [r for r in rows if "train/rewards_margin" in r]
evals = [r for r in rows if "eval/rewards_margin" in r]
steps = [r["step"] for r in train]

fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
axes[0].plot(steps, [r["train/rewards_chosen"] for r in train], label="chosen")
axes[0].plot(steps, [r["train/rewards_rejected"] for r in train], label="rejected")
axes[0].set(title="implicit rewards", xlabel="step")
axes[0].legend()
for ax, key, title in ((axes[1], "rewards_margin", "reward margin (chosen - rejected)"),
                       (axes[2], "rewards_accuracy", "preference accuracy"),
                       (axes[3], "dpo_loss", "DPO loss (without the NLL term)")):
    ax.plot(steps, [r[f"train/{key}"] for r in train], label="train")
    ax.plot([r["step"] for r in evals], [r[f"eval/{key}"] for r in evals], "o", label="held out")
    ax.set(title=title, xlabel="step")
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Next
#
# - From a shell: `posttrain-jax sft` then `posttrain-jax dpo`.
# - Other losses: `--config.train.loss_type=ipo | hinge | robust | dpo_norm | simpo` (`dpo_norm` is Tülu 3's
#   length-normalised DPO, `simpo` needs no reference); recipes in `configs/tulu3/dpo_8b.py` and
#   `configs/llama3/dpo.py`.
# - `grpo.ipynb`: reinforcement learning on the same task with a verifiable reward.
