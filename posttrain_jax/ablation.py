"""The Tülu 3 loss-aggregation ablation on a small model: `posttrain-jax ablate`.

Tülu 3 (report §4.3) found that averaging the loss per micro-batch makes the
weight of each sequence depend on how a global batch is split over devices and
gradient-accumulation steps, and that this changed the trained model; a summed
loss fixed it. This module measures both halves of that claim:

1. Gradient differences between splits: for each aggregation, the gradient of
   one fixed global batch computed under several (data-parallel devices x
   accumulation steps x micro-batch rows) splits, relative to the first split.
   `sum`, `token_mean` and `sequence_mean` agree to fp32 rounding;
   `mean_per_microbatch` does not.
2. Training: the grid aggregation x learning rate x accumulation steps x
   data-parallel devices x seeds, each cell an SFT run for a fixed budget on
   the length-mix task (`synthetic.write_length_mix_jsonl`): the same
   arithmetic problems with a short (bare answer, ~3 loss tokens) or a long
   (worked, ~40 loss tokens) reply. Per token, long replies dominate; with
   per-micro-batch averaging each row's weight grows as micro-batches shrink,
   so the short replies' hard tokens count for more the finer the split. The
   held-out exact match of each reply style, and its change when only the
   split changes, are what separate the modes.

Everything is written to `out_dir`: `results.jsonl` (one row per gradient
split and per finished cell; a rerun skips finished cells and resumes an
interrupted one from its checkpoint), `table.md` and `ablation.png`
(see `posttrain_jax.ablation_report`).

A command (`posttrain-jax ablate`) beside the trainers, not a library layer: it runs
`trainers.sft` and takes its objective from `trainers.sft_objective` (the SFT trainer's
loss wiring); no library layer below the commands imports `trainers/`.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from posttrain_jax.ablation_report import cell_key, write_report
from posttrain_jax.cpu_devices import host_device_flags
from posttrain_jax.data import synthetic
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model
from posttrain_jax.sharding import DEFAULT_RULES, logical_rules, shard_batch
from posttrain_jax.train import make_grad_fn
from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective


DEFAULT_OUT_DIR = "runs/tulu3-loss-ablation"
# The grid's axes may grow between runs of one out_dir (more seeds, another learning rate); everything
# else must stay as it was, or the cells already in results.jsonl would not be comparable.
GRID_KEYS = ("aggregations", "gradient_aggregations", "learning_rates", "accum_steps", "device_counts", "seeds", "out_dir", "fast")


def default_config() -> ml_collections.ConfigDict:
    """The CPU grid: 2 aggregations x 2 learning rates x {1, 4} accumulation x {1, 2} devices x 3 seeds.

    `token_mean` is left out of the training grid (its gradient equals `sum`'s up to a scale per batch,
    which Adam all but removes; part 1 checks it) to keep the 48 cells near an hour on 2 CPU cores;
    add it with `--config.aggregations="['mean_per_microbatch', 'sum', 'token_mean']"`.
    """
    from posttrain_jax.trainers.sft import default_config as sft_defaults
    c = ml_collections.ConfigDict()
    c.out_dir = DEFAULT_OUT_DIR
    c.fast = False  # True (or `posttrain-jax ablate --fast`): the small grid of `apply_fast`
    c.aggregations = ["mean_per_microbatch", "sum"]
    c.gradient_aggregations = ["mean_per_microbatch", "sum", "token_mean"]  # part 1
    c.learning_rates = [1e-3, 3e-3]
    c.accum_steps = [1, 4]  # the training runs' accumulation splits of the same global batch
    c.device_counts = [1, 2]  # data-parallel devices of the training runs (a prefix of this process's devices)
    c.seeds = [0, 1, 2]  # model init and data order; the same seed gives every split the same batches
    c.gradient_splits = [[1, 8, 1], [8, 1, 1], [2, 2, 2], [1, 1, 8]]  # devices x accum x micro-batch rows
    # Operands 1..9: the best cells reach ~70% held-out exact match in 300 steps of 32 rows (measured), so a
    # 250-step budget of 16 rows stops on the steep part of the curve, where weighting shows most.
    c.task = ml_collections.ConfigDict(dict(num_train=8000, num_eval=200, long_fraction=0.5, max_operand=9))
    c.sft = sft_defaults()
    c.sft.data.quickstart_task = False  # the ablation writes its own task (below)
    c.sft.data.packing = False  # one example per row, padded: lengths differ, as in Tülu 3's ablation
    c.sft.data.seq_len = 80  # the longest example of the task is 74 tokens: nothing is truncated
    c.sft.train.global_batch = 16  # micro-batches of 16, 8, 4 or 2 rows over the splits
    c.sft.train.steps = 250  # a fixed budget: mid-training, where the weighting of the two styles shows
    c.sft.train.log_every = 50
    c.sft.train.checkpoint_every = 50  # an interrupted cell resumes from here
    c.sft.train.keep_checkpoints = 1
    c.sft.train.async_checkpoint = False
    c.sft.optim.warmup_ratio = 0.05
    return c


def apply_fast(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`--fast` (what CI runs): the same pipeline on a grid that finishes in about a minute.

    Two aggregations, one learning rate and seed, both accumulation splits and
    device counts, 12 steps on a small task: it checks the machinery, not the
    conclusion.
    """
    with config.unlocked():
        if config.out_dir == DEFAULT_OUT_DIR:
            config.out_dir = DEFAULT_OUT_DIR + "-fast"
        config.aggregations = ["mean_per_microbatch", "sum"]
        config.gradient_aggregations = ["mean_per_microbatch", "token_mean"]
        config.learning_rates = [3e-3]
        config.seeds = [0]
        config.gradient_splits = [[1, 8, 1], [2, 2, 2]]
        config.task.num_train = 400
        config.task.num_eval = 32
        config.sft.train.steps = 12
        config.sft.train.checkpoint_every = 0
        config.sft.train.log_every = 6
    return config


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


def write_task(config: ml_collections.ConfigDict) -> dict[str, str] | None:
    """The length-mix task (train, held-out mix, held-out per style) and its tokenizer, written once;
    None when `task.num_train` is 0 (the cells train on `sft.data` as configured)."""
    if not config.task.num_train:
        return None
    directory = os.path.join(config.out_dir, "data")
    t, seed = config.task, 0
    paths = {"train": os.path.join(directory, "train.jsonl"), "eval": os.path.join(directory, "eval.jsonl"),
             "tokenizer": os.path.join(directory, "tokenizer.model")}
    paths.update({f"eval_{s}": os.path.join(directory, f"eval_{s}.jsonl") for s in synthetic.LENGTH_STYLES})
    if all(os.path.exists(p) for p in paths.values()):
        synthetic.ensure_chat_template(paths["tokenizer"])  # data written before tokenizers carried one
        return paths
    synthetic.write_length_mix_jsonl(paths["train"], t.num_train, seed=seed, max_operand=t.max_operand,
                                     long_fraction=t.long_fraction)
    # Held-out problems come from another seed; each style gets the same problems.
    for style in synthetic.LENGTH_STYLES:
        synthetic.write_length_mix_jsonl(paths[f"eval_{style}"], t.num_eval, seed=seed + 1,
                                         max_operand=t.max_operand, styles=(style,))
    with open(paths["eval"], "w") as out:
        for style in synthetic.LENGTH_STYLES:
            out.write(open(paths[f"eval_{style}"]).read())
    synthetic.train_sentencepiece(paths["tokenizer"][: -len(".model")], synthetic.length_mix_corpus(seed=seed))
    return paths


def cell_config(config, paths, *, aggregation: str, learning_rate: float, accum: int, devices: int,
                seed: int) -> ml_collections.ConfigDict:
    """The SFT config of one grid cell."""
    run = ml_collections.ConfigDict(config.sft.to_dict())
    run.output_dir = os.path.join(config.out_dir, "cells", cell_key(aggregation, learning_rate, accum, devices, seed))
    run.seed = int(seed)
    if paths:
        run.tokenizer = paths["tokenizer"]
        run.data.sources = [{"path": paths["train"], "weight": 1.0, "epochs": 1.0}]
        run.data.eval_path = paths["eval"]
        run.data.extra_eval_paths = {s: paths[f"eval_{s}"] for s in synthetic.LENGTH_STYLES}
    if devices:  # else the configured mesh over every device (a pod slice)
        run.mesh = {"data": int(devices), "fsdp": 1, "tensor": 1, "num_devices": int(devices)}
    run.train.loss_aggregation, run.optim.learning_rate, run.train.accum_steps = aggregation, float(learning_rate), \
        int(accum)
    return run


def _gradient_rows(config, paths) -> list[dict]:
    from posttrain_jax.data import SourceSpec, make_sft_pipeline
    from posttrain_jax.tokenizer import load_tokenizer
    from posttrain_jax.models.from_config import build_model
    sft = config.sft
    rows_per_batch = int(np.prod(config.gradient_splits[0]))
    pipeline, _ = make_sft_pipeline([SourceSpec(paths["train"])], load_tokenizer(paths["tokenizer"]),
                                    template=sft.chat_template, seq_len=sft.data.seq_len, global_batch=rows_per_batch,
                                    packing=sft.data.packing, seed=sft.seed)
    batch = next(iter(pipeline))
    model_config = build_model(sft.model, None, DEFAULT_RULES, seed=0).config
    rows = []
    for agg in config.gradient_aggregations:
        reference = None
        for split in config.gradient_splits:
            grads, _ = gradient_for_split(model_config, batch, agg, tuple(split))
            reference = reference or grads
            rows.append({"kind": "gradient", "aggregation": agg, "split": list(split),
                         "max_rel_diff": max_relative_difference(grads, reference)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_settings(config) -> None:
    """Record the settings in `out_dir/settings.json`; refuse to continue a grid run with other ones."""
    path = os.path.join(config.out_dir, "settings.json")
    settings = {k: v for k, v in json.loads(config.to_json()).items() if k not in GRID_KEYS}
    if os.path.exists(path):
        saved = json.load(open(path))
        if saved != settings:
            a, b = _flatten(saved), _flatten(settings)
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise ValueError(f"{config.out_dir} holds an ablation run with other settings ({', '.join(diff[:5])}: "
                             f"{[a.get(k) for k in diff[:5]]} there vs {[b.get(k) for k in diff[:5]]} now); only "
                             f"the grid lists ({', '.join(GRID_KEYS[:6])}) may change between runs. Use another "
                             f"out_dir or delete {config.out_dir}")
    else:
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill mid-write: that cell runs again
                    pass
    return rows


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(config: ml_collections.ConfigDict, *, resume: bool = True) -> list[dict]:
    """Run (or continue) the ablation; returns every row of `results.jsonl`.

    Always continues: finished cells are read back from `results.jsonl` and
    never rerun, and a cell cut short resumes from its last checkpoint, so the
    grid can be stopped at any point and started again with the same command
    (`resume` is accepted for the CLI and ignored; delete `out_dir` to start over).
    """
    from posttrain_jax.trainers import sft
    del resume
    if config.fast:
        config = apply_fast(ml_collections.ConfigDict(config.to_dict()))
    os.makedirs(config.out_dir, exist_ok=True)
    if jax.config.jax_compilation_cache_dir is None:
        # Cells that differ only in seed compile the same programs: a persistent cache in out_dir compiles
        # each (aggregation, lr, split) once, and a resumed grid reuses them too.
        jax.config.update("jax_compilation_cache_dir", os.path.join(config.out_dir, "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _check_same_settings(config)
    results = os.path.join(config.out_dir, "results.jsonl")
    rows = _read_rows(results)
    if rows:  # rewrite without a line cut by a kill, so appends start on a fresh line
        with open(results + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(results + ".tmp", results)
    paths = write_task(config)
    if config.gradient_splits and not any(r["kind"] == "gradient" for r in rows):
        for row in _gradient_rows(config, paths):
            _append(results, row)
            rows.append(row)
    if jax.device_count() < max(config.device_counts, default=1):
        raise ValueError(f"device_counts {list(config.device_counts)} needs {max(config.device_counts)} devices but "
                         f"this process has {jax.device_count()}; on a CPU host set XLA_FLAGS="
                         f"'{host_device_flags(8)}' before JAX starts (posttrain-jax ablate does)")
    done = {r["cell"] for r in rows if r["kind"] == "train"}
    grid = list(itertools.product(config.seeds, config.learning_rates, config.aggregations, config.accum_steps,
                                  config.device_counts))
    for index, (seed, lr, agg, accum, devices) in enumerate(grid):
        key = cell_key(agg, lr, accum, devices, seed)
        if key in done:
            continue
        print(f"[ablation] cell {index + 1}/{len(grid)}: {key}", flush=True)
        run = cell_config(config, paths, aggregation=agg, learning_rate=lr, accum=accum, devices=devices, seed=seed)
        has_checkpoint = os.path.isdir(os.path.join(run.output_dir, "checkpoints"))
        summary = sft.main(run, resume=has_checkpoint)
        final = [json.loads(line) for line in open(summary["metrics"]) if '"train/loss_per_token"' in line][-1]
        after = summary.get("eval_after", {})
        shards = int(devices) or jax.device_count()
        row = {"kind": "train", "cell": key, "aggregation": agg, "learning_rate": float(lr), "accum_steps": int(accum),
               "devices": shards, "seed": int(seed), "micro_batch_rows":
                   int(run.train.global_batch) // (int(accum) * shards),
               "steps": int(summary.get("final_step", run.train.steps)),
               "final_loss_per_token": final["train/loss_per_token"],
               "eval_loss": after.get("loss"), "eval_exact_match": after.get("exact_match")}
        for style in synthetic.LENGTH_STYLES if paths else ():
            row[f"eval_exact_match_{style}"] = after[f"{style}/exact_match"]
            row[f"eval_loss_{style}"] = after[f"{style}/loss"]
        _append(results, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_report(config.out_dir, rows)
    print(f"wrote {config.out_dir}/results.jsonl, table.md and ablation.png")
    return rows
