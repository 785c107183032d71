# %% [markdown]
# # LoRA and QLoRA SFT of Gemma 3 270M
#
# Low-rank adapters (LoRA) train two small matrices next to every attention and MLP projection and keep the
# model itself frozen; QLoRA also stores the frozen weights in 4 bits (NF4). Only the adapters get gradients,
# optimizer moments and checkpoints, which is what lets a Colab TPU (v5e-1, 16 GB) or one GPU post-train
# models whose full fine-tune would not fit.
#
# This notebook:
#
# 1. loads **Gemma 3 270M** from a local Hugging Face directory (or the hub cache; nothing is downloaded here),
# 2. trains **LoRA or QLoRA** adapters with SFT on a small arithmetic word-problem task,
# 3. compares what is trained and stored against a full fine-tune,
# 4. exports the result as **merged Hugging Face weights** and as a **PEFT adapter directory**,
# 5. samples answers from the adapted model (adapters applied on the fly, no merged copy).
#
# In the tests (`FAST`) a tiny random Gemma 3 model stands in for the real one.

# %% include: setup

# %% include: devices

# %% [markdown]
# ## Data
#
# Word problems (*"Mia has 7 apples and buys 5 more..."*) answered as `7 + 5 = 12`, as chat JSONL; the
# held-out set is drawn with another seed. Any JSONL/Parquet chat data works the same way.

# %%
from posttrain_jax.data import synthetic

DATA = os.path.join(RUNS_DIR, "lora-data")
if not os.path.exists(os.path.join(DATA, "eval.jsonl")):
    synthetic.make_quickstart_data(DATA, num_train=600 if FAST else 20000, num_eval=32 if FAST else 400, seed=0,
                                   show_work=True, max_operand=19)
print(open(os.path.join(DATA, "train.jsonl")).readline())

# %% [markdown]
# ## The model
#
# `MODEL_DIR` is a Hugging Face directory of Gemma 3 270M (`config.json`, `model.safetensors`,
# `tokenizer.json`): set the environment variable, or leave it empty to look in the hub cache
# (`huggingface-cli download google/gemma-3-270m-it` fetches it once, with your token, outside this notebook).
# `QUANTIZE` is `nf4` (QLoRA, 4-bit base), `int8`, or `none` (plain LoRA).

# %%
MODEL_DIR = os.environ.get("POSTTRAIN_JAX_GEMMA_DIR", "")
QUANTIZE = os.environ.get("POSTTRAIN_JAX_QUANTIZE", "nf4")

from posttrain_jax.models import create_model, export_hf, preset

if FAST:  # a tiny random Gemma 3 (3 layers, 64 wide) over the synthetic task's own 512-token vocabulary
    MODEL_DIR = os.path.join(RUNS_DIR, "tiny-gemma3")
    TOKENIZER = os.path.join(DATA, "tokenizer.model")  # written with the data
    if not os.path.exists(os.path.join(MODEL_DIR, "config.json")):
        export_hf(create_model(preset("tiny-gemma3")), MODEL_DIR)
else:
    if not MODEL_DIR:
        try:
            from huggingface_hub import snapshot_download
            MODEL_DIR = snapshot_download("google/gemma-3-270m-it", local_files_only=True)
        except Exception as error:  # noqa: BLE001 - not installed or not cached: say what to do
            raise RuntimeError("set POSTTRAIN_JAX_GEMMA_DIR to a local Gemma 3 270M directory (or download "
                               "google/gemma-3-270m-it into the hub cache first)") from error
    TOKENIZER = MODEL_DIR
print("model:", MODEL_DIR, "| base quantization:", QUANTIZE)

# %% [markdown]
# ## The configuration
#
# The `lora` section is the same for every trainer (`sft`, `rm`, `dpo`, `grpo`): rank, alpha (the adapters
# are scaled by alpha / rank), a regular expression over projection paths (default: attention q/k/v/o and
# MLP gate/up/down), dropout, and `quantize_base`. On the command line:
# `posttrain-jax sft --config configs/quickstart/sft_lora.py:gemma3 --config.model.hf_path=...`.

# %%
from posttrain_jax.trainers import sft

config = sft.default_config()
config.output_dir = os.path.join(RUNS_DIR, "lora-sft-fast" if FAST else "lora-sft")
config.mesh = MESH
config.model.hf_path = MODEL_DIR
config.model.checkpoint = ""
config.model.dtype = "bfloat16" if ON_TPU else "float32"  # compute dtype; adapters train in float32
config.tokenizer = TOKENIZER
config.chat_template = "gemma"
config.data.quickstart_task = False
config.data.sources = [{"path": os.path.join(DATA, "train.jsonl")}]
config.data.eval_path = os.path.join(DATA, "eval.jsonl")
config.data.seq_len = 64 if FAST else 128
config.train.global_batch = 16
config.train.steps = 8 if FAST else 300
config.train.log_every = 1 if FAST else 25
config.optim.learning_rate = 1e-2 if FAST else 2e-4
config.lora.enabled = True
config.lora.rank = 16
config.lora.alpha = 32.0
config.lora.quantize_base = QUANTIZE
print(config.lora)

# %% [markdown]
# ## Train
#
# The base is loaded (and, for QLoRA, quantized) once; the jitted step differentiates only the adapters and
# receives the frozen base as an argument.

# %%
summary = sft.main(config)
before, after = summary["eval_before"], summary["eval_after"]
print(f"held-out exact match {before['exact_match']:.1%} -> {after['exact_match']:.1%}; "
      f"loss/token {before['loss']:.3f} -> {after['loss']:.3f}; compilations {summary['compilations']}")

# %% [markdown]
# ## What is trained and stored
#
# The run state (and every checkpoint) holds the adapters and their AdamW moments; the base is referenced
# in the checkpoint's metadata. A full fine-tune would keep two moments for every weight.

# %%
import jax
import numpy as np
from flax import nnx

from posttrain_jax.checkpointing import load_params, read_metadata, resolve_step_dir

checkpoints = os.path.join(config.output_dir, "checkpoints")
adapters = load_params(checkpoints)
adapter_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))
everything = nnx.merge(summary["graphdef"], summary["params"])
base_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(everything)) if x.dtype != np.uint8)
full_bytes = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(everything)))
print(f"trained parameters: {adapter_count:,} ({adapter_count / base_count:.2%} of the model)")
print(f"optimizer moments: {2 * 4 * adapter_count / 2**20:.2f} MiB (LoRA) vs ~{2 * full_bytes / 2**20:.1f} MiB "
      f"(full fine-tune, fp32)")
print("the checkpoint's base:", read_metadata(resolve_step_dir(checkpoints))["lora"]["base"])

# %% [markdown]
# ## Export
#
# Merged weights (W + alpha/r A B, the quantized base dequantized first) load in transformers like any model;
# the PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) is applied by
# `peft.PeftModel.from_pretrained` to the base model. From a shell:
# `posttrain-jax export --checkpoint runs/lora-sft --out merged` (add `--peft` for the adapter).

# %%
from posttrain_jax.trainers.export import export_checkpoint

export_checkpoint(checkpoints, os.path.join(config.output_dir, "merged"))
export_checkpoint(checkpoints, os.path.join(config.output_dir, "peft_adapter"), peft=True)
for name in ("merged", "peft_adapter"):
    files = sorted(os.listdir(os.path.join(config.output_dir, name)))
    print(f"{name}: {files}")

# %% [markdown]
# ## Sample from the adapted model
#
# The sampler runs the base with the adapters applied on the fly, exactly as in training: no merged copy.

# %%
import json

from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.sampling.text import completion_text, stop_tokens_for

tokenizer = load_tokenizer(config.tokenizer)
graphdef, state = nnx.split(everything)
mesh, rules = mesh_and_rules(config)
held_out = [json.loads(line) for line in open(config.data.eval_path)][:16]
prompts = [render_chat(tokenizer, row["messages"][:1], template=config.chat_template,
                       add_generation_prompt=True).ids for row in held_out]
greedy = SamplingParams(max_new_tokens=16, greedy=True, stop_tokens=stop_tokens_for(tokenizer, config.chat_template),
                        pad_token=everything.config.pad_token_id or 0)
out = Sampler(graphdef, everything.config, mesh=mesh, rules=rules)(state, prompts, greedy)
answers = [completion_text(tokenizer, out.tokens[i], int(out.lengths[i]), bool(out.stopped[i]))
           for i in range(len(held_out))]
right = [synthetic.check_answer(answer, row["answer"]) for answer, row in zip(answers, held_out)]
print(f"greedy decoding: {sum(right)}/{len(right)} held-out answers right")
for row, answer in list(zip(held_out, answers))[:4]:
    print(f"{row['messages'][0]['content']}\n   -> {answer!r} (expected {row['answer']})")

# %% [markdown]
# ## Next
#
# - The same `lora` section works for `posttrain-jax rm` (adapters + the scalar head), `dpo` (the reference
#   is the base with the adapters off: no second copy of the weights) and `grpo` (rollouts on the adapted
#   model, the KL reference is the base).
# - Continue from a PEFT adapter: `--config.lora.adapter=/path/to/adapter_dir`.
