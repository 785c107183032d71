"""DPO-family preference losses on sequence log-probabilities, summed over real pairs.

Inputs are per-pair sequence log-probabilities (sums of token log-probs over the
response, from `sequence_logps`) and, for the length-normalised losses, response
lengths. Every loss returns SUMS over the real pairs (`pair_mask` = 1); the train
step divides by the global number of pairs once, which gives the per-pair mean
that TRL / open-instruct report (see tests/losses, goldens made by
scripts/make_preference_goldens.py).

Notation per pair: pi_c, pi_r policy log-probs of chosen / rejected; ref_c, ref_r
the reference's; L_c, L_r response lengths (loss tokens); b = beta; e = label_smoothing.
Chosen / rejected log-ratio: x_c = pi_c - ref_c, x_r = pi_r - ref_r.

Per-pair losses (logsig = log_sigmoid; z = x_c - x_r; z_n = x_c/L_c - x_r/L_r):

- sigmoid:  -(1-e) logsig(b z) - e logsig(-b z). DPO; e > 0 is conservative DPO
  (TRL <= 0.28 `sigmoid`, open-instruct `dpo`).
- robust:   (-(1-e) logsig(b z) + e logsig(-b z)) / (1 - 2e). rDPO (TRL `robust`).
- hinge:    relu(1 - b z). SLiC (TRL `hinge`).
- ipo:      (z_n - 1/(2b))^2. IPO (TRL `ipo`).
- dpo_norm: sigmoid's formula on z_n. Tülu 3's length-normalised DPO
  (open-instruct `dpo_norm`; TRL `sigmoid_norm` is the same at e = 0).
- simpo:    sigmoid's formula with b z replaced by b (pi_c/L_c - pi_r/L_r - gamma_beta_ratio).
  SimPO (open-instruct `simpo`), no reference; SimPO's gamma = b * gamma_beta_ratio.

Definitional choices (checked against the sources, see the golden script):
- TRL 0.29+ dropped label smoothing from `sigmoid` (cDPO); we keep it, with the
  formula of TRL <= 0.28 and open-instruct, and it is exactly DPO at e = 0.
- IPO uses per-token (length-normalised) log-ratios in TRL, both 0.x (log-probs
  averaged before the loss) and 1.x (log-ratios divided by lengths in the loss;
  the IPO authors confirmed the paper's results use this form). Lengths are
  clamped to >= 1 as TRL 1.x does.
- Lengths are counted on the loss mask of each response (TRL: completion mask;
  open-instruct: labels != -100), not including the prompt.
- Reward metrics follow TRL 1.x: rewards = b * (pi - ref) on the SUMMED log-probs
  for every reference-based loss, also ipo and dpo_norm (TRL 0.x's ipo and
  open-instruct's dpo_norm log b * per-token log-ratio, so their accuracy can differ). For simpo
  (no reference) rewards = b * pi / L, as SimPO and open-instruct log them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo")
_ALIASES = {"dpo": "sigmoid", "sigmoid_norm": "dpo_norm"}
_NEEDS_LENGTHS = ("ipo", "dpo_norm", "simpo")
NLL_NORMALIZATIONS = ("token", "sequence")


def batch_sequence_ids(segment_ids: jax.Array, pairs_per_row: int) -> tuple[jax.Array, int]:
    """Per-row pair segment ids -> ids unique in the batch, for `sequence_logps` / `sequence_rewards`.

    The data pipeline numbers pairs per row (pair k of a row: chosen segment
    2k+1, rejected 2k+2; `pair_mask` etc. are [rows, pairs_per_row]). Offsetting
    row r by 2 * pairs_per_row * r makes pair (r, k) the batch pair
    p = r * pairs_per_row + k, so outputs over p are `[rows, pairs_per_row]`
    arrays flattened row-major (`pair_mask.reshape(-1)` lines up).

    Returns (sequence_ids [rows, length] int32, num_pairs = rows * pairs_per_row).
    """
    rows = segment_ids.shape[0]
    offsets = (2 * pairs_per_row * jnp.arange(rows, dtype=jnp.int32))[:, None]
    segment_ids = segment_ids.astype(jnp.int32)
    return jnp.where(segment_ids > 0, segment_ids + offsets, 0), rows * pairs_per_row


def sequence_logps(token_logps: jax.Array, loss_mask: jax.Array, sequence_ids: jax.Array,
                   num_pairs: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sum token log-probs per response with `jax.ops.segment_sum` (padded or packed rows).

    Args:
      token_logps: [rows, length] float, log p of the target at each position.
      loss_mask: [rows, length] 0/1, the response (completion) tokens to count.
      sequence_ids: [rows, length] int32 aligned with `token_logps`: 0 padding,
        chosen of pair p = 2p+1, rejected = 2p+2; ids are unique in the batch
        (from per-row pair segment ids: `batch_sequence_ids`).
      num_pairs: static number of pair slots.
    Returns:
      (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each
      [pairs] float32; lengths count loss tokens; absent pairs give zeros.
    """
    num_segments = 2 * num_pairs + 1
    ids = sequence_ids.reshape(-1).astype(jnp.int32)
    mask = loss_mask.reshape(-1).astype(jnp.float32)
    # `where`, not multiply: masked positions may hold -inf (a padded position's log-prob).
    values = jnp.where(mask > 0, token_logps.reshape(-1).astype(jnp.float32), 0.0)
    logp_sums = jax.ops.segment_sum(values, ids, num_segments=num_segments)
    lengths = jax.ops.segment_sum(mask, ids, num_segments=num_segments)
    return logp_sums[1::2], logp_sums[2::2], lengths[1::2], lengths[2::2]


def _log_sigmoid_pair(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """-(1-e) log_sigmoid(l) - e log_sigmoid(-l): DPO at e = 0, conservative DPO otherwise."""
    loss = -jax.nn.log_sigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
    return loss


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array | None,
             ref_rejected: jax.Array | None, *, loss_type: str = "sigmoid", beta: float,
             label_smoothing: float = 0.0, chosen_lengths: jax.Array | None = None,
             rejected_lengths: jax.Array | None = None, gamma_beta_ratio: float = 0.3,
             pair_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A DPO-family loss summed over real pairs (see the module docstring for each formula).

    Args:
      policy_chosen, policy_rejected: [pairs] summed response log-probs of the policy.
      ref_chosen, ref_rejected: [pairs] the reference model's; ignored (may be None) for simpo.
      loss_type: one of LOSS_TYPES ("dpo" = "sigmoid", "sigmoid_norm" = "dpo_norm").
      beta: the KL / temperature coefficient (IPO's tau; SimPO's beta).
      label_smoothing: e of cDPO (sigmoid, dpo_norm, simpo) or the flip rate of rDPO (robust).
      chosen_lengths, rejected_lengths: [pairs] response loss-token counts; needed by
        ipo, dpo_norm and simpo.
      gamma_beta_ratio: SimPO's target margin over beta (open-instruct default 0.3).
      pair_mask: [pairs] 1 real, 0 padding (None = all real).
    Returns:
      (loss_sum [], metrics): [] float32 sums over real pairs of `num_pairs`,
      `rewards_chosen`, `rewards_rejected`, `rewards_margin`, `rewards_accuracy`
      (count of chosen reward > rejected reward), `logps_chosen`, `logps_rejected`.
    """
    loss_type = _ALIASES.get(loss_type, loss_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES} "
                         f"(or the aliases {sorted(_ALIASES)})")
    if loss_type in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} is length-normalised: pass chosen_lengths and rejected_lengths")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5 (a label-flip rate), got {label_smoothing}")
    if loss_type != "simpo" and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")

    f32 = jnp.float32
    pi_c, pi_r = policy_chosen.astype(f32), policy_rejected.astype(f32)
    beta_f = f32(beta)
    if loss_type in _NEEDS_LENGTHS:
        len_c = jnp.maximum(chosen_lengths.astype(f32), 1.0)
        len_r = jnp.maximum(rejected_lengths.astype(f32), 1.0)

    if loss_type == "simpo":
        reward_c, reward_r = beta_f * pi_c / len_c, beta_f * pi_r / len_r
        logits = reward_c - reward_r - beta_f * f32(gamma_beta_ratio)
        per_pair = _log_sigmoid_pair(logits, label_smoothing)
    else:
        ratio_c = pi_c - ref_chosen.astype(f32)
        ratio_r = pi_r - ref_rejected.astype(f32)
        reward_c, reward_r = beta_f * ratio_c, beta_f * ratio_r
        if loss_type in ("ipo", "dpo_norm"):
            z = ratio_c / len_c - ratio_r / len_r
        else:
            z = ratio_c - ratio_r
        if loss_type in ("sigmoid", "dpo_norm"):
            per_pair = _log_sigmoid_pair(beta_f * z, label_smoothing)
        elif loss_type == "robust":
            eps = label_smoothing
            per_pair = (-(1.0 - eps) * jax.nn.log_sigmoid(beta_f * z)
                        + eps * jax.nn.log_sigmoid(-beta_f * z)) / (1.0 - 2.0 * eps)
        elif loss_type == "hinge":
            per_pair = jax.nn.relu(1.0 - beta_f * z)
        else:  # ipo
            per_pair = jnp.square(z - 1.0 / (2.0 * beta_f))

    weights = jnp.ones(pi_c.shape, f32) if pair_mask is None else pair_mask.astype(f32)
    real = weights > 0

    def total(values):
        return jnp.sum(jnp.where(real, values * weights, 0.0))

    metrics = {
        "num_pairs": jnp.sum(weights),
        "rewards_chosen": total(reward_c),
        "rewards_rejected": total(reward_r),
        "rewards_margin": total(reward_c - reward_r),
        "rewards_accuracy": total((reward_c > reward_r).astype(f32)),
        "logps_chosen": total(pi_c),
        "logps_rejected": total(pi_r),
    }
    return total(per_pair), metrics


def chosen_nll_term(chosen_logps: jax.Array, chosen_lengths: jax.Array, *, pair_mask: jax.Array | None = None,
                    normalization: str = "token") -> tuple[jax.Array, jax.Array]:
    """NLL of the chosen responses, as (sum, denominator) for the step to divide once, globally.

    Llama 3 adds 0.2 * NLL on the chosen responses to DPO without saying how it
    is normalised; the two options:
    - "token" (default; TRL's `rpo_alpha` up to 0.28, and its `sft` loss term,
      e.g. `loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]`): the mean NLL
      over all chosen loss tokens of the global batch, so long responses weigh
      more. sum = -sum of chosen log-probs, denominator = chosen loss tokens.
    - "sequence": each chosen response's mean token NLL, averaged over pairs
      (every pair weighs the same, like the DPO term). sum = sum over pairs of
      -logp / L, denominator = real pairs.

    The full objective is then `dpo_sum / global_pairs + alpha * nll_sum / global_denominator`.

    Args:
      chosen_logps: [pairs] summed chosen-response log-probs (from `sequence_logps`).
      chosen_lengths: [pairs] chosen-response loss-token counts.
      pair_mask: [pairs] 1 real, 0 padding (None = all real).
    Returns:
      (nll_sum [], denominator []) float32, both over the real pairs of this batch.
    """
    f32 = jnp.float32
    logps, lengths = chosen_logps.astype(f32), chosen_lengths.astype(f32)
    weights = jnp.ones(logps.shape, f32) if pair_mask is None else pair_mask.astype(f32)
    real = weights > 0
    if normalization == "token":
        nll, denominator = -logps, lengths
    elif normalization == "sequence":
        nll, denominator = -logps / jnp.maximum(lengths, 1.0), jnp.ones_like(lengths)
    else:
        raise ValueError(f"unknown NLL normalization {normalization!r}; choose one of {NLL_NORMALIZATIONS}")
    return (jnp.sum(jnp.where(real, nll * weights, 0.0)),
            jnp.sum(jnp.where(real, denominator * weights, 0.0)))


def dpo_metric_means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-pair means of globally summed `dpo_loss` metrics (TRL's `rewards/*`, `logps/*`)."""
    pairs = jnp.maximum(sums["num_pairs"], 1.0)
    return {key: value / pairs for key, value in sums.items() if key != "num_pairs"}
