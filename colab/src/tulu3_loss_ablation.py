# %% [markdown]
# # The Tülu 3 loss-aggregation ablation
#
# How the per-token SFT losses of a global batch are turned into one number matters once the batch is split
# over devices and gradient-accumulation steps. The Tülu 3 report (§4.3) found that the common "mean over each
# micro-batch, then average the micro-batches" biases training, and switched to a **sum** loss. `posttrain_jax`
# makes the aggregation explicit (`train.loss_aggregation`):
#
# | aggregation | loss of a global batch | depends on the split? |
# | --- | --- | --- |
# | `sum` | sum of token losses / a constant | no |
# | `token_mean` | sum of token losses / number of loss tokens in the *global* batch | no |
# | `sequence_mean` | mean over sequences of each sequence's token mean | no |
# | `mean_per_microbatch` | mean over micro-batches of each micro-batch's token mean (legacy) | **yes** |
#
# Gradient accumulation runs inside the jitted step on unnormalised sums that are divided once, so the first
# three give the same gradient, to fp32 rounding, however a batch is split into
# *devices x accumulation steps x micro-batch rows*. This notebook runs `posttrain_jax.ablation` (the
# `posttrain-jax ablate` command) and shows both parts of it:
#
# 1. the **gradient difference** of one fixed batch between splits, for each aggregation;
# 2. short **training runs** per aggregation x learning rate x accumulation steps, with their final losses.

# %% include: setup

# %% [markdown]
# ## Several devices, also on a CPU runtime
#
# Comparing data-parallel splits needs several devices. On a TPU runtime we use the real ones; on a CPU
# runtime XLA can pretend the host is 8 devices, but only if the flag is set **before JAX is imported**
# (restart the runtime if JAX was imported already).

# %%
if not ON_TPU and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    if "jax" in sys.modules:
        print("JAX is imported already, so the 8 CPU devices cannot be made: restart the runtime and run again")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
print("XLA_FLAGS =", os.environ.get("XLA_FLAGS", ""))

# %% include: devices

# %% [markdown]
# Gradients are compared in float32. TPUs multiply float32 matrices in bfloat16 passes by default, which
# would drown the fp32 rounding differences we want to see; "highest" asks for full float32 products.

# %%
jax.config.update("jax_default_matmul_precision", "highest")

# %% [markdown]
# ## The grid
#
# `configs/tulu3/loss_ablation.py` is `ablation.default_config()`. We add `sequence_mean` to its aggregations
# and keep only the splits this runtime has devices for: with one device (a v5e-1) only accumulation splits
# remain, and they still separate the legacy mean from the others. `FAST` keeps two aggregations (`token_mean`
# and the legacy mean) and two splits, and skips the training runs (`learning_rates = []`): a few steps would
# show nothing, and compiling them would take most of the time.

# %%
from posttrain_jax import ablation

config = ablation.default_config()
config.out_dir = os.path.join(RUNS_DIR, "tulu3-loss-ablation-fast" if FAST else "tulu3-loss-ablation")
config.sft.mesh = MESH
config.aggregations = ["sum", "token_mean", "sequence_mean", "mean_per_microbatch"]
splits = [s for s in config.gradient_splits if s[0] <= jax.device_count()]  # [devices, accum, micro-batch rows]
if jax.device_count() < 8:  # accumulation-only splits of the same 8 rows
    splits += [[1, 4, 2], [1, 2, 4]]
config.gradient_splits = splits
if FAST:
    config.aggregations = ["token_mean", "mean_per_microbatch"]
    config.gradient_splits = [splits[0], [2, 2, 2] if jax.device_count() >= 2 else [1, 4, 2]]
    config.learning_rates = []  # no training runs
    config.sft.data.quickstart_num_train = 200
print(config)

# %% [markdown]
# ## Run
#
# Part 1 builds one global batch of 8 rows from the SFT data pipeline and computes its gradient under each
# split, for each aggregation. Part 2 trains with the SFT trainer once per grid point. Everything is written
# to `out_dir`: `results.jsonl`, `table.md`, `ablation.png`.

# %%
rows = ablation.main(config)

# %% [markdown]
# ## The table

# %%
from IPython.display import Image, Markdown, display

display(Markdown(open(os.path.join(config.out_dir, "table.md")).read()))

# %% [markdown]
# ## The plot
#
# Left: the largest relative gradient difference from the first split (log scale; fp32 rounding is around
# 1e-7 to 1e-6). `sum`, `token_mean` and `sequence_mean` stay at rounding level for every split, while
# `mean_per_microbatch` moves by percents: the same data, a different gradient, only because the batch was
# split differently. Right: held-out loss after each training run.

# %%
display(Image(os.path.join(config.out_dir, "ablation.png")))

# %% [markdown]
# The final training losses side by side (the loss per token of the last logged step), grouped by aggregation.

# %%
import matplotlib.pyplot as plt

runs = [r for r in rows if r["kind"] == "train"]
if runs:
    labels = [f"{r['aggregation']}\nlr {r['learning_rate']:g}, accum {r['accum_steps']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 3.5))
    ax.bar(range(len(runs)), [r["final_loss_per_token"] for r in runs],
           color=[f"C{config.aggregations.index(r['aggregation'])}" for r in runs])
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    ax.set(ylabel="final train loss per token", title="training runs")
    fig.tight_layout()
    plt.show()
else:
    print("no training runs in this grid (FAST skips them)")

gradient = {}
for r in rows:
    if r["kind"] == "gradient":
        gradient[r["aggregation"]] = max(gradient.get(r["aggregation"], 0.0), r["max_rel_diff"])
for aggregation, difference in gradient.items():
    print(f"{aggregation:>20}: largest gradient difference between splits {difference:.1e}")

# %% [markdown]
# Reading the training runs: Adam normalises the gradient's scale away (and the gradient norm is clipped), so
# `sum` and `token_mean`, whose losses differ by a factor that changes little from batch to batch, train
# almost identically. With one row per micro-batch (on 8 devices: 32 rows / (8 devices x 4 accumulation
# steps)) the legacy mean *is* `sequence_mean`; it differs only when a micro-batch holds several sequences of
# different lengths, which is when the Tülu 3 report saw it go wrong.

# %% [markdown]
# ## Next
#
# - The full grid from a shell: `posttrain-jax ablate --config configs/tulu3/loss_ablation.py`
#   (`--config.learning_rates=[1e-3]` etc. to change it).
# - Tülu 3's SFT recipe uses `train.loss_aggregation="sum"`: `configs/tulu3/sft_8b.py`.
