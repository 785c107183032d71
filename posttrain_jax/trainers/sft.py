"""`posttrain-jax sft`: supervised fine-tuning with explicit loss aggregation.

The embedded default is the CPU quickstart: it writes a synthetic arithmetic
task and a SentencePiece tokenizer, trains the `quickstart` model on it and
prints held-out exact-match accuracy before and after.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posttrain_jax.data import SourceSpec, make_eval_pipeline, make_sft_pipeline
from posttrain_jax.data import synthetic
from posttrain_jax.eval.from_config import combine_evaluators, generation_eval_section, make_generation_evaluator
from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.losses.sft import _sequence_token_counts
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.metrics import progress_bar
from posttrain_jax.models.from_config import build_model
from posttrain_jax.sharding import data_shards, logical_rules, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.train import optimizer_config
from posttrain_jax.train.loop import print_paths
from posttrain_jax.trainers import runner
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The quickstart: ~1M-parameter model, synthetic arithmetic, a few minutes on 2 CPU cores."""
    c = base_config("runs/sft-quickstart")
    c.data = ml_collections.ConfigDict(dict(
        quickstart_task=True,  # write the synthetic task + tokenizer into output_dir/data and use them
        sources=[],  # [{"path": ..., "weight": ..., "epochs": ...}, ...]
        epochs=1.0,  # multiplies every source's epochs (Tülu 3 SFT: 2)
        eval_path="",
        extra_eval_paths={},  # {name: path}: more held-out sets, reported as eval/<name>/loss and .../exact_match
        seq_len=64,
        packing=True,
        train_on="assistant",  # or "all"
        length_policy="truncate",  # or "drop"
        on_bad_row="error",  # or "skip" (counted and reported)
    ))
    # steps 0: one pass over the data mix; peak_flops 0: measure a jitted fp32 matmul (for MFU);
    # ema_decay > 0 keeps an EMA of the params in the run state.
    c.train = runner.loop_config(
        global_batch=32,  # rows per step across all devices and accumulation steps
        loss_aggregation="token_mean",  # sum | token_mean | sequence_mean | mean_per_microbatch
        sum_constant=0.0,  # `sum` divisor; 0: the global batch size in rows
        loss_chunk_size=0,  # sequence positions per fused LM-head chunk (under FSDP: as many logits per vocabulary
        # chunk, capped at the default budget); 0 = automatic (see losses/lm_head_chunks.py)
        # LM-head gradient: auto (one_pass on CPU, recompute on TPU/GPU) | one_pass (taken in the forward
        # pass: fewer FLOPs, a float32 kernel-sized accumulator; recompute wherever FSDP shards the head
        # kernel, since one pass would gather it whole) | recompute (less memory); sft_objective.py
        loss_pass="auto",
    )
    c.optim = optimizer_config()
    c.generation_eval = generation_eval_section()  # held-out accuracy by sampling (off while its path is "")
    c.data.quickstart_num_train = 40000
    c.data.quickstart_num_eval = 400
    c.data.quickstart_show_work = True  # answers as "a + b = c": the model copies, then adds
    c.data.quickstart_max_operand = 19  # operands 1..19: learnable on 2 CPU cores in minutes
    return c


def _quickstart_data(config) -> None:
    """Write the synthetic task (once) and point the config at it."""
    directory = os.path.join(config.output_dir, "data")
    if not os.path.exists(os.path.join(directory, "eval.jsonl")):
        synthetic.make_quickstart_data(directory, num_train=config.data.quickstart_num_train,
                                       num_eval=config.data.quickstart_num_eval, seed=config.seed,
                                       show_work=config.data.quickstart_show_work,
                                       max_operand=config.data.quickstart_max_operand)
    synthetic.ensure_chat_template(os.path.join(directory, "tokenizer.model"))
    with config.unlocked():
        # The task's own tokenizer, unless one is set or the model is a Hugging Face one (its own tokenizer:
        # the task's data is tokenizer-free chat JSONL).
        if not config.tokenizer:
            config.tokenizer = config.model.hf_path or os.path.join(directory, "tokenizer.model")
        config.data.sources = [{"path": os.path.join(directory, "train.jsonl"), "weight": 1.0, "epochs": 1.0}]
        config.data.eval_path = os.path.join(directory, "eval.jsonl")


def make_eval_fn(graphdef, rules, mesh, *, chunk_size: int | None = None):
    """Jitted sums over one eval batch: NLL, loss tokens, sequences, exactly-right sequences.

    A sequence is exactly right when every trained token is the argmax given the
    ones before it: precisely when greedy decoding reproduces the reference answer.
    """
    @jax.jit
    def sums(params, batch):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        out = lm_head_logprobs(model, hidden, batch["targets"], chunk_size=chunk_size, with_max=True)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = -out.logps
        wrong = mask * (out.logps < out.max_logps)  # the target is not the greedy (argmax) token
        per_seq = mask / jnp.maximum(_sequence_token_counts(mask, batch["segment_ids"]), 1.0)
        all_right = _sequence_token_counts(wrong, batch["segment_ids"]) == 0
        return {"nll_sum": jnp.sum(nll * mask), "loss_tokens": jnp.sum(mask), "sequences": jnp.sum(per_seq),
                "exact": jnp.sum(per_seq * all_right)}

    def evaluate(params, *, eval_iter) -> dict[str, float]:
        eval_iter.reset()
        total = {}
        # A held-out pass on a real model takes minutes: show batches, rate and ETA.
        with jax.set_mesh(mesh), logical_rules(rules), \
                progress_bar(eval_iter.num_batches, desc="eval", unit="batch", leave=False) as bar:
            for batch in eval_iter:
                out = jax.device_get(sums(params, shard_batch(batch, mesh, rules)))
                total = {k: total.get(k, 0.0) + float(v) for k, v in out.items()}
                bar.update()
        return {"loss": total["nll_sum"] / max(total["loss_tokens"], 1.0),
                "exact_match": total["exact"] / max(round(total["sequences"]), 1), "sequences": round(total["sequences"])}

    return evaluate


def _evaluate_all(eval_fn, eval_iter, extra: dict, params) -> dict[str, float]:
    """The main held-out set's metrics plus `<name>/<metric>` for every extra set."""
    metrics = eval_fn(params, eval_iter=eval_iter)
    for name, iterator in extra.items():
        metrics.update({f"{name}/{k}": v for k, v in eval_fn(params, eval_iter=iterator).items()})
    return metrics


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Train (continuing from the latest checkpoint with `resume`); returns a summary."""
    if config.data.quickstart_task:
        _quickstart_data(config)
    if not config.tokenizer:
        raise ValueError("config.tokenizer is empty: set it to a SentencePiece .model or a tokenizer.json")
    if not config.data.sources:
        raise ValueError("config.data.sources is empty: give at least one {'path': ...} (JSONL or Parquet)")
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    t = config.train
    specs = [SourceSpec(s["path"], weight=s.get("weight"), epochs=s.get("epochs", 1.0) * config.data.epochs,
                        normalize=s.get("normalize", False))
             for s in config.data.sources]
    common = dict(template=config.chat_template, seq_len=config.data.seq_len, global_batch=t.global_batch,
                  train_on=config.data.train_on, length_policy=config.data.length_policy,
                  on_bad_row=config.data.on_bad_row)
    train_iter, stats = make_sft_pipeline(specs, tokenizer, packing=config.data.packing, seed=config.seed, **common)
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        lora=config.lora)
    evaluate = None
    if config.data.eval_path:
        eval_fn = make_eval_fn(nnx.graphdef(model), rules, mesh, chunk_size=t.loss_chunk_size or None)
        eval_iter, _ = make_eval_pipeline([SourceSpec(config.data.eval_path)], tokenizer, packing=False, **common)
        extra = {name: make_eval_pipeline([SourceSpec(path)], tokenizer, packing=False, **common)[0]
                 for name, path in dict(config.data.extra_eval_paths).items()}
        evaluate = functools.partial(_evaluate_all, eval_fn, eval_iter, extra)
    evaluate = combine_evaluators(evaluate, make_generation_evaluator(
        config.generation_eval, chat_template=config.chat_template, seed=config.seed, graphdef=nnx.graphdef(model),
        model_config_=model.config, mesh=mesh, rules=rules, tokenizer=tokenizer))
    shards = data_shards(mesh)
    summary = runner.run(
        config, mesh=mesh, rules=rules, model=model, train_iter=train_iter, resume=resume,
        total_steps=runner.total_steps_of(config, train_iter), seq_len=config.data.seq_len, evaluate=evaluate,
        objective=make_sft_objective(t.loss_aggregation, data_shards=shards, loss_chunk_size=t.loss_chunk_size or None,
                                     loss_pass=t.get("loss_pass", "auto")),
        denominator=make_sft_denominator(t.loss_aggregation, accum_steps=t.accum_steps, data_shards=shards,
                                         sum_constant=t.sum_constant or None),
        derived=lambda m: {"loss_per_token": float(m["nll_sum"]) / max(float(m["loss_tokens"]), 1.0)})
    summary["data"] = stats.to_dict()
    if jax.process_index() == 0:
        print("\n" + stats.report())
        if "exact_match" in summary.get("eval_after", {}):
            b, a = summary["eval_before"], summary["eval_after"]
            print(f"held-out exact match: {b['exact_match']:.1%} before -> {a['exact_match']:.1%} after "
                  f"({int(a['sequences'])} examples); loss/token {b['loss']:.3f} -> {a['loss']:.3f}")
    print_paths(summary)
    return summary
