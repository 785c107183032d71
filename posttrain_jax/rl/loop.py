"""The one RL loop: rollout -> score -> minibatches x epochs of policy (and critic) updates -> metrics.

Per step: `prompts_per_step` prompts -> `group_size` completions each, sampled by the jitted
sampler on the training mesh (`RolloutQueue`: up to `max_staleness` steps ahead) -> rewards ->
one jitted scoring pass (old / reference log-probs, critic values, token rewards, advantages;
`objectives.make_score_rollout`) -> `num_epochs` passes over `num_minibatches` minibatches, each
one jitted train step of the policy (and, for PPO, one of the critic, its own optimizer).

With one update per rollout and no KL in the reward the pre-update log-probs are the update's
own forward (stop_gradient; ratio exactly 1, as TRL); otherwise they come from the scoring pass.
Every step reports the gap between those and the sampler's log-probs (`rollout_logp_abs_diff`,
`rollout_kl`), which is where bf16 sampling or stale parameters show.

Checkpoints hold the policy's train state (the layout `posttrain-jax grpo` always wrote, so
`export`, `sample` and `model.checkpoint` read it) plus, for PPO, the critic's under "critic";
the prompt position saved excludes rollouts produced ahead, which a resumed run samples again.

LoRA / QLoRA (an enabled `lora` section; `train.trainable_split`): the train state,
its optimizer moments and the checkpoints hold only the adapters; the frozen (possibly quantized)
base is an argument of the jitted train step, the sampler and the scoring pass get base +
adapters joined as one state over the same arrays (nothing merged or copied per step), and the
KL reference is the base graph without adapters over those same base arrays. A PPO critic is
LoRA too (`rl.critic`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.checkpointing import RunCheckpointer
from posttrain_jax.checkpointing.metadata import run_metadata
from posttrain_jax.mesh import local_mesh, mesh_and_rules
from posttrain_jax.metrics import MetricsWriter, progress_bar
from posttrain_jax.models.from_config import build_model
from posttrain_jax.models.lora import base_graphdef, dropout_rate
from posttrain_jax.rewards import build_rewards
from posttrain_jax.rl.critic import build_critic
from posttrain_jax.rl.curriculum import CurriculumIterator
from posttrain_jax.rl.evaluation import global_rows, make_evaluate, quickstart_data
from posttrain_jax.rl.objectives import make_policy_denominator, make_policy_objective, make_score_rollout
from posttrain_jax.rl.rollout import RolloutQueue, rollout_batch
from posttrain_jax.rl.settings import RLSettings
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sharding import batch_sharding, data_shards, logical_rules, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.train import (TrainState, init_train_state, jit_train_step, make_train_step, optimizer_from_config,
                                 trainable_split)
from posttrain_jax.train.loop import print_paths, resume_from_latest
from posttrain_jax.train.step import split_microbatches
from posttrain_jax.data.prompts import load_prompts, PromptIterator
from posttrain_jax.rl.rollout import sample_and_score
from posttrain_jax.sampling.text import stop_tokens_for

log = logging.getLogger(__name__)

FORWARD_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
PER_ROW = ("scores", "sample_mask")  # [rows]; every other batch array is [rows, width]


def policy_keys(s: RLSettings) -> list[str]:
    keys = [*FORWARD_KEYS, "advantages", "sample_mask", "behaviour_logps"]
    keys += ["ref_logps"] if s.needs_reference else []
    keys += ["old_logps"] if s.needs_old_logps else []
    return keys


CRITIC_KEYS = [*FORWARD_KEYS, "sample_mask", "values", "returns"]


def _checkpoint_tree(state: TrainState, critic: TrainState | None):
    if critic is None:
        return state
    return {**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, "critic": critic}


def _from_checkpoint_tree(tree, critic: TrainState | None):
    if critic is None:
        return tree, None
    return TrainState(**{f.name: tree[f.name] for f in dataclasses.fields(TrainState)}), tree["critic"]


class _DataState:
    """What a checkpoint stores of the prompt stream: its position minus the rollouts produced ahead."""

    def __init__(self, prompts, queue_pending):
        self.prompts, self.pending = prompts, queue_pending

    def get_state(self) -> dict:
        state = self.prompts.get_state()
        return {**state, "step": state["step"] - self.pending()}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state)


def run(config, s: RLSettings, *, resume: bool = False) -> dict:
    """Train the policy of `config` with the settings `s`; returns a summary (paths, history, evals, params)."""
    started = time.time()
    if config.data.quickstart_task:
        quickstart_data(config)
    if not config.data.path:
        raise ValueError("config.data.path is empty: give a JSONL file of prompts (or set data.quickstart_task)")
    sc, t, d = config.sampling, config.train, config.data
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    prompts, prompt_stats = load_prompts(d.path, tokenizer, template=config.chat_template,
                                         max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                                         on_bad_row=d.on_bad_row)
    log.info(prompt_stats.report(d.path))
    prompt_iter = PromptIterator(prompts, s.prompts_per_step, seed=config.seed, epochs=d.epochs)
    total_steps = t.steps or prompt_iter.num_batches
    # A reward model is sharded over this process's devices: each process scores its own completions.
    rewards = build_rewards([dict(r) for r in config.rewards], mesh=local_mesh())
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        lora=config.get("lora"))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sampling = SamplingParams(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                              top_p=sc.top_p, stop_tokens=stop_tokens_for(tokenizer, config.chat_template,
                                                                          sc.stop_tokens),
                              pad_token=pad, num_samples=s.group_size)
    critic_warmup = config.critic.critic_only_steps if "critic" in config else 0
    if critic_warmup and not s.uses_critic:
        raise ValueError(f"critic.critic_only_steps={critic_warmup}: rl.algorithm={s.algorithm} (advantage "
                         f"{s.advantage}) has no critic; set it to 0 or use algorithm=ppo")
    if not 0 <= critic_warmup < total_steps:
        raise ValueError(f"critic.critic_only_steps={critic_warmup} must be in [0, {total_steps}) (the run's "
                         f"steps: train.steps or one pass over the prompts)")
    updates = (total_steps - critic_warmup) * s.updates_per_rollout  # the policy's schedule skips the warmup
    tx, schedule = optimizer_from_config(config.optim, updates)
    # LoRA: `base` is the frozen rest of the model and `full(params)` joins it back (no copy).
    trainable, base, full = trainable_split(model)
    graphdef, state = init_train_state(model, tx, seed=config.seed, mesh=mesh, trainable=trainable)
    # The reference is frozen (rebuilt identically on resume): for LoRA the base with adapters off over
    # the policy's own base arrays (with lora.adapter set, the base without that adapter, as TRL and our
    # DPO do), else a copy of the initial policy (the step donates the params).
    reference_graphdef = base_graphdef(model) if base is not None else None
    reference = None
    if s.needs_reference:
        reference = base if base is not None else jax.tree.map(jnp.copy, state.params)
    metadata = run_metadata(config, model)
    shards = data_shards(mesh)
    rows_sharding = {k: batch_sharding(mesh, rules, 1 if k in PER_ROW else 2) for k in policy_keys(s) + CRITIC_KEYS}
    objective = make_policy_objective(s, temperature=sc.temperature)
    step = make_train_step(graphdef, tx, objective,
                           make_policy_denominator(s, max_completion_length=sc.max_new_tokens),
                           accum_steps=t.accum_steps, data_shards=shards, schedule=schedule,
                           dropout=False)  # off in RL, as TRL does: ratios, KL and the rollout gap compare like with like
    if dropout_rate(model) > 0:
        log.warning("lora.dropout=%s is ignored in RL: the sampler, the scoring pass and the update must run the "
                    "same function for the ratio to be 1 on-policy", dropout_rate(model))
    step_fn = jit_train_step(step, state, {k: rows_sharding[k] for k in policy_keys(s)}, base=base)
    critic_graphdef = critic_state = critic_fn = None
    critic_full = lambda params: params  # noqa: E731
    if s.uses_critic:
        critic_graphdef, critic_state, critic_fn, critic_full = build_critic(
            config, mesh, rules, total_updates=total_steps * s.updates_per_rollout, data_shards=shards,
            batch_shardings={k: rows_sharding[k] for k in CRITIC_KEYS})
    score_fn = jax.jit(make_score_rollout(s, graphdef, critic_graphdef, temperature=sc.temperature,
                                          data_shards=shards, reference_graphdef=reference_graphdef))
    update_keys = sorted(set(policy_keys(s) + (CRITIC_KEYS if s.uses_critic else [])))

    def split(batch):  # minibatches as separate global arrays: eager indexing of a multi-process array fails
        parts = split_microbatches({k: batch[k] for k in update_keys}, s.num_minibatches, shards)
        return [{k: v[i] for k, v in parts.items()} for i in range(s.num_minibatches)]

    split_fn = jax.jit(split, out_shardings=[{k: rows_sharding[k] for k in update_keys}] * s.num_minibatches)
    sampler = Sampler(graphdef, model.config, mesh=mesh, rules=rules)
    del model  # the train state holds the params from here on
    evaluate = make_evaluate(config, sampler, tokenizer, rewards, pad) if d.eval_path else None
    base_key = jax.random.key(config.seed)

    def produce(step_num: int, params):
        t0 = time.time()
        local = next(source)
        rollout = sample_and_score(sampler, params, local, sampling, jax.random.fold_in(base_key, step_num),
                                   tokenizer=tokenizer, rewards=rewards, max_prompt_length=d.max_prompt_length)
        return rollout, time.time() - t0

    source = prompt_iter
    if s.curriculum == "reward_variance":
        source = CurriculumIterator(prompt_iter, s.curriculum_pool_steps, score=lambda rows: _reward_variance(
            sampler, full(state.params), rows, sampling, jax.random.fold_in(base_key, 1_000_000 + prompt_iter.step),
            tokenizer=tokenizer, rewards=rewards, max_prompt_length=d.max_prompt_length))
    queue = RolloutQueue(produce, max_staleness=s.max_staleness, last_step=total_steps)
    data_state = _DataState(source, lambda: queue.pending)

    checkpointer = RunCheckpointer(os.path.join(config.output_dir, "checkpoints"), keep=t.keep_checkpoints,
                                   async_save=t.async_checkpoint)
    start = 0
    if resume:
        tree, start = resume_from_latest(checkpointer, _checkpoint_tree(state, critic_state), data_state)
        state, critic_state = _from_checkpoint_tree(tree, critic_state)
    writer = MetricsWriter(config.output_dir)
    summary = {"output_dir": config.output_dir, "checkpoints": checkpointer.directory.as_posix(),
               "metrics": writer.path, "total_steps": total_steps, "prompts": prompt_stats.__dict__,
               "algorithm": s.algorithm}
    if evaluate is not None:
        summary["eval_before"] = evaluate(full(state.params))
        writer.log(start, summary["eval_before"], prefix="eval")
    bar = progress_bar(total_steps, initial=start)
    step_num, last_saved, history = start, start, []

    def save(at: int) -> None:
        checkpointer.save(at, _checkpoint_tree(state, critic_state), data_state=data_state.get_state(),
                          metadata=metadata, force=True)

    with jax.set_mesh(mesh), logical_rules(rules):
        while step_num < total_steps:
            try:
                rollout, t_sample = queue.next(step_num + 1, full(state.params))
            except StopIteration:
                log.warning("prompts ran out after %d of %d steps", step_num, total_steps)
                break
            step_num += 1
            t1 = time.time()
            host = rollout_batch(rollout, pad, missing_eos_penalty=s.missing_eos_penalty)
            batch = shard_batch(host, mesh, rules)
            scored, stats = score_fn(full(state.params), reference,
                                     critic_full(critic_state.params) if critic_state else None, batch)
            minibatches = split_fn(scored)
            policy_metrics, critic_metrics = [], []
            for _ in range(s.num_epochs):
                for mb in minibatches:
                    if critic_fn is not None:
                        critic_state, cm = critic_fn(critic_state, {k: mb[k] for k in CRITIC_KEYS})
                        critic_metrics.append(cm)
                    if step_num > critic_warmup:
                        state, m = step_fn(state, {k: mb[k] for k in policy_keys(s)})
                        policy_metrics.append(m)
            policy_metrics, critic_metrics, stats = jax.device_get((policy_metrics, critic_metrics, stats))
            t_train = time.time() - t1
            row = step_metrics(rollout, host, stats, policy_metrics, critic_metrics, t_sample, t_train, s)
            row = writer.log(step_num, row)
            history.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['train/reward_mean']:.3f}", acc=f"{row.get('train/accuracy', 0):.2f}",
                            gen_tok_s=f"{row['train/rollout_tokens_per_s']:.0f}")
            if evaluate is not None and t.eval_every and step_num % t.eval_every == 0 and step_num < total_steps:
                writer.log(step_num, evaluate(full(state.params)), prefix="eval")
            if t.checkpoint_every and step_num % t.checkpoint_every == 0:
                save(step_num)
                last_saved = step_num
    bar.close()
    if step_num > last_saved:
        save(step_num)
    checkpointer.wait()
    checkpointer.close()
    if evaluate is not None:
        summary["eval_after"] = evaluate(full(state.params))
        writer.log(step_num, summary["eval_after"], prefix="eval")
    writer.close()
    compilations = {"train_step": step_fn._cache_size(), "sampler": sampler.compilations(),
                    "score": score_fn._cache_size()}
    if critic_fn is not None:
        compilations["critic_step"] = critic_fn._cache_size()
    summary.update(final_step=step_num, wall_time_s=time.time() - started, history=history,
                   params=full(state.params), graphdef=graphdef, compilations=compilations,
                   critic_params=critic_full(critic_state.params) if critic_state else None,
                   critic_graphdef=critic_graphdef)
    if jax.process_index() == 0 and evaluate is not None:
        b, a = summary["eval_before"], summary["eval_after"]
        # accuracy needs a verifiable reward; with only reward models / formats the mean reward stands in
        what, greedy, sampled = (("accuracy", "accuracy", "sampled_accuracy") if "accuracy" in a else
                                 ("mean reward", "reward_mean", "sampled_reward_mean"))
        fmt = (lambda v: f"{v:.1%}") if what == "accuracy" else (lambda v: f"{v:.3f}")  # noqa: E731
        line = f"held-out {what} ({int(a['prompts'])} prompts): greedy {fmt(b[greedy])} -> {fmt(a[greedy])}"
        if sampled in a:
            of = f"pass@1 of {d.eval_samples}" if what == "accuracy" else f"{d.eval_samples} samples"
            line += (f"; sampled at temperature {sc.temperature} ({of}) "
                     f"{fmt(b[sampled])} -> {fmt(a[sampled])}")
        print(f"[{s.algorithm}] {line}")
    print_paths(summary)
    return summary


def _reward_variance(sampler, params, rows, sampling, key, **kwargs) -> np.ndarray:
    """[len(rows)] variance of each prompt's reward over `group_size` samples of the current policy."""
    rollout = sample_and_score(sampler, params, rows, sampling, key, **kwargs)
    return rollout.rewards.total.reshape(len(rows), sampling.num_samples).var(axis=1)


def _token_means(metrics: list[dict], prefix: str = "") -> dict[str, float]:
    """Token-mean of every summed per-token metric over all updates of the step."""
    tokens = max(sum(float(m["num_tokens"]) for m in metrics), 1.0)
    skip = {"num_tokens", "loss", "denominator", "grad_norm", "learning_rate"}
    keys = [k for k in metrics[0] if k not in skip]
    return {prefix + k: sum(float(m[k]) for m in metrics) / tokens for k in keys}


def step_metrics(rollout, host, stats, policy_metrics, critic_metrics, t_sample, t_train,
                 s: RLSettings) -> dict[str, float]:
    totals = global_rows(rollout.rewards.total.astype(np.float32))
    lengths = global_rows(rollout.lengths.astype(np.float32))
    stopped = global_rows(rollout.stopped.astype(np.float32))
    out = {"reward_mean": float(totals.mean()), "reward_std": float(totals.std()),
           "completion_length_mean": float(lengths.mean()), "completion_length_min": float(lengths.min()),
           "completion_length_max": float(lengths.max()), "truncated_fraction": float(1.0 - stopped.mean()),
           "rollout_tokens_per_s": float(lengths.sum()) / max(t_sample, 1e-9),
           "train_tokens_per_s": float(np.count_nonzero(host["segment_ids"]) * jax.process_count()
                                       * s.num_epochs) / max(t_train, 1e-9),
           "rollout_time_s": t_sample, "train_time_s": t_train}
    out.update({k: float(v) for k, v in stats.items()})
    out.update(rollout.rewards.metrics(prefix="rewards"))  # per reward function (local rows)
    verifiable = [k for k in out if k.endswith("/accuracy")]
    if verifiable:
        out["accuracy"] = out[verifiable[0]]
    out["policy_updated"] = float(bool(policy_metrics))  # 0 during critic.critic_only_steps
    if not policy_metrics:
        return _critic_metrics(out, critic_metrics)
    means = _token_means(policy_metrics)
    out.update(loss=float(np.mean([float(m["loss"]) for m in policy_metrics])),
               grad_norm=float(np.mean([float(m["grad_norm"]) for m in policy_metrics])),
               learning_rate=float(policy_metrics[-1].get("learning_rate", 0.0)),
               clip_low_fraction=means.pop("is_low_clipped"), clip_high_fraction=means.pop("is_high_clipped"),
               clip_fraction=means.pop("is_region_clipped"), ratio_mean=means.pop("ratio"))
    if "is_weight" in means:
        means["is_weight_mean"] = means.pop("is_weight")
    if "is_dual_clipped" in means:
        means["dual_clip_fraction"] = means.pop("is_dual_clipped")
    out.update(means)
    return _critic_metrics(out, critic_metrics)


def _critic_metrics(out: dict, critic_metrics) -> dict:
    if critic_metrics:
        values = _token_means(critic_metrics)
        out.update(value_loss=values["value_loss"], value_clip_fraction=values["value_clipped"],
                   value_error=values["value_error"],
                   critic_grad_norm=float(np.mean([float(m["grad_norm"]) for m in critic_metrics])))
    return out
