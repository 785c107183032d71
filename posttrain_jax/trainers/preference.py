"""What the reward-model and DPO trainers share: the data section, quickstart data, pipelines."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections

from posttrain_jax.data import SourceSpec, synthetic
from posttrain_jax.data.preference import (LLAMA2_STRENGTH_MARGINS, make_preference_eval_pipeline,
                                           make_preference_pipeline, write_arithmetic_preferences)
from posttrain_jax.metrics import progress_bar
from posttrain_jax.sharding import logical_rules, shard_batch

QUICKSTART_SFT_DIR = "runs/sft-quickstart"


def data_config(**overrides) -> ml_collections.ConfigDict:
    base = dict(
        quickstart_task=True,  # write synthetic arithmetic preferences (right vs wrong answer) and use them
        quickstart_num_train=4000,
        quickstart_num_eval=200,
        sources=[],  # [{"path": ..., "weight": ..., "epochs": ...}]: rows with prompt, chosen, rejected
        eval_path="",
        epochs=1.0,
        seq_len=128,  # chosen + rejected of a pair share a row: about twice the longest response + prompt
        packing=False,
        mask_special_tokens=False,  # also mask header / end-of-turn tokens of both responses (Llama 3 DPO)
        keep_strengths=[],  # e.g. ["significantly better", "better"] (Llama 3); [] keeps all
        llama2_margins=False,  # margin from the strength level (Llama 2 RM) when a row has no margin
        length_policy="truncate",
        on_bad_row="error",
        sft_eval_path="",  # DPO: a chat JSONL whose answers are checked by held-out exact match
    )
    return ml_collections.ConfigDict({**base, **overrides})


def quickstart_data(config) -> None:
    """Synthetic preferences and, unless one is configured, a tokenizer of their own."""
    directory = os.path.join(config.output_dir, "data")
    train, held_out = os.path.join(directory, "train.jsonl"), os.path.join(directory, "eval.jsonl")
    if not os.path.exists(held_out):
        write_arithmetic_preferences(train, config.data.quickstart_num_train, seed=config.seed)
        write_arithmetic_preferences(held_out, config.data.quickstart_num_eval, seed=config.seed + 1)
    with config.unlocked():
        if not config.tokenizer:
            prefix = os.path.join(directory, "tokenizer")
            if not os.path.exists(prefix + ".model"):
                synthetic.train_sentencepiece(prefix, synthetic.corpus(seed=config.seed))
            synthetic.ensure_chat_template(prefix + ".model")
            config.tokenizer = prefix + ".model"
        config.data.sources = [{"path": train}]
        config.data.eval_path = held_out


def pipelines(config, tokenizer, *, rows_multiple: int, reward_inputs: bool = False):
    """(train iterator, stats, eval iterator or None) from the `data` section.
    reward_inputs: sequences whose inputs are the whole conversation (reward models; see
    `make_preference_pipeline`)."""
    d = config.data
    if not d.sources:
        raise ValueError("config.data.sources is empty: give at least one {'path': ...} with prompt/chosen/rejected")
    specs = [SourceSpec(s["path"], weight=s.get("weight"), epochs=s.get("epochs", 1.0) * d.epochs)
             for s in d.sources]
    common = dict(template=config.chat_template, seq_len=d.seq_len, global_pairs=config.train.global_pairs,
                  packing=d.packing, mask_special_tokens=d.mask_special_tokens,
                  keep_strengths=list(d.keep_strengths) or None,
                  strength_margins=LLAMA2_STRENGTH_MARGINS if d.llama2_margins else None,
                  length_policy=d.length_policy, on_bad_row=d.on_bad_row, rows_multiple=rows_multiple,
                  reward_inputs=reward_inputs)
    train_iter, stats = make_preference_pipeline(specs, tokenizer, seed=config.seed, **common)
    eval_iter = None
    if d.eval_path:
        eval_iter, _ = make_preference_eval_pipeline([SourceSpec(d.eval_path)], tokenizer, **common)
    return train_iter, stats, eval_iter


def make_pair_evaluator(pair_metrics, mesh, rules, eval_iter, means, extra_args=()):
    """evaluate(params) -> held-out means of `pair_metrics(params, *extra_args, batch)`'s sums over every pair."""
    fn = jax.jit(pair_metrics)

    def evaluate(params) -> dict[str, float]:
        eval_iter.reset()
        total = None
        with jax.set_mesh(mesh), logical_rules(rules), \
                progress_bar(eval_iter.num_batches, desc="eval", unit="batch", leave=False) as bar:
            for batch in eval_iter:
                sums = fn(params, *extra_args, shard_batch(batch, mesh, rules))
                total = sums if total is None else jax.tree.map(jnp.add, total, sums)
                bar.update()
        return {k: float(v) for k, v in jax.device_get(means(total)).items()}

    return evaluate
