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
# 2. **training runs** on a task where the weighting matters: the same arithmetic problems with a short reply
#    (the bare answer, ~3 loss tokens, all hard) or a long one (the worked answer, ~35 loss tokens, mostly easy
#    copies). Per token, long replies dominate; averaged per micro-batch, each row's weight grows as micro-batches
#    shrink, so the short replies count for more the finer the batch is split. The grid is aggregation x learning
#    rate x accumulation steps x data-parallel devices x seeds, and the held-out exact match of each reply style
#    shows what the aggregation does to the trained model, and how much it moves when *only the split* changes.

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
    from posttrain_jax.cpu_devices import host_device_flags
    os.environ["XLA_FLAGS"] = host_device_flags(8, os.environ.get("XLA_FLAGS", ""))
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
splits = [s for s in config.gradient_splits if s[0] <= jax.device_count()]  # [devices, accum, micro-batch rows]
if jax.device_count() < 8:  # accumulation-only splits of the same 8 rows
    splits += [[1, 4, 2], [1, 2, 4]]
config.gradient_splits = splits
config.device_counts = [d for d in config.device_counts if d <= jax.device_count()]
config.gradient_aggregations = ["sum", "token_mean", "sequence_mean", "mean_per_microbatch"]
if FAST:  # a grid that only shows the machinery: 4 cells of 4 steps (the conclusion needs the full grid)
    config.aggregations = ["sum", "mean_per_microbatch"]
    config.gradient_aggregations = ["token_mean", "mean_per_microbatch"]
    config.gradient_splits = [splits[0], [2, 2, 2] if jax.device_count() >= 2 else [1, 4, 2]]
    config.learning_rates, config.seeds, config.accum_steps = [3e-3], [0], [1, 4]
    config.device_counts = config.device_counts[-1:]
    config.task.num_train, config.task.num_eval = 400, 16
    config.sft.train.steps, config.sft.train.checkpoint_every = 4, 0
print(config)

# %% [markdown]
# ## Run
#
# Part 1 builds one global batch of 8 rows from the SFT data pipeline and computes its gradient under each
# split, for each aggregation. Part 2 trains with the SFT trainer once per grid cell. Everything is written
# to `out_dir`: `results.jsonl` (a rerun skips finished cells and resumes a cut one from its checkpoint),
# `table.md`, `ablation.png`.

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
# `mean_per_microbatch` moves by percents. Middle: held-out exact match per cell (mean ± std over seeds), one
# panel per learning rate, grouped by split. Right: the split effect: for each seed, how far the held-out exact
# match moves (max - min) when only the split changes; same seed means same initialisation and same batches,
# so for `sum` and `token_mean` this is the fp32 noise floor.

# %%
display(Image(os.path.join(config.out_dir, "ablation.png")))

# %%
from posttrain_jax.ablation_report import summarize

cells, effects = summarize(rows)
for e in effects:
    print(f"{e['aggregation']:>20} lr {e['learning_rate']:g}: exact match moves by {e['eval_exact_match'][0]:.1%} "
          f"(short {e['eval_exact_match_short'][0]:.1%}, long {e['eval_exact_match_long'][0]:.1%}) when only the "
          f"split changes; seed-to-seed spread {e['eval_exact_match_seed_std']:.1%}")
gradient = {}
for r in rows:
    if r["kind"] == "gradient":
        gradient[r["aggregation"]] = max(gradient.get(r["aggregation"], 0.0), r["max_rel_diff"])
for aggregation, difference in gradient.items():
    print(f"{aggregation:>20}: largest gradient difference between splits {difference:.1e}")

# %% [markdown]
# ## Next
#
# - The full grid from a shell: `posttrain-jax ablate --config configs/tulu3/loss_ablation.py` (about an hour
#   on 2 CPU cores; stop and rerun it at will), or `posttrain-jax ablate --fast` for the small one.
# - The README's ablation section states what the full grid showed.
# - Tülu 3's SFT recipe uses `train.loss_aggregation="sum"`: `configs/tulu3/sft_8b.py`; the same grid at 8B is
#   `configs/tulu3/loss_ablation_8b.py`.
