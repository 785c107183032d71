"""The Tülu 3 loss-aggregation ablation on a small model: `posttrain-jax ablate`.

Two parts, written to `out_dir` as `results.jsonl`, `table.md` and `ablation.png`:

1. Gradient differences between splits: for each aggregation, the gradient of
   one fixed global batch computed under several (data-parallel devices x
   accumulation steps x micro-batch rows) splits, relative to the first split.
   `sum`, `token_mean` and `sequence_mean` agree to fp32 rounding;
   `mean_per_microbatch` does not.
2. Training runs: {aggregation} x {learning rate} x {accumulation steps} with
   the SFT trainer on the synthetic task, recording final loss per token and
   held-out exact match.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, shard_batch
from posttrain_jax.train import make_grad_fn
from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective


def default_config() -> ml_collections.ConfigDict:
    from posttrain_jax.trainers.sft import default_config as sft_defaults
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/tulu3-loss-ablation"
    c.aggregations = ["mean_per_microbatch", "sum", "token_mean"]
    c.learning_rates = [1e-3, 3e-3]
    c.accum_steps = [1, 4]  # the training runs' accumulation splits of the same global batch
    c.gradient_splits = [[1, 8, 1], [8, 1, 1], [2, 2, 2], [1, 1, 8]]  # devices x accum x micro-batch rows
    c.sft = sft_defaults()
    c.sft.data.packing = False  # one example per row: lengths differ, as in Tülu 3's ablation
    c.sft.data.quickstart_num_train = 4000
    c.sft.train.global_batch = 32
    c.sft.train.log_every = 1000
    return c


def gradient_for_split(model_config, batch: dict[str, np.ndarray], aggregation: str, split, *, seed: int = 0,
                       sum_constant: float | None = None):
    """Gradient (list of host arrays) and metrics of one global batch under one split."""
    devices, accum, micro = split
    rows = batch["tokens"].shape[0]
    if devices * accum * micro != rows:
        raise ValueError(f"split {split} does not multiply to the {rows} rows of the batch")
    mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
    graphdef, params = nnx.split(create_model(model_config, mesh=mesh, seed=seed), nnx.Param)
    fn = make_grad_fn(graphdef, make_sft_objective(aggregation, data_shards=devices),
                      make_sft_denominator(aggregation, accum_steps=accum, data_shards=devices,
                                           sum_constant=sum_constant),
                      accum_steps=accum, data_shards=devices)
    with jax.set_mesh(mesh), logical_rules(DEFAULT_RULES):
        grads, metrics = jax.jit(fn)(params, shard_batch(batch, mesh))
    return [np.asarray(g) for g in jax.tree.leaves(grads)], jax.device_get(metrics)


def max_relative_difference(a, b) -> float:
    return max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-30)) for x, y in zip(a, b))


def _write(out_dir: str, rows: list[dict]) -> None:
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    grads = [r for r in rows if r["kind"] == "gradient"]
    runs = [r for r in rows if r["kind"] == "train"]
    lines = ["## Gradient difference vs the first split (max relative)", "",
             "| aggregation | split (devices x accum x micro) | max rel diff |", "| --- | --- | --- |"]
    lines += [f"| {r['aggregation']} | {'x'.join(map(str, r['split']))} | {r['max_rel_diff']:.2e} |" for r in grads]
    lines += ["", "## Training runs", "", "| aggregation | lr | accum steps | final loss/token | eval loss | "
              "eval exact match |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['aggregation']} | {r['learning_rate']:g} | {r['accum_steps']} | {r['final_loss_per_token']:.4f} "
              f"| {r['eval_loss']:.4f} | {r['eval_exact_match']:.1%} |" for r in runs]
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote the table only (pip install matplotlib for the plot)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for agg in sorted({r["aggregation"] for r in grads}):
        pts = [r for r in grads if r["aggregation"] == agg]
        left.plot(["x".join(map(str, r["split"])) for r in pts], [max(r["max_rel_diff"], 1e-9) for r in pts],
                  "o-", label=agg)
    left.set_yscale("log")
    left.set(title="gradient vs first split", xlabel="devices x accum x micro", ylabel="max relative difference")
    left.legend()
    labels = [f"{r['aggregation']}\nlr {r['learning_rate']:g}, accum {r['accum_steps']}" for r in runs]
    right.barh(range(len(runs)), [r["eval_loss"] for r in runs])
    right.set_yticks(range(len(runs)), labels, fontsize=6)
    right.set(title="held-out loss per token after training", xlabel="loss")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ablation.png"), dpi=120)


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> list[dict]:
    from posttrain_jax.trainers import sft
    del resume
    os.makedirs(config.out_dir, exist_ok=True)
    rows: list[dict] = []
    # Part 1: one global batch from the same data pipeline the runs use.
    first = ml_collections.ConfigDict(config.sft.to_dict())
    first.output_dir = os.path.join(config.out_dir, "gradient-batch")
    first.train.steps = 1
    if first.data.quickstart_task:
        sft._quickstart_data(first)
    from posttrain_jax.data import SourceSpec, make_sft_pipeline
    from posttrain_jax.tokenizer import load_tokenizer
    from posttrain_jax.trainers.common import build_model
    rows_per_batch = int(np.prod(config.gradient_splits[0]))
    pipeline, _ = make_sft_pipeline([SourceSpec(s["path"]) for s in first.data.sources],
                                    load_tokenizer(first.tokenizer), template=first.chat_template,
                                    seq_len=first.data.seq_len, global_batch=rows_per_batch,
                                    packing=first.data.packing, seed=first.seed)
    batch = next(iter(pipeline))
    model_config = build_model(first.model, None, DEFAULT_RULES, seed=0).config
    for agg in config.aggregations:
        reference = None
        for split in config.gradient_splits:
            grads, _ = gradient_for_split(model_config, batch, agg, tuple(split))
            reference = reference or grads
            rows.append({"kind": "gradient", "aggregation": agg, "split": list(split),
                         "max_rel_diff": max_relative_difference(grads, reference)})
            print(json.dumps(rows[-1]))
    # Part 2: the training grid.
    for agg, lr, accum in itertools.product(config.aggregations, config.learning_rates, config.accum_steps):
        run = ml_collections.ConfigDict(config.sft.to_dict())
        run.output_dir = os.path.join(config.out_dir, f"{agg}-lr{lr:g}-accum{accum}")
        run.train.loss_aggregation, run.optim.learning_rate, run.train.accum_steps = agg, float(lr), int(accum)
        summary = sft.main(run)
        final = [json.loads(line) for line in open(summary["metrics"]) if '"train/loss_per_token"' in line][-1]
        rows.append({"kind": "train", "aggregation": agg, "learning_rate": float(lr), "accum_steps": int(accum),
                     "final_loss_per_token": final["train/loss_per_token"],
                     "eval_loss": summary["eval_after"]["loss"],
                     "eval_exact_match": summary["eval_after"]["exact_match"]})
        print(json.dumps(rows[-1]))
    _write(config.out_dir, rows)
    print(f"wrote {config.out_dir}/results.jsonl, table.md and ablation.png")
    return rows
