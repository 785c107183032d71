"""What the jitted steps compute: the scoring pass over a rollout, and the policy / critic objectives.

A rollout batch (global, sharded over the batch axes) holds prompt + completion rows laid out as
`rl.rollout.training_batch` builds them (tokens, targets, positions, segment_ids,
loss_mask [rows, width]) plus `behaviour_logps` [rows, width] (the sampler's log-probs at the
loss positions), `scores` [rows] (the summed rewards) and `sample_mask` [rows].

`make_score_rollout` adds what the updates need in one jitted pass: `old_logps` / `ref_logps` /
`values` (training forwards, no gradient), token rewards, `advantages` and `returns` [rows, width].
Log-probs are those of log_softmax(logits / T), T the sampling temperature, as in TRL, so they
are comparable with the sampler's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posttrain_jax.losses.grpo import grpo_denominator, grpo_metric_sums, grpo_token_weights
from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.rl import advantages as adv
from posttrain_jax.rl.kl import behaviour_gap, kl_estimate
from posttrain_jax.rl.policy_loss import masked, sequence_policy_loss, token_policy_loss, truncated_is_weights
from posttrain_jax.rl.settings import RLSettings
from posttrain_jax.rl.value_loss import clipped_value_loss, explained_variance
from posttrain_jax.train.step import split_microbatches


def completion_logps(model, hidden, targets, *, temperature: float, chunk_size: int | None,
                     with_entropy: bool = False):
    """log p(targets) [rows, length] float32 (and the entropy) from final hidden states, through the fused,
    chunked LM-head kernel (`losses.logprobs.lm_head_logprobs`): the one call of it in RL."""
    return lm_head_logprobs(model, hidden, targets, temperature=temperature, chunk_size=chunk_size,
                            with_entropy=with_entropy)


def sequence_token_logps(model, batch, *, temperature: float = 1.0, chunk_size: int | None = None) -> jax.Array:
    """log p(targets) [rows, length] float32 under `model` (no gradient needed: old policy, reference)."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return completion_logps(model, hidden, batch["targets"], temperature=temperature, chunk_size=chunk_size).logps


def token_values(model, batch) -> jax.Array:
    """A scalar-head model's V(s_t) [rows, length] float32: position p values the state before targets[p]."""
    return model(batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)


def _unsplit(x: jax.Array, data_shards: int) -> jax.Array:
    """Inverse of `split_microbatches`: [chunks, rows // chunks, ...] -> [rows, ...]."""
    chunks, micro_rows = x.shape[:2]
    x = x.reshape(chunks, data_shards, micro_rows // data_shards, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(chunks * micro_rows, *x.shape[3:])


def _chunked(fn, batch, chunks: int, data_shards: int):
    """fn(rows) -> [rows, ...] over the batch in `chunks` row chunks (one chunk's activations live at a time)."""
    if chunks == 1:
        return fn(batch)
    split = split_microbatches(batch, chunks, data_shards)
    return _unsplit(jax.lax.map(fn, split), data_shards)


def make_score_rollout(s: RLSettings, policy_graphdef: nnx.GraphDef, critic_graphdef: nnx.GraphDef | None, *,
                       temperature: float, data_shards: int, reference_graphdef: nnx.GraphDef | None = None):
    """`score(policy_params, ref_params, critic_params, batch) -> (batch + derived keys, stats)`.

    Params are whole model states (`nnx.merge(graphdef, params)` is the model).
    ref_params / critic_params may be None when the settings need no reference / critic.
    reference_graphdef: the reference's graph when it is not the policy's (LoRA: the base graph
    without adapters, merged with the policy's own frozen base arrays as ref_params).
    Added keys: `advantages`, `sample_mask` (zero-std groups dropped with filter_zero_std),
    and when needed `old_logps`, `ref_logps`, `values`, `returns`. `stats` are [] float32 means
    over the completion tokens of the whole batch (explained variance of the pre-update values...).
    """
    chunk = s.loss_chunk_size or None

    def logps_of(graphdef, params):
        return lambda b: sequence_token_logps(nnx.merge(graphdef, params), b, temperature=temperature,
                                              chunk_size=chunk)

    def score(policy_params, ref_params, critic_params, batch):
        batch = dict(batch)
        mask = (batch["loss_mask"] > 0).astype(jnp.float32)
        forward_keys = ("tokens", "targets", "positions", "segment_ids")
        rows_only = {k: batch[k] for k in forward_keys}
        if s.needs_old_logps:
            batch["old_logps"] = _chunked(logps_of(policy_graphdef, policy_params), rows_only, s.forward_chunks,
                                          data_shards)
        if s.needs_reference:
            batch["ref_logps"] = _chunked(logps_of(reference_graphdef or policy_graphdef, ref_params), rows_only,
                                          s.forward_chunks, data_shards)
        if s.uses_critic:
            batch["values"] = _chunked(lambda b: token_values(nnx.merge(critic_graphdef, critic_params), b),
                                       rows_only, s.forward_chunks, data_shards) * mask
        scores = batch["scores"].astype(jnp.float32)
        token_rewards = adv.outcome_token_rewards(scores, mask)
        stats = {}
        if s.kl_in_reward:
            # verl's apply_kl_penalty and TRL RLOO: the KL of the pre-update policy, no gradient.
            kl = masked(kl_estimate(batch["old_logps"], batch["ref_logps"], s.kl_estimator), mask)
            token_rewards = token_rewards - s.kl_in_reward * kl
            stats["reward_kl"] = adv.masked_mean(kl, mask)
        sample_mask = batch["sample_mask"].astype(jnp.float32)
        # The outcome estimators see one reward per completion: the score minus its summed KL penalty, if any.
        sequence_rewards = jnp.sum(token_rewards * mask, axis=1) if s.kl_in_reward else scores
        if s.advantage == "group":
            group = adv.group_advantages(sequence_rewards, s.group_size, scale=s.advantage_scale,
                                         std_ddof=s.std_ddof, eps=s.advantage_eps)
            per_row = group.advantages
            stats["zero_std_fraction"] = jnp.mean(group.zero_std.astype(jnp.float32))
            if s.filter_zero_std:
                sample_mask = sample_mask * (1.0 - group.zero_std.astype(jnp.float32))
            advantages = per_row[:, None] * mask
        elif s.advantage == "rloo":
            per_row = adv.rloo_advantages(sequence_rewards, s.group_size, normalize=s.normalize_advantages)
            advantages = per_row[:, None] * mask
        elif s.advantage == "reinforce_pp":
            advantages, batch["returns"] = adv.reinforce_pp_advantages(token_rewards, mask, gamma=s.gamma)
        else:
            advantages, returns = adv.gae_advantages(token_rewards, batch["values"], mask, gamma=s.gamma,
                                                     lam=s.lam, whiten=s.whiten_advantages)
            batch["returns"] = returns * mask
            stats["explained_variance"] = explained_variance(batch["values"], returns, mask)
            stats["values_mean"] = adv.masked_mean(batch["values"], mask)
            stats["returns_mean"] = adv.masked_mean(returns, mask)
        batch["advantages"], batch["sample_mask"] = advantages, sample_mask
        stats["advantages_mean"] = adv.masked_mean(advantages, mask)
        stats["advantages_abs_mean"] = adv.masked_mean(jnp.abs(advantages), mask)
        return batch, stats

    return score


def make_policy_objective(s: RLSettings, *, temperature: float):
    """`objective(model, micro_batch, context) -> (sum of weighted token losses, metric sums)`.

    The behaviour-gap sums (`rollout_logp_abs_diff`, `rollout_kl`) compare the pre-update log-probs
    (the `old_logps`, or this forward's own at the first and only update) with the sampler's.
    Log-probs and the (gradient-free) entropy come from the fused LM head; loss_chunk_size 0 lets
    it pick the chunk.
    """
    chunk = s.loss_chunk_size or None

    def objective(model, mb, context=None):
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        out = completion_logps(model, hidden, mb["targets"], temperature=temperature, chunk_size=chunk,
                               with_entropy=True)
        logps, extra = out.logps, {"entropy": jax.lax.stop_gradient(out.entropy)}
        mask = mb["loss_mask"].astype(jnp.float32)
        old = mb.get("old_logps")
        pre_update = jax.lax.stop_gradient(logps) if old is None else old
        gap = behaviour_gap(masked(pre_update, mask), masked(mb["behaviour_logps"], mask))
        extra["rollout_logp_abs_diff"], extra["rollout_kl"] = gap["abs_diff"], gap["kl"]
        is_weights = None
        if s.tis_cap:
            is_weights = truncated_is_weights(pre_update, mb["behaviour_logps"], mask, cap=s.tis_cap)
            extra["is_weight"] = is_weights
        if s.policy_loss == "token":
            loss, terms = token_policy_loss(logps, old, mb["advantages"], mask, epsilon_low=s.epsilon_low,
                                            epsilon_high=s.epsilon_high, clip_ratio_c=s.clip_ratio_c or None,
                                            is_weights=is_weights)
        else:
            loss, terms = sequence_policy_loss(logps, old, mb["advantages"], mask, epsilon_low=s.epsilon_low,
                                               epsilon_high=s.epsilon_high, ratio=s.sequence_ratio,
                                               max_log_ratio=10.0 if s.sequence_ratio == "mean" else None,
                                               is_weights=is_weights)
        if "ref_logps" in mb:
            kl = jnp.where(mask > 0, kl_estimate(masked(logps, mask), masked(mb["ref_logps"], mask),
                                                 s.kl_estimator), 0.0)
            terms["kl"] = kl
            if s.kl_in_loss:
                loss = loss + jnp.float32(s.kl_in_loss) * kl
        weights = grpo_token_weights(mask, s.loss_aggregation, sample_mask=mb["sample_mask"])
        sums = grpo_metric_sums({**terms, **extra}, mask * mb["sample_mask"][:, None])
        return jnp.sum(loss * weights), sums

    return objective


def make_policy_denominator(s: RLSettings, *, max_completion_length: int):
    def denominator(batch):
        return grpo_denominator(batch["loss_mask"], s.loss_aggregation, sample_mask=batch["sample_mask"],
                                max_completion_length=max_completion_length)
    return denominator


def make_critic_objective(*, value_clip: float | None, vf_coef: float):
    """`objective(critic, micro_batch, context)`: vf_coef * the clipped value loss, summed over tokens."""

    def objective(model, mb, context=None):
        mask = mb["loss_mask"].astype(jnp.float32) * mb["sample_mask"][:, None]
        values = token_values(model, mb)
        loss, terms = clipped_value_loss(values, mb["values"], mb["returns"], mask, clip=value_clip)
        sums = grpo_metric_sums({"value_loss": loss, **terms}, mask)
        return jnp.float32(vf_coef) * jnp.sum(loss * mask), sums

    return objective


def critic_denominator(batch):
    """Token-mean: the completion tokens of the whole global batch."""
    mask = batch["loss_mask"].astype(jnp.float32) * batch["sample_mask"].astype(jnp.float32)[:, None]
    return jnp.maximum(mask.sum(), 1.0)
