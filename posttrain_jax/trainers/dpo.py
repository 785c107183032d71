"""`posttrain-jax dpo`: DPO and its variants (IPO, hinge, Tülu 3's dpo_norm, SimPO) with an NLL term.

Reference log-probs come from a frozen copy of the initial policy, sharded like
it, either computed per batch during training (`reference="online"`) or once
in a pass over the whole data stream and cached to disk (`reference="cached"`,
as Tülu 3 does; the cache is reused by a resumed run). Both use the same
jitted function on the same batches, so both give the same loss.

The NLL term on chosen responses (Llama 3: DPO + 0.2 x NLL) is normalised by
`train.nll_normalization`: "token" (TRL: mean over all chosen tokens of the
global batch) or "sequence" (mean over pairs of each response's token mean).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from posttrain_jax.eval.from_config import combine_evaluators, generation_eval_section, make_generation_evaluator
from posttrain_jax.losses.dpo import batch_sequence_ids, chosen_nll_term, dpo_loss, dpo_metric_means, sequence_logps
from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.models.lora import base_graphdef, has_adapters
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.models.from_config import build_model
from posttrain_jax.sharding import batch_sharding, data_shards, logical_rules, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.train import optimizer_config, trainable_split
from posttrain_jax.train.loop import print_paths
from posttrain_jax.trainers import preference, runner
from posttrain_jax.trainers.common import base_config

log = logging.getLogger(__name__)
REFERENCE_FREE = ("simpo",)
# Per-pair sums of `dpo_loss` reported as means; `loss` and the rest are already normalised.
PAIR_SUMS = ("num_pairs", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
             "logps_chosen", "logps_rejected", "dpo_loss")


def default_config() -> ml_collections.ConfigDict:
    """The DPO quickstart: the SFT quickstart model, right-vs-wrong arithmetic preferences, CPU minutes."""
    c = base_config("runs/dpo-quickstart")
    c.model.checkpoint = os.path.join(preference.QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(preference.QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = preference.data_config()
    c.data.sft_eval_path = os.path.join(preference.QUICKSTART_SFT_DIR, "data", "eval.jsonl")  # exact match
    c.train = runner.loop_config(
        global_pairs=16, log_every=10,
        loss_type="sigmoid",  # sigmoid (DPO) | ipo | hinge | robust | dpo_norm | simpo
        beta=0.1, label_smoothing=0.0, gamma_beta_ratio=0.3,  # gamma_beta_ratio: SimPO only
        nll_coef=0.2, nll_normalization="token",  # Llama 3: DPO + 0.2 x NLL on chosen
        reference="online",  # online | cached
        loss_chunk_size=0,
    )
    c.optim = optimizer_config(learning_rate=1e-5, warmup_ratio=0.1)  # Llama 3's DPO lr
    c.generation_eval = generation_eval_section()  # held-out accuracy by sampling (off while its path is "")
    return c


def make_pair_logps(graphdef, *, pairs_per_row: int, loss_chunk_size: int | None):
    """params, batch -> per-pair sums: chosen/rejected log-probs and response lengths, [pairs] each."""
    def pair_logps(params, batch):
        model = nnx.merge(graphdef, params) if not isinstance(params, nnx.Module) else params
        hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = lm_head_logprobs(model, hidden, batch["targets"], chunk_size=loss_chunk_size).logps
        ids, num_pairs = batch_sequence_ids(batch["segment_ids"], pairs_per_row)
        return sequence_logps(logp, batch["loss_mask"], ids, num_pairs)
    return pair_logps


def make_dpo_objective(t, pair_logps):
    """The objective of one micro-batch: DPO-family sum (+ NLL term scaled to the global normaliser)."""
    def terms(model, mb):
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, mb)
        ref_c = ref_r = None
        if t.loss_type not in REFERENCE_FREE:
            ref_c, ref_r = mb["ref_chosen"].reshape(-1), mb["ref_rejected"].reshape(-1)
        pair_mask = mb["pair_mask"].reshape(-1)
        loss_sum, sums = dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=t.loss_type, beta=t.beta,
                                  label_smoothing=t.label_smoothing, chosen_lengths=chosen_len,
                                  rejected_lengths=rejected_len, gamma_beta_ratio=t.gamma_beta_ratio,
                                  pair_mask=pair_mask)
        nll_sum, _ = chosen_nll_term(chosen, chosen_len, pair_mask=pair_mask, normalization=t.nll_normalization)
        return loss_sum, {**sums, "dpo_loss": loss_sum, "nll_sum": nll_sum}

    def objective(model, mb, context):
        loss_sum, sums = terms(model, mb)
        if t.nll_coef:
            # The step divides by the number of pairs; rescale so the NLL term ends up over its own normaliser.
            loss_sum = loss_sum + t.nll_coef * sums["nll_sum"] * context["denominator"] / context["nll_denominator"]
        return loss_sum, sums

    return objective, terms


def make_denominator(t):
    def denominator(batch):
        pairs = jnp.maximum(jnp.sum(batch["pair_mask"]).astype(jnp.float32), 1.0)
        chosen_tokens = jnp.sum(batch["loss_mask"] * (batch["segment_ids"] % 2 == 1)).astype(jnp.float32)
        nll = jnp.maximum(chosen_tokens, 1.0) if t.nll_normalization == "token" else pairs
        return {"denominator": pairs, "nll_denominator": nll}
    return denominator


def _cached_reference(path, fingerprint, batches, reference_fn, shard, mesh):
    """Reference log-probs of every batch of the stream, computed once and kept on disk (this host's rows)."""
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["fingerprint"]) == fingerprint:
                log.info("reusing cached reference log-probs from %s", path)
                return f["chosen"], f["rejected"]
        log.warning("%s was computed for other data or another reference model: recomputing", path)
    chosen, rejected = [], []
    spec = batch_sharding(mesh).spec
    batches.reset()
    for host_batch in batches:
        c, r = reference_fn(shard(host_batch))
        chosen.append(np.asarray(multihost_utils.global_array_to_host_local_array(c, mesh, spec)))
        rejected.append(np.asarray(multihost_utils.global_array_to_host_local_array(r, mesh, spec)))
    batches.reset()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", chosen=np.stack(chosen), rejected=np.stack(rejected), fingerprint=fingerprint)
    os.replace(path + ".tmp.npz", path)  # a crash never leaves a half-written cache behind
    return np.stack(chosen), np.stack(rejected)


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    t = config.train
    if config.data.quickstart_task:
        preference.quickstart_data(config)
    if config.model.checkpoint and not os.path.exists(config.model.checkpoint):
        raise FileNotFoundError(f"model.checkpoint {config.model.checkpoint} does not exist: run the SFT quickstart "
                                f"(`posttrain-jax sft`) first, or set --config.model.checkpoint='' to start from "
                                f"model.preset / --config.model.hf_path=...")
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    train_iter, stats, eval_iter = preference.pipelines(config, tokenizer,
                                                        rows_multiple=data_shards(mesh) * t.accum_steps)
    if config.data.sft_eval_path and not os.path.exists(config.data.sft_eval_path):
        raise FileNotFoundError(f"data.sft_eval_path {config.data.sft_eval_path} does not exist (set it to '' to "
                                f"skip the exact-match eval)")
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        lora=config.lora)
    graphdef, params = nnx.graphdef(model), nnx.state(model, nnx.Param)
    chunk = t.loss_chunk_size or None
    pair_logps = make_pair_logps(graphdef, pairs_per_row=train_iter.pairs_per_row, loss_chunk_size=chunk)
    # LoRA: the reference is the base with the adapters off, i.e. the base graph over the frozen
    # arrays themselves (no second copy of the weights); a full fine-tune keeps a frozen copy.
    lora = has_adapters(model)
    reference_graphdef = base_graphdef(model) if lora else graphdef
    reference_pair_logps = make_pair_logps(reference_graphdef, pairs_per_row=train_iter.pairs_per_row,
                                           loss_chunk_size=chunk)
    shard = lambda b: shard_batch(b, mesh, rules)  # noqa: E731
    needs_reference = t.loss_type not in REFERENCE_FREE
    reference_params = None
    if needs_reference:
        # A frozen copy: the policy's own buffers are donated to (and replaced by) every train step.
        reference_params = trainable_split(model)[1] if lora else jax.tree.map(jnp.copy, params)
        rows = batch_sharding(mesh, rules)

        @jax.jit(out_shardings=(rows, rows))  # [rows, pairs_per_row], split like every batch key
        def reference_logps(ref_params, batch):  # params are arguments, never closed over
            c, r, _, _ = reference_pair_logps(ref_params, batch)
            shape = batch["pair_mask"].shape
            return c.reshape(shape), r.reshape(shape)

        reference = lambda batch: reference_logps(reference_params, batch)  # noqa: E731

        with jax.set_mesh(mesh), logical_rules(rules):
            if t.reference == "cached":
                fingerprint = hashlib.sha256(json.dumps([train_iter.get_state()["fingerprint"], config.model.to_dict(),
                                                         jax.process_index()]).encode()).hexdigest()[:16]
                cache = _cached_reference(os.path.join(config.output_dir, "reference_logps",
                                                       f"process_{jax.process_index()}.npz"),
                                          fingerprint, train_iter, reference, shard, mesh)
            elif t.reference != "online":
                raise ValueError(f"train.reference must be 'online' or 'cached', got {t.reference!r}")

        def prepare(host_batch, step):
            if t.reference == "cached":
                host_batch = {**host_batch, "ref_chosen": cache[0][step - 1], "ref_rejected": cache[1][step - 1]}
                return shard(host_batch)
            batch = shard(host_batch)
            batch["ref_chosen"], batch["ref_rejected"] = reference(batch)
            return batch
    else:
        prepare = None  # reference-free losses: the runner's default (shard each batch over the mesh)

    objective, terms = make_dpo_objective(t, pair_logps)
    evaluate = None
    if eval_iter is not None:
        eval_logps = make_pair_logps(graphdef, pairs_per_row=eval_iter.pairs_per_row, loss_chunk_size=chunk)
        eval_reference_logps = make_pair_logps(reference_graphdef, pairs_per_row=eval_iter.pairs_per_row,
                                               loss_chunk_size=chunk)
        _, eval_terms = make_dpo_objective(t, eval_logps)

        def pair_metrics(p, ref_params, batch):
            if ref_params is not None:
                shape = batch["pair_mask"].shape
                c, r = (x.reshape(shape) for x in eval_reference_logps(ref_params, batch)[:2])
                batch = {**batch, "ref_chosen": c, "ref_rejected": r}
            return eval_terms(nnx.merge(graphdef, p), batch)[1]

        evaluate = preference.make_pair_evaluator(pair_metrics, mesh, rules, eval_iter, dpo_metric_means,
                                                  extra_args=(reference_params,))
    if config.data.sft_eval_path:  # also held-out exact match of the answers (the quickstart's task)
        from posttrain_jax.data import SourceSpec, make_eval_pipeline
        from posttrain_jax.trainers.sft import make_eval_fn
        sft_iter, _ = make_eval_pipeline([SourceSpec(config.data.sft_eval_path)], tokenizer,
                                         template=config.chat_template, seq_len=config.data.seq_len,
                                         global_batch=2 * t.global_pairs, packing=False)
        exact = make_eval_fn(graphdef, rules, mesh, chunk_size=chunk)
        pairs_eval = evaluate
        evaluate = lambda p: {**(pairs_eval(p) if pairs_eval else {}),  # noqa: E731
                              **{f"answers_{k}": v for k, v in exact(p, eval_iter=sft_iter).items()}}
    evaluate = combine_evaluators(evaluate, make_generation_evaluator(
        config.generation_eval, chat_template=config.chat_template, seed=config.seed, graphdef=graphdef,
        model_config_=model.config, mesh=mesh, rules=rules, tokenizer=tokenizer))
    summary = runner.run(config, mesh=mesh, rules=rules, model=model, train_iter=train_iter, resume=resume,
                         total_steps=runner.total_steps_of(config, train_iter), seq_len=config.data.seq_len,
                         objective=objective, denominator=make_denominator(t), evaluate=evaluate, prepare=prepare,
                         derived=lambda m: {k: float(v) for k, v in
                                            dpo_metric_means({k: m[k] for k in PAIR_SUMS}).items()})
    summary["data"] = stats.to_dict()
    if jax.process_index() == 0:
        print("\n" + stats.report())
        if evaluate is not None:
            b, a = summary["eval_before"], summary["eval_after"]
            if "rewards_accuracy" in a:
                print(f"held-out preference accuracy: {b['rewards_accuracy']:.1%} before -> "
                      f"{a['rewards_accuracy']:.1%} after; reward margin {b['rewards_margin']:.3f} -> "
                      f"{a['rewards_margin']:.3f}")
            if "generation/accuracy" in a:
                print(f"held-out greedy accuracy (sampled): {b['generation/accuracy']:.1%} before -> "
                      f"{a['generation/accuracy']:.1%} after")
            if "answers_exact_match" in a:
                print(f"held-out answer exact match: {b['answers_exact_match']:.1%} before -> "
                      f"{a['answers_exact_match']:.1%} after")
    print_paths(summary)
    return summary
