"""Reward-model (Bradley-Terry) loss and the pooling of per-token scores into sequence rewards.

Preference batches name their sequences with `sequence_ids` [rows, length] int32:
0 is padding, the chosen response of pair p is 2p+1 and the rejected one 2p+2.
Ids are unique over the whole micro-batch, so rows may be padded (one sequence
per row) or packed (several sequences per row, even a pair split across rows).
The data pipeline numbers pairs per row instead; `dpo.batch_sequence_ids`
converts its `segment_ids` (pair (r, k) -> p = r * pairs_per_row + k).

Like every loss here, `bradley_terry_loss` returns SUMS over the real pairs
(`pair_mask` = 1); the train step divides by the global number of pairs once.
Dividing the returned sums by `metrics["num_pairs"]` gives the per-pair means
TRL's `RewardTrainer` reports (checked in tests/losses against TRL 1.16.0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pair_weights(pair_mask: jax.Array | None, like: jax.Array) -> jax.Array:
    if pair_mask is None:
        return jnp.ones(like.shape, jnp.float32)
    return pair_mask.astype(jnp.float32)


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *,
                       pair_mask: jax.Array | None = None, margin: jax.Array | float | None = None,
                       center_coef: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry pairwise loss, summed over real pairs.

    Per pair p:
        loss_p = -log_sigmoid(r_c - r_r - margin_p) + center_coef * (r_c + r_r)^2

    - `margin` (Llama 2's RM; Llama 3 dropped it): a scalar or [pairs] array of
      how much better chosen is rated; TRL passes it as the dataset column `margin`.
    - `center_coef` (TRL's `center_rewards_coefficient`, Eisenstein et al. 2023):
      TRL adds `coef * mean((r_c + r_r)^2)` over the batch, which is the per-pair
      term above averaged over the same pairs, so sum / num_pairs matches it.

    Args:
      chosen_rewards, rejected_rewards: [pairs] scalar rewards (any float dtype).
      pair_mask: [pairs] 1 for real pairs, 0 for padding pairs (None = all real).
    Returns:
      (loss_sum [], metrics) where every metric is a [] float32 sum over real pairs:
      `num_pairs`, `bt_loss` (the log-sigmoid part), `center_loss` (the centring
      part, before `center_coef`), `accuracy` (count of r_c > r_r), `margin`
      (r_c - r_r, without the input margin), `rewards_chosen`, `rewards_rejected`,
      `rewards` and `rewards_sq` (over both responses: mean = rewards / (2 num_pairs)).
    """
    chosen = chosen_rewards.astype(jnp.float32)
    rejected = rejected_rewards.astype(jnp.float32)
    weights = _pair_weights(pair_mask, chosen)
    difference = chosen - rejected
    logits = difference if margin is None else difference - jnp.asarray(margin, jnp.float32)
    bt = -jax.nn.log_sigmoid(logits)
    center = jnp.square(chosen + rejected)
    per_pair = bt + jnp.float32(center_coef) * center
    # `where` rather than multiply: a padding pair holding inf/nan must contribute exactly nothing.
    real = weights > 0

    def total(values):
        return jnp.sum(jnp.where(real, values * weights, 0.0))

    metrics = {
        "num_pairs": jnp.sum(weights),
        "bt_loss": total(bt),
        "center_loss": total(center),
        "accuracy": total((chosen > rejected).astype(jnp.float32)),
        "margin": total(difference),
        "rewards_chosen": total(chosen),
        "rewards_rejected": total(rejected),
        "rewards": total(chosen + rejected),
        "rewards_sq": total(jnp.square(chosen) + jnp.square(rejected)),
    }
    return total(per_pair), metrics


def reward_metric_means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-pair means (and reward std over both responses) from globally summed RM metrics."""
    pairs = jnp.maximum(sums["num_pairs"], 1.0)
    responses = 2.0 * pairs
    mean_reward = sums["rewards"] / responses
    variance = jnp.maximum(sums["rewards_sq"] / responses - jnp.square(mean_reward), 0.0)
    return {
        "accuracy": sums["accuracy"] / pairs,
        "margin": sums["margin"] / pairs,
        "rewards_chosen": sums["rewards_chosen"] / pairs,
        "rewards_rejected": sums["rewards_rejected"] / pairs,
        "reward_mean": mean_reward,
        "reward_std": jnp.sqrt(variance),
    }


def last_token_positions(sequence_ids: jax.Array, num_sequences: int) -> tuple[jax.Array, jax.Array]:
    """Flat index (row * length + column) of the last token of each sequence id 0..num_sequences-1.

    Returns (positions [num_sequences] int32, present [num_sequences] bool); an
    absent id gets position 0 and present False. Ids >= num_sequences are ignored.
    """
    flat_ids = sequence_ids.reshape(-1).astype(jnp.int32)
    flat_positions = jnp.arange(flat_ids.shape[0], dtype=jnp.int32)
    # segment_max fills empty segments with the dtype's minimum, hence the clamp and `present`.
    last = jax.ops.segment_max(flat_positions, flat_ids, num_segments=num_sequences)
    present = last >= 0
    return jnp.where(present, last, 0), present


def sequence_rewards(scores: jax.Array, sequence_ids: jax.Array,
                     num_pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rewards of a scalar head read at each sequence's last token.

    A scalar head outputs one score per position; the reward of a sequence is the
    score at its last token (what Hugging Face sequence-classification models pool).
    Make sure the last token of every sequence is the one the head should be read
    at (normally EOS): the data pipeline, not this function, decides that.

    Args:
      scores: [rows, length] float, the head's output per position.
      sequence_ids: [rows, length] int32, 0 padding, chosen of pair p = 2p+1,
        rejected = 2p+2, unique in the batch; rows may be padded or packed (from
        the pipeline's per-row pair segment ids: `dpo.batch_sequence_ids`).
      num_pairs: static number of pair slots.
    Returns:
      (chosen_rewards [pairs], rejected_rewards [pairs], pair_mask [pairs] float32):
      rewards are float32 and 0 for absent sequences; pair_mask is 1 where both
      responses of the pair are present.
    """
    positions, present = last_token_positions(sequence_ids, 2 * num_pairs + 1)
    picked = jnp.where(present, scores.reshape(-1).astype(jnp.float32)[positions], 0.0)
    chosen, rejected = picked[1::2], picked[2::2]
    pair_mask = (present[1::2] & present[2::2]).astype(jnp.float32)
    return chosen, rejected, pair_mask
