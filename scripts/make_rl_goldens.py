"""Make the golden values that tests/rl/test_conformance.py checks the RL estimators and losses against.

Two references, run on fixed random inputs; neither is a dependency of the project or of CI:

- TRL 1.16.0 (PyPI) RLOOTrainer: its `_compute_loss` runs as is on a stand-in trainer object
  (the attributes it reads) and a stand-in `fused_lm_head=True` model returning fixed per-token
  log-probs (a leaf tensor, so the golden also holds d loss / d log-probs). The leave-one-out
  advantages of `_generate_and_score_completions` (KL in the reward: beta * sum_t (old - ref),
  `normalize_advantages`) are restated line by line around TRL's own `nanstd`, because that
  method needs a model, a tokenizer and generation.
- verl (verl-project/verl at commit VERL_COMMIT) `verl/trainer/ppo/core_algos.py`:
  `compute_gae_advantage_return`, `compute_reinforce_plus_plus_outcome_advantage`,
  `compute_rloo_outcome_advantage`, `compute_rewards`, `kl_penalty_forward`, `agg_loss`,
  `compute_policy_loss_vanilla` (dual-clip, rollout IS weights), `compute_policy_loss_gspo`,
  `compute_value_loss`; `verl/utils/torch_functional.py` `masked_mean/var/whiten`;
  `verl/trainer/ppo/rollout_corr_helper.py` `compute_rollout_correction_weights` (token TIS);
  `verl/trainer/ppo/metric_utils.py` `critic/vf_explained_var`. verl cannot be imported without
  ray, tensordict and omegaconf, so these functions are restated below statement by statement
  (names kept), in torch, and differentiated with autograd where the golden holds a gradient.

Every reference runs in float32 on the inputs (the test tolerance, 1e-6 relative, is against
these) and in float64 on the same float32 inputs (reported for information).

Reproduce:

    pip install --target /tmp/trl-1.16 --no-deps trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 \
        dill multiprocess xxhash pandas pytz tzdata python-dateutil six requests urllib3 idna \
        certifi charset-normalizer
    .venv/bin/python scripts/make_rl_goldens.py --trl /tmp/trl-1.16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from types import MethodType, SimpleNamespace

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "losses" / "goldens" / "rl.json"
VERL_COMMIT = "1dda039b9c6311889a9c9a26040677e1254814f9"
NUM_GROUPS, GROUP_SIZE, WIDTH, PROMPT_LENGTH = 4, 4, 24, 5
ROWS = NUM_GROUPS * GROUP_SIZE


def make_inputs(seed: int = 3) -> dict:
    """Right-padded completions of random lengths (>= 2 tokens: verl's GSPO and whitening assume non-empty rows)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, WIDTH + 1, ROWS)
    lengths[3] = WIDTH
    mask = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.int64)
    logps = (-rng.exponential(1.0, (ROWS, WIDTH))).astype(np.float32)
    old_logps = (logps + rng.normal(0.0, 0.25, logps.shape)).astype(np.float32)
    ref_logps = (logps + rng.normal(0.0, 0.5, logps.shape)).astype(np.float32)
    # The sampler's log-probs: a bf16-like rounding gap and a few tokens far off (TIS caps them at 2).
    behaviour_logps = (old_logps + rng.normal(0.0, 0.05, logps.shape)).astype(np.float32)
    behaviour_logps[rng.random(logps.shape) < 0.1] -= 1.5
    scores = rng.integers(0, 2, ROWS).astype(np.float32) * 10.0 + rng.normal(0.0, 1.0, ROWS).astype(np.float32)
    scores[:GROUP_SIZE] = 10.0  # one group with zero reward spread
    values = rng.normal(2.0, 3.0, (ROWS, WIDTH)).astype(np.float32)
    old_values = (values + rng.normal(0.0, 0.3, values.shape)).astype(np.float32)
    returns = (values + rng.normal(0.0, 2.0, values.shape)).astype(np.float32)
    token_advantages = rng.normal(0.0, 1.0, (ROWS, WIDTH)).astype(np.float32)
    row_advantages = rng.normal(0.0, 1.0, ROWS).astype(np.float32)
    # Values outside the mask are garbage in every array: the implementations must ignore them.
    return {"mask": mask.tolist(), "logps": logps.tolist(), "old_logps": old_logps.tolist(),
            "ref_logps": ref_logps.tolist(), "behaviour_logps": behaviour_logps.tolist(), "scores": scores.tolist(),
            "values": values.tolist(), "old_values": old_values.tolist(), "returns": returns.tolist(),
            "token_advantages": token_advantages.tolist(), "row_advantages": row_advantages.tolist(),
            "group_size": GROUP_SIZE, "prompt_length": PROMPT_LENGTH}


# --------------------------------------------------------------------------- verl, restated

class Verl:
    """verl's definitions at VERL_COMMIT, statement by statement (comments mark our omissions)."""

    def __init__(self, torch):
        self.torch = torch

    # verl/utils/torch_functional.py
    def masked_sum(self, values, mask, axis=None):
        valid_values = self.torch.where(mask.bool(), values, 0.0)
        return (valid_values * mask).sum(axis=axis)

    def masked_mean(self, values, mask, axis=None):
        s = self.masked_sum(values, mask, axis)
        return s / (mask.sum(axis=axis) + 1e-8)

    def masked_var(self, values, mask, unbiased=True):
        mean = self.masked_mean(values, mask)
        centered_values = values - mean
        variance = self.masked_mean(centered_values**2, mask)
        if unbiased:
            mask_sum = mask.sum()
            bessel_correction = mask_sum / (mask_sum - 1)
            variance = variance * bessel_correction
        return variance

    def masked_whiten(self, values, mask, shift_mean=True):
        mean, var = self.masked_mean(values, mask), self.masked_var(values, mask)
        whitened = (values - mean) * self.torch.rsqrt(var + 1e-8)
        if not shift_mean:
            whitened += mean
        return whitened

    # core_algos.py
    def compute_gae_advantage_return(self, token_level_rewards, values, response_mask, gamma, lam):
        torch = self.torch
        with torch.no_grad():
            nextvalues = 0
            lastgaelam = 0
            advantages_reversed = []
            gen_len = token_level_rewards.shape[-1]
            for t in reversed(range(gen_len)):
                delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
                lastgaelam_ = delta + gamma * lam * lastgaelam
                nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
                lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
                advantages_reversed.append(lastgaelam)
            advantages = torch.stack(advantages_reversed[::-1], dim=1)
            returns = advantages + values
            advantages = self.masked_whiten(advantages, response_mask)
        return advantages, returns

    def compute_reinforce_plus_plus_outcome_advantage(self, token_level_rewards, response_mask, gamma):
        torch = self.torch
        with torch.no_grad():
            returns = torch.zeros_like(token_level_rewards)
            running_return = 0
            for t in reversed(range(token_level_rewards.shape[1])):
                new_running_return = token_level_rewards[:, t] + gamma * running_return
                returns[:, t] = new_running_return * response_mask[:, t]
                running_return = new_running_return * response_mask[:, t] + running_return * (1 - response_mask[:, t])
            advantages = self.masked_whiten(returns, response_mask)
            advantages = advantages * response_mask
        return advantages, returns

    def compute_rloo_outcome_advantage(self, token_level_rewards, response_mask, index):
        torch = self.torch
        scores = token_level_rewards.sum(dim=-1)
        id2score = defaultdict(list)
        id2mean = {}
        with torch.no_grad():
            bsz = scores.shape[0]
            for i in range(bsz):
                id2score[index[i]].append(scores[i])
            for idx in id2score:
                if len(id2score[idx]) == 1:
                    id2mean[idx] = torch.tensor(0.0)
                elif len(id2score[idx]) > 1:
                    id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            for i in range(bsz):
                response_num = len(id2score[index[i]])
                if response_num > 1:
                    scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[index[i]] * response_num / (
                        response_num - 1)
            scores = scores.unsqueeze(-1) * response_mask
        return scores, scores

    def compute_rewards(self, token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
        kl = old_log_prob - ref_log_prob
        return token_level_scores - kl * kl_ratio

    def kl_penalty_forward(self, logprob, ref_logprob, kl_penalty):
        torch = self.torch
        if kl_penalty in ("kl", "k1"):
            return logprob - ref_logprob
        if kl_penalty in ("mse", "k2"):
            return 0.5 * (logprob - ref_logprob).square()
        if kl_penalty in ("low_var_kl", "k3"):
            kl = ref_logprob - logprob
            kl = torch.clamp(kl, min=-20, max=20)
            ratio = torch.exp(kl)
            kld = (ratio - kl - 1).contiguous()
            return torch.clamp(kld, min=-10, max=10)
        raise NotImplementedError

    def agg_loss(self, loss_mat, loss_mask, loss_agg_mode):
        torch = self.torch
        if loss_agg_mode == "token-mean":
            batch_num_tokens = loss_mask.sum()
            return self.masked_sum(loss_mat, loss_mask) / batch_num_tokens
        if loss_agg_mode == "seq-mean-token-mean":
            seq_mask = torch.sum(loss_mask, dim=-1)
            seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
            seq_mask = (seq_mask > 0).float()
            global_batch_size = seq_mask.sum()
            return self.masked_sum(seq_losses, seq_mask) / global_batch_size
        raise ValueError(loss_agg_mode)

    def compute_policy_loss_vanilla(self, old_log_prob, log_prob, advantages, response_mask, clip_ratio_low,
                                    clip_ratio_high, clip_ratio_c=3.0, rollout_is_weights=None):
        torch = self.torch
        negative_approx_kl = log_prob - old_log_prob
        negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
        ratio = torch.exp(negative_approx_kl)
        ppo_kl = self.masked_mean(-negative_approx_kl, response_mask)
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
        pg_clipfrac = self.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
        pg_losses3 = -advantages * clip_ratio_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_clipfrac_lower = self.masked_mean(
            torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask)
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
        if rollout_is_weights is not None:
            pg_losses = pg_losses * rollout_is_weights
        pg_loss = self.agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode="token-mean")
        return pg_loss, {"pg_clipfrac": float(pg_clipfrac), "ppo_kl": float(ppo_kl),
                         "pg_clipfrac_lower": float(pg_clipfrac_lower)}

    def compute_policy_loss_gspo(self, old_log_prob, log_prob, advantages, response_mask, clip_ratio_low,
                                 clip_ratio_high, rollout_is_weights=None):
        torch = self.torch
        negative_approx_kl = log_prob - old_log_prob
        seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
        negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
        log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
        log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
        seq_importance_ratio = torch.exp(log_seq_importance_ratio)
        pg_losses1 = -advantages * seq_importance_ratio
        pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        pg_losses = torch.maximum(pg_losses1, pg_losses2)
        if rollout_is_weights is not None:
            pg_losses = pg_losses * rollout_is_weights
        pg_loss = self.agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode="seq-mean-token-mean")
        pg_clipfrac = self.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
        return pg_loss, {"pg_clipfrac": float(pg_clipfrac)}

    def compute_value_loss(self, vpreds, returns, values, response_mask, cliprange_value):
        torch = self.torch
        vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)  # clip_by_value
        vf_losses1 = (vpreds - returns) ** 2
        vf_losses2 = (vpredclipped - returns) ** 2
        clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
        vf_loss = 0.5 * self.agg_loss(loss_mat=clipped_vf_losses, loss_mask=response_mask, loss_agg_mode="token-mean")
        vf_clipfrac = self.masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
        return vf_loss, float(vf_clipfrac)

    # rollout_corr_helper.py, rollout_is="token", a single threshold (TIS); metrics omitted
    def compute_rollout_correction_weights(self, log_ratio, response_mask, rollout_is_threshold=2.0):
        torch = self.torch
        SAFETY_BOUND = 20.0  # noqa: N806 (verl's name)
        log_ratio_safe = torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)
        raw_rollout_is_weights = torch.exp(log_ratio_safe)
        raw_rollout_is_weights = raw_rollout_is_weights * response_mask
        return raw_rollout_is_weights.clamp(max=rollout_is_threshold)

    # metric_utils.py compute_data_metrics (use_critic)
    def vf_explained_var(self, values, returns, response_mask):
        torch = self.torch
        valid_returns = torch.masked_select(returns, response_mask.bool())
        valid_values = torch.masked_select(values, response_mask.bool())
        return_diff_var = torch.var(valid_returns - valid_values)
        return_var = torch.var(valid_returns)
        return float(1.0 - return_diff_var / (return_var + 1e-5))


def outcome_scores(torch, scores, mask):
    """verl's token_level_scores for an outcome reward: the score on the last response token."""
    lengths = mask.sum(-1).long()
    out = torch.zeros_like(mask, dtype=scores.dtype)
    out[torch.arange(mask.shape[0]), lengths - 1] = scores
    return out


def verl_goldens(torch, inputs: dict, dtype) -> dict:
    v = Verl(torch)

    def t(key):
        return torch.tensor(inputs[key], dtype=dtype)

    mask = torch.tensor(inputs["mask"], dtype=dtype)
    logps, old, ref, behaviour = t("logps"), t("old_logps"), t("ref_logps"), t("behaviour_logps")
    scores = outcome_scores(torch, t("scores"), mask)
    out: dict = {"kl": {}, "gae": [], "reinforce_pp": [], "policy_vanilla": [], "policy_gspo": []}
    for name in ("k1", "k2", "k3"):
        out["kl"][name] = (v.kl_penalty_forward(old, ref, name) * mask).tolist()
    # apply_kl_penalty (ray_trainer.py): token_level_rewards = scores - beta * kl_penalty(old, ref) * mask
    for gamma, lam, kl_name, beta in ((1.0, 0.95, "k1", 0.05), (0.99, 0.9, "k3", 0.1), (1.0, 1.0, "k1", 0.0)):
        rewards = scores - beta * v.kl_penalty_forward(old, ref, kl_name) * mask
        advantages, returns = v.compute_gae_advantage_return(rewards, t("values"), mask, gamma, lam)
        out["gae"].append({"gamma": gamma, "lam": lam, "kl_estimator": kl_name, "kl_coef": beta,
                           "advantages": advantages.tolist(), "returns": returns.tolist()})
    for gamma, kl_name, beta in ((1.0, "k2", 0.01), (0.99, "k1", 0.05)):
        rewards = scores - beta * v.kl_penalty_forward(old, ref, kl_name) * mask
        advantages, returns = v.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, gamma)
        out["reinforce_pp"].append({"gamma": gamma, "kl_estimator": kl_name, "kl_coef": beta,
                                    "advantages": advantages.tolist(), "returns": returns.tolist()})
    index = np.repeat(np.arange(NUM_GROUPS), GROUP_SIZE)
    rloo, _ = v.compute_rloo_outcome_advantage(scores.clone(), mask, index)
    out["rloo"] = rloo.tolist()
    weights = v.compute_rollout_correction_weights(old - behaviour, mask, 2.0)
    out["tis_weights"] = weights.tolist()
    for eps_low, eps_high, dual, with_is in ((0.2, 0.2, 3.0, False), (0.2, 0.28, 3.0, True),
                                            (0.1, 0.1, 1.5, False)):
        lp = logps.clone().requires_grad_(True)
        loss, metrics = v.compute_policy_loss_vanilla(old, lp, t("token_advantages"), mask, eps_low, eps_high, dual,
                                                      weights if with_is else None)
        loss.backward()
        out["policy_vanilla"].append({"epsilon_low": eps_low, "epsilon_high": eps_high, "clip_ratio_c": dual,
                                      "tis": with_is, "loss": float(loss), "grad": lp.grad.tolist(), **metrics})
    row_advantages = t("row_advantages")[:, None].expand_as(mask)
    for eps_low, eps_high, with_is in ((3e-4, 4e-4, False), (0.02, 0.03, True), (0.2, 0.2, False)):
        lp = logps.clone().requires_grad_(True)
        loss, metrics = v.compute_policy_loss_gspo(old, lp, row_advantages, mask, eps_low, eps_high,
                                                   weights if with_is else None)
        loss.backward()
        out["policy_gspo"].append({"epsilon_low": eps_low, "epsilon_high": eps_high, "tis": with_is,
                                   "loss": float(loss), "grad": lp.grad.tolist(), **metrics})
    out["value"] = []
    for clip in (0.2, 0.5):
        vp = t("values").clone().requires_grad_(True)
        loss, clipfrac = v.compute_value_loss(vp, t("returns"), t("old_values"), mask, clip)
        loss.backward()
        out["value"].append({"cliprange_value": clip, "loss": float(loss), "clipfrac": clipfrac,
                             "grad": vp.grad.tolist()})
    out["explained_variance"] = v.vf_explained_var(t("values"), t("returns"), mask)
    return out


# --------------------------------------------------------------------------- TRL 1.16 RLOO

def trl_rloo_advantages(torch, inputs: dict, dtype, *, beta: float, normalize: bool) -> dict:
    """RLOOTrainer._generate_and_score_completions' reward -> advantage part (one reward function of weight 1)."""
    from trl.trainer.utils import nanstd

    completion_mask = torch.tensor(inputs["mask"], dtype=torch.int64)
    old_per_token_logps = torch.tensor(inputs["old_logps"], dtype=dtype)
    ref_per_token_logps = torch.tensor(inputs["ref_logps"], dtype=dtype)
    rewards_per_func = torch.tensor(inputs["scores"], dtype=dtype)[:, None]
    reward_weights = torch.ones(1, dtype=dtype)
    num_generations = inputs["group_size"]
    # --- from here as in trl==1.16.0, rloo_trainer.py (gather = identity on one process)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    # ---
    return {"beta": beta, "normalize": normalize, "advantages": advantages.tolist()}


class _FusedHeadModel:
    def __init__(self, torch, logps):
        self.torch, self.logps = torch, logps

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        rows, width = self.logps.shape
        valid = labels[:, 1:] != -100
        assert valid[:, -width:].tolist() == (attention_mask[:, -width:] > 0).tolist()
        pad = self.torch.zeros(rows, input_ids.shape[1] - 1 - width, dtype=self.logps.dtype)
        log_probs = self.torch.cat([pad, self.logps], dim=1).masked_fill(~valid, 0.0)
        entropy = self.torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=entropy, aux_loss=None)


def trl_rloo_loss(torch, inputs: dict, dtype, *, epsilon: float, epsilon_high: float, advantages) -> dict:
    from trl.trainer.rloo_trainer import RLOOTrainer

    completion_mask = torch.tensor(inputs["mask"], dtype=torch.int64)
    logps = torch.tensor(inputs["logps"], dtype=dtype).requires_grad_(True)
    old = torch.tensor(inputs["old_logps"], dtype=dtype)
    batch = {"prompt_ids": torch.full((ROWS, PROMPT_LENGTH), 7, dtype=torch.int64),
             "prompt_mask": torch.ones(ROWS, PROMPT_LENGTH, dtype=torch.int64),
             "completion_ids": torch.full((ROWS, WIDTH), 9, dtype=torch.int64), "completion_mask": completion_mask,
             "old_logps": (old * completion_mask).sum(1), "advantages": torch.tensor(advantages, dtype=dtype)}
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
                                  gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x, autocast=contextlib.nullcontext)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, epsilon_low=epsilon,
                              epsilon_high=epsilon_high, aux_loss_enabled=False,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = MethodType(RLOOTrainer._get_per_token_logps_and_entropies, trainer)
    loss = RLOOTrainer._compute_loss(trainer, _FusedHeadModel(torch, logps), batch)
    loss.backward()
    logged = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return {"epsilon": epsilon, "epsilon_high": epsilon_high, "loss": float(loss), "grad": logps.grad.tolist(),
            "clip_ratio/low_mean": logged["clip_ratio/low_mean"],
            "clip_ratio/high_mean": logged["clip_ratio/high_mean"],
            "clip_ratio/region_mean": logged["clip_ratio/region_mean"]}


def trl_goldens(torch, inputs: dict, dtype) -> dict:
    advantages = [trl_rloo_advantages(torch, inputs, dtype, beta=beta, normalize=normalize)
                  for beta in (0.0, 0.05) for normalize in (False, True)]
    # Summed sequence log-ratios have a std near 1 here: many ratios leave [0.8, 1.2] on both sides.
    losses = [trl_rloo_loss(torch, inputs, dtype, epsilon=eps, epsilon_high=high,
                            advantages=advantages[1]["advantages"])
              for eps, high in ((0.2, 0.2), (0.2, 0.28), (1.0, 1.0))]
    return {"advantages": advantages, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl", required=True, help="directory holding trl==1.16.0 and its import deps")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    sys.path.insert(0, args.trl)
    import torch

    inputs = make_inputs()
    golden = {
        "meta": {"generator": "scripts/make_rl_goldens.py", "trl": metadata.version("trl"), "torch": torch.__version__,
                 "verl_commit": VERL_COMMIT, "numpy": np.__version__,
                 "note": "reference values in float32; *_float64: the same float32 inputs in float64"},
        "inputs": inputs,
        "verl": verl_goldens(torch, inputs, torch.float32),
        "verl_float64": verl_goldens(torch, inputs, torch.float64),
        "trl_rloo": trl_goldens(torch, inputs, torch.float32),
        "trl_rloo_float64": trl_goldens(torch, inputs, torch.float64),
    }
    Path(args.out).write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
