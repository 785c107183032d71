# %% [markdown]
# # SFT quickstart: teach a 1M-parameter model arithmetic word problems
#
# This notebook runs the `posttrain-jax sft` quickstart step by step:
#
# 1. write a **synthetic task**: word problems such as *"Mia has 7 apples and buys 5 more..."* with answers
#    written as `7 + 5 = 12`, plus a held-out set drawn with another seed;
# 2. train a **SentencePiece tokenizer** on that text (nothing is downloaded);
# 3. train a ~1M-parameter Llama-architecture model with **supervised fine-tuning**: the loss covers only the
#    assistant's tokens, sequences are packed into rows of 64 tokens, and the whole train step (forward,
#    backward, optimizer) is one `jax.jit` program sharded over the device mesh;
# 4. measure **held-out exact match** before and after, plot the loss from the run's metrics file and
#    **sample answers** with the jitted sampler.
#
# It runs on a CPU runtime (a few minutes) or a TPU runtime (v5e-1 / v6e-1) with the same code.

# %% include: setup

# %% include: devices

# %% [markdown]
# ## The configuration
#
# `sft.default_config()` is the quickstart. Every field can be changed here exactly as
# `--config.key=value` changes it on the command line (`posttrain-jax sft --config.train.steps=100`).
# `FAST` only shrinks the data and the number of steps.

# %%
from posttrain_jax.trainers import sft

config = sft.default_config()
config.output_dir = os.path.join(RUNS_DIR, "sft-quickstart-fast" if FAST else "sft-quickstart")
config.mesh = MESH
if FAST:
    config.data.quickstart_num_train = 400  # the real quickstart: 40,000 problems, one pass
    config.data.quickstart_num_eval = 32  # ... and 400 held out
    config.train.steps = 8
    config.train.log_every = 1
print(config)

# %% [markdown]
# What the model sees: a user question and the assistant's answer. With `show_work` the answer repeats the
# operands (`7 + 5 = 12`), so the model first copies, then adds: a much easier function to learn in a few
# minutes than producing the sum directly.

# %%
from posttrain_jax.data import synthetic

for problem in synthetic.generate_problems(3, seed=config.seed, max_operand=config.data.quickstart_max_operand):
    print(f"user:      {problem.question}\nassistant: {problem.response(show_work=True)}\n")

# %% [markdown]
# ## Train
#
# `sft.main` writes the task and tokenizer into `<output_dir>/data`, builds the model straight into its
# shardings, evaluates, trains and evaluates again. It returns a summary with the held-out metrics, the final
# parameters and where the checkpoints and metrics went. `compilations == 1`: the train step compiled once.

# %%
summary = sft.main(config)
print("train step compilations:", summary["compilations"])

# %% [markdown]
# ## Held-out exact match
#
# A held-out answer counts as right when every answer token is the model's argmax given the tokens before it,
# which is exactly when greedy decoding reproduces the reference answer.

# %%
before, after = summary["eval_before"], summary["eval_after"]
print(f"{'':24}{'before':>10}{'after':>10}")
print(f"{'exact match':24}{before['exact_match']:>10.1%}{after['exact_match']:>10.1%}")
print(f"{'loss per answer token':24}{before['loss']:>10.3f}{after['loss']:>10.3f}")
print(f"({after['sequences']} held-out problems)")

# %% [markdown]
# ## The loss curve
#
# Every run writes `<output_dir>/metrics.jsonl` (one JSON object per logged step; also TensorBoard files under
# `tensorboard/`). Training rows carry `train/...` keys, evaluations `eval/...` keys.

# %%
import json

import matplotlib.pyplot as plt

rows = [json.loads(line) for line in open(summary["metrics"])]
train = [r for r in rows if "train/loss_per_token" in r]
evals = [r for r in rows if "eval/loss" in r]

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
left.plot([r["step"] for r in train], [r["train/loss_per_token"] for r in train], label="train (batch)")
left.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o", label="held out")
left.set(xlabel="step", ylabel="loss per answer token", yscale="log", title="SFT loss")
left.legend()
right.plot([r["step"] for r in train], [r["train/learning_rate"] for r in train])
right.set(xlabel="step", ylabel="learning rate", title="schedule (warmup, linear decay)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sample answers
#
# The sampler is one jitted program: a prefill of the prompts, then a `lax.while_loop` that decodes with a
# donated KV cache until every row has written its end-of-turn token. Here it decodes greedily the whole
# held-out set and we check each answer's last number against the ground truth.

# %%
from flax import nnx

from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.sampling.text import completion_text, stop_tokens_for

tokenizer = load_tokenizer(config.tokenizer)
model = nnx.merge(summary["graphdef"], summary["params"])
graphdef, state = nnx.split(model)
mesh, rules = mesh_and_rules(config)
held_out = [json.loads(line) for line in open(config.data.eval_path)]
prompts = [render_chat(tokenizer, row["messages"][:1], template=config.chat_template,
                       add_generation_prompt=True).ids for row in held_out]
greedy = SamplingParams(max_new_tokens=16, greedy=True, stop_tokens=stop_tokens_for(tokenizer, config.chat_template),
                        pad_token=model.config.pad_token_id)
out = Sampler(graphdef, model.config, mesh=mesh, rules=rules)(state, prompts, greedy)
answers = [completion_text(tokenizer, out.tokens[i], int(out.lengths[i]), bool(out.stopped[i]))
           for i in range(len(held_out))]
right = [synthetic.check_answer(answer, row["answer"]) for answer, row in zip(answers, held_out)]
print(f"greedy decoding: {sum(right)}/{len(right)} = {sum(right) / len(right):.1%} held-out answers right\n")
for row, answer, ok in list(zip(held_out, answers, right))[:8]:
    print(f"{'right' if ok else 'WRONG'}  {row['messages'][0]['content']}\n       -> {answer!r} "
          f"(expected {row['answer']})")

# %% [markdown]
# ## Next
#
# - The same run from a shell: `posttrain-jax sft` (add `--resume` to continue from the latest checkpoint).
# - `dpo.ipynb` and `grpo.ipynb` start from this model (`runs/sft-quickstart/checkpoints`).
# - Real models: `--config.model.hf_path=/path/to/llama-or-qwen` with your own JSONL/Parquet data in
#   `--config.data.sources`; see `configs/tulu3/sft_8b.py`.
