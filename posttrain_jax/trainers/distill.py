"""`posttrain-jax distill`: token-level distillation from a frozen teacher (KD, GKD).

The teacher (a run checkpoint, an HF directory or a preset; same tokenizer) is
loaded on the student's mesh with the same sharding rules and never updated.
Per token the loss is JSD_beta(teacher || student) of the two softmaxes at
`distill.temperature` (`divergence`: forward_kl = beta 0, reverse_kl = beta 1,
jsd = `beta`; see `posttrain_jax.losses.distill`), plus `sft_weight` x the NLL
of the dataset token, aggregated exactly like SFT (`train.loss_aggregation`).

Teacher signal, one of:
- full vocabulary (`teacher_topk` 0): the teacher's forward runs inside the
  jitted step on each micro-batch, its params a frozen argument of the step;
- top-k (`teacher_topk` k): its k most likely tokens and log-probs, renormalised
  with the student's over those k tokens; `cache_teacher` computes them once for
  the whole data stream into `<output_dir>/teacher_topk/` (one file per batch,
  each written atomically, so a killed cache pass resumes) and drops the
  teacher from memory when nothing needs it online.

Off-policy (supervised KD): the dataset's responses. On-policy (GKD, Agarwal
et al. 2024): with probability `lambda_on_policy` a step replaces the batch's
responses by student samples from the jitted sampler (current params; the
prompts are the rows' tokens before their first trained token), scored token by
token by the teacher; rows keep the data's width, so one step program serves
both. Needs `data.packing=False`.

Sequence-level distillation (the teacher generates, the student is trained with
SFT on it; DeepSeek-V3's distillation from R1) is rejection sampling with the
teacher as the policy: `posttrain-jax rejection-sample --config.model.checkpoint=TEACHER
--config.rejection.num_samples=1` (or K with a verifier), then `posttrain-jax sft`
on its JSONL output (`tests/trainers/test_distill.py` runs that path).

The quickstart (no config) distils the SFT quickstart model (4 layers, run
`posttrain-jax sft` first) into a 2-layer student on the same arithmetic data and
reports held-out greedy accuracy / pass@k of teacher and student by sampling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax
import ml_collections
from flax import nnx

from posttrain_jax.data import SourceSpec, make_sft_pipeline
from posttrain_jax.eval.from_config import eval_section, make_evaluator
from posttrain_jax.losses.distill import divergence_beta
from posttrain_jax.losses.sft import AGGREGATIONS
from posttrain_jax.mesh import local_mesh, mesh_and_rules
from posttrain_jax.models.from_config import build_model, model_config
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sharding import data_shards, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.train import optimizer_config
from posttrain_jax.train.loop import print_paths
from posttrain_jax.trainers import runner
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.distill_objective import (cache_teacher_topk, is_on_policy, load_cached,
                                                      make_distill_objective, make_teacher_topk, on_policy_batch)
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR
from posttrain_jax.sampling.text import stop_tokens_for
from posttrain_jax.trainers.sft_objective import make_sft_denominator

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The quickstart: the SFT quickstart model (teacher) into a 2-layer student, CPU minutes."""
    c = base_config("runs/distill-quickstart")
    c.model.preset = "tiny-llama"  # the student
    c.teacher = model_config()
    c.teacher.preset = ""
    c.teacher.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = ml_collections.ConfigDict(dict(
        sources=[{"path": os.path.join(QUICKSTART_SFT_DIR, "data", "train.jsonl")}], epochs=1.0, seq_len=64,
        packing=False, train_on="assistant", length_policy="truncate", on_bad_row="error"))
    c.distill = ml_collections.ConfigDict(dict(
        divergence="jsd",  # forward_kl | reverse_kl | jsd
        beta=0.5,  # jsd only (TRL GKD's default)
        temperature=1.0,  # both softmaxes
        sft_weight=0.0,  # + sft_weight x NLL of the dataset token
        teacher_topk=0,  # 0: the full vocabulary, teacher run inside the step; k: its top-k log-probs
        cache_teacher=False,  # top-k only: compute once into <output_dir>/teacher_topk (resumable)
        lambda_on_policy=0.0,  # GKD's lambda: fraction of steps on student samples
        max_prompt_length=32,  # on-policy: prompt width; samples get data.seq_len - this many tokens
        sampling_temperature=1.0,  # on-policy sampling
    ))
    c.train = runner.loop_config(global_batch=32, steps=150, log_every=10, loss_aggregation="token_mean",
                                 sum_constant=0.0, loss_chunk_size=0)
    c.optim = optimizer_config(learning_rate=3e-3)
    # Held-out evaluation by sampling (posttrain_jax.eval); the SFT eval rows' reply is the "reference".
    c.eval = eval_section(path=os.path.join(QUICKSTART_SFT_DIR, "data", "eval.jsonl"), num_samples=4, ks=[1, 4],
                          max_prompt_length=48, length_policy="drop", on_bad_row="error", teacher=True)
    c.rewards = [{"name": "math", "extract": "last_number", "answer_key": "reference", "correct": 1.0,
                  "incorrect": 0.0}]
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                                                stop_tokens=[]))  # eval sampling
    return c


def _check(config, tokenizer) -> None:
    d, t = config.distill, config.train
    divergence_beta(d.divergence, d.beta)
    if t.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"train.loss_aggregation={t.loss_aggregation!r}; choose one of {AGGREGATIONS}")
    if d.temperature <= 0:
        raise ValueError(f"distill.temperature={d.temperature} must be > 0")
    if not 0.0 <= d.lambda_on_policy <= 1.0:
        raise ValueError(f"distill.lambda_on_policy={d.lambda_on_policy} must be in [0, 1]")
    if d.lambda_on_policy and config.data.packing:
        raise ValueError("distill.lambda_on_policy > 0 needs data.packing=False: prompts are read from unpacked rows")
    if d.lambda_on_policy and not 0 < d.max_prompt_length < config.data.seq_len:
        raise ValueError(f"distill.max_prompt_length={d.max_prompt_length} must be in (0, data.seq_len="
                         f"{config.data.seq_len}): samples fill the rest of the row")
    if d.cache_teacher and not d.teacher_topk:
        raise ValueError("distill.cache_teacher needs distill.teacher_topk > 0 (full-vocabulary logits are not cached)")
    if d.teacher_topk and not 0 < d.teacher_topk <= tokenizer.vocab_size:
        raise ValueError(f"distill.teacher_topk={d.teacher_topk} must be in 1..{tokenizer.vocab_size} (vocabulary)")
    if not (config.teacher.preset or config.teacher.hf_path or config.teacher.checkpoint):
        raise ValueError("config.teacher is empty: set teacher.checkpoint, teacher.hf_path or teacher.preset")
    if config.teacher.checkpoint and not os.path.exists(config.teacher.checkpoint):
        raise FileNotFoundError(f"teacher.checkpoint {config.teacher.checkpoint} does not exist (the quickstart "
                                f"distils the SFT quickstart: run `posttrain-jax sft` first)")


def _vocab(student, teacher, tokenizer) -> int | None:
    """The logits both models share: all of them, or the tokenizer's part when the tables are padded differently."""
    s, t = student.config.vocab_size, teacher.config.vocab_size
    if s == t:
        return None
    if min(s, t) < tokenizer.vocab_size:
        raise ValueError(f"student vocab_size {s} and teacher vocab_size {t} differ and one is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}: they do not share a tokenizer")
    log.info("student (%d) and teacher (%d) vocabularies differ: comparing the tokenizer's %d tokens", s, t,
             tokenizer.vocab_size)
    return tokenizer.vocab_size


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Distil `teacher` into `model` (continuing from the latest checkpoint with `resume`); returns a summary."""
    if not config.tokenizer:
        raise ValueError("config.tokenizer is empty: set it to the tokenizer student and teacher share")
    tokenizer = load_tokenizer(config.tokenizer)
    _check(config, tokenizer)
    d, t = config.distill, config.train
    beta = divergence_beta(d.divergence, d.beta)
    mesh, rules = mesh_and_rules(config)
    specs = [SourceSpec(s["path"], weight=s.get("weight"), epochs=s.get("epochs", 1.0) * config.data.epochs)
             for s in config.data.sources]
    train_iter, stats = make_sft_pipeline(
        specs, tokenizer, template=config.chat_template, seq_len=config.data.seq_len, global_batch=t.global_batch,
        packing=config.data.packing, train_on=config.data.train_on, length_policy=config.data.length_policy,
        on_bad_row=config.data.on_bad_row, seed=config.seed)
    total_steps = runner.total_steps_of(config, train_iter)
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        lora=config.lora)  # a LoRA student: adapters trained, base frozen
    teacher = build_model(config.teacher, mesh, rules, seed=config.seed + 1, vocab_size=tokenizer.vocab_size)
    vocab = _vocab(model, teacher, tokenizer)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    shards = data_shards(mesh)
    shard = lambda b: shard_batch(b, mesh, rules)  # noqa: E731
    on_policy = lambda step: is_on_policy(config.seed, step, d.lambda_on_policy)  # noqa: E731

    topk_fn = cache_dir = None
    if d.teacher_topk:
        topk_fn = make_teacher_topk(teacher_graphdef, k=d.teacher_topk, temperature=d.temperature, vocab_size=vocab,
                                    mesh=mesh, rules=rules)
        if d.cache_teacher:
            cache_dir = os.path.join(config.output_dir, "teacher_topk")
            fingerprint = hashlib.sha256(json.dumps(
                {"data": config.data.to_dict(), "teacher": config.teacher.to_dict(), "k": d.teacher_topk,
                 "temperature": d.temperature, "batch": t.global_batch, "seed": config.seed, "steps": total_steps,
                 "lambda": d.lambda_on_policy}, sort_keys=True, default=str).encode()).hexdigest()
            with jax.set_mesh(mesh):
                cache_teacher_topk(cache_dir, fingerprint, train_iter, topk_fn, teacher_params, shard, mesh,
                                   steps=total_steps, skip=on_policy)
            if not d.lambda_on_policy:
                teacher_params = None  # every step reads the cache: the teacher leaves memory

    evaluate, teacher_eval = None, None
    if config.eval.path:
        rewards = build_rewards([dict(r) for r in config.rewards], mesh=local_mesh())
        evaluator = make_evaluator(config, config.eval.path, nnx.graphdef(model), model.config, mesh=mesh,
                                   rules=rules, tokenizer=tokenizer, rewards=rewards, prompt_options=config.eval)
        evaluate = evaluator
        if config.eval.teacher and teacher_params is not None:
            teacher_eval = make_evaluator(config, config.eval.path, teacher_graphdef, teacher.config, mesh=mesh,
                                          rules=rules, tokenizer=tokenizer, rewards=rewards,
                                          prompt_options=config.eval)(teacher_params, desc="eval teacher")

    sampler = sampling = None
    if d.lambda_on_policy:
        sampler = Sampler(nnx.graphdef(model), model.config, mesh=mesh, rules=rules)
        sampling = SamplingParams(max_new_tokens=config.data.seq_len - d.max_prompt_length,
                                  temperature=d.sampling_temperature, pad_token=pad,
                                  stop_tokens=stop_tokens_for(tokenizer, config.chat_template))
    counts = {"on_policy_steps": 0}

    def prepare(host_batch, step, state):
        online = on_policy(step)
        if online:
            counts["on_policy_steps"] += 1
            host_batch = on_policy_batch(host_batch, sampler, state.params, sampling,
                                         jax.random.fold_in(jax.random.key(config.seed), step),
                                         max_prompt_length=d.max_prompt_length, pad=pad)
        if cache_dir is not None and not online:
            return shard({**host_batch, **load_cached(cache_dir, step)})
        batch = shard(host_batch)
        if topk_fn is not None:
            batch["teacher_logps"], batch["teacher_ids"] = topk_fn(teacher_params, batch)
        return batch

    objective = make_distill_objective(t.loss_aggregation, beta=beta, temperature=d.temperature,
                                       sft_weight=d.sft_weight, data_shards=shards,
                                       loss_chunk_size=t.loss_chunk_size or None, teacher_graphdef=teacher_graphdef,
                                       vocab_size=vocab)
    del teacher
    summary = runner.run(
        config, mesh=mesh, rules=rules, model=model, train_iter=train_iter, resume=resume, total_steps=total_steps,
        seq_len=config.data.seq_len, evaluate=evaluate, objective=objective,
        denominator=make_sft_denominator(t.loss_aggregation, accum_steps=t.accum_steps, data_shards=shards,
                                         sum_constant=t.sum_constant or None),
        prepare=prepare, prepare_uses_state=True, frozen=None if d.teacher_topk else teacher_params,
        derived=lambda m: {"divergence_per_token": float(m["divergence_sum"]) / max(float(m["loss_tokens"]), 1.0)})
    summary.update(data=stats.to_dict(), on_policy_steps=counts["on_policy_steps"], teacher_eval=teacher_eval,
                   teacher_topk_cache=cache_dir)
    if jax.process_index() == 0 and "eval_after" in summary:
        b, a = summary["eval_before"], summary["eval_after"]
        line = f"held-out greedy accuracy: student {b.get('accuracy', float('nan')):.1%} -> " \
               f"{a.get('accuracy', float('nan')):.1%}"
        if teacher_eval:
            line += f" (teacher {teacher_eval.get('accuracy', float('nan')):.1%})"
        print(line)
    print_paths(summary)
    return summary
