"""Make the golden values that tests/losses/test_grpo.py checks the GRPO losses against.

The reference is TRL's own code, run on fixed random inputs, never a project dependency:

- TRL 1.16.0 (PyPI) `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py), called on a
  stand-in trainer object with the attributes it reads, for loss_type grpo, bnpo, dr_grpo and
  dapo x beta 0 / 0.04 (TRL's k3 KL) x epsilon 0.2 / clip-higher (epsilon_high 0.28) x
  old_per_token_logps given (ratio != 1) / absent (TRL uses per_token_logps.detach()).
  The real `GRPOTrainer._get_per_token_logps_and_entropies` runs too (label masking and
  slicing to the completion); only the model forward is a stand-in, returning fixed per-token
  log-probs and entropies as a `fused_lm_head=True` model does.
  One process, one micro-batch: current_gradient_accumulation_steps = steps_per_generation = 1
  and `num_items_in_batch` = the completion tokens of the batch, which makes `dapo`'s
  normaliser (num_items_in_batch / num_processes * accumulation / steps_per_generation) the
  global token count. `split` cases run the same batch as two micro-batches of one
  accumulation window (accumulation = steps_per_generation = 2, num_items_in_batch of the whole
  generation batch) and add the two losses, which is what the optimizer sees.
- The entropies are `trl.trainer.utils.entropy_from_logits` of fixed random logits (its torch
  path: no triton on CPU); the logits are in the golden so `token_entropy` is checked too.
- Advantages: the reward normalisation of `GRPOTrainer._generate_and_score_completions`
  (multi_objective_aggregation="sum_then_normalize", one reward function of weight 1,
  scale_rewards "group" / "batch" / "none"), restated line by line below around TRL's own
  `trl.trainer.utils.nanstd`, because that method needs a model, a tokenizer and generation.

Every reference runs in float32 (the test tolerance, 1e-6 relative, is against these) and in
float64 on the same float32 inputs (reported for information).

Reproduce (nothing here is a dependency of the project or of CI):

    pip install --target /tmp/trl-1.16 --no-deps trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 \
        dill multiprocess xxhash pandas pytz tzdata python-dateutil six requests urllib3 idna \
        certifi charset-normalizer
    .venv/bin/python scripts/make_grpo_goldens.py --trl /tmp/trl-1.16

(torch 2.13 CPU and transformers 5.23 come from the project's test extra.)
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

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "losses" / "goldens"
NUM_GROUPS, GROUP_SIZE = 4, 4
COMPLETIONS, PROMPT_LENGTH, WIDTH, VOCAB = NUM_GROUPS * GROUP_SIZE, 5, 24, 11
MAX_COMPLETION_LENGTH = 32  # dr_grpo divides by the configured maximum, not the padded width
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


# --------------------------------------------------------------------------- inputs

def make_reward_sets(seed: int = 0) -> dict:
    """Named reward vectors with their group sizes; each has at least one zero-std group."""
    rng = np.random.default_rng(seed)
    gaussian = rng.normal(0.5, 1.0, COMPLETIONS).astype(np.float32)
    gaussian[2 * GROUP_SIZE:3 * GROUP_SIZE] = 0.7  # all equal: zero std
    binary = rng.integers(0, 2, 8 * GROUP_SIZE).astype(np.float32)  # verifiable 0/1 rewards
    binary[:GROUP_SIZE], binary[3 * GROUP_SIZE:4 * GROUP_SIZE] = 1.0, 0.0
    return {"gaussian": {"rewards": gaussian.tolist(), "group_size": GROUP_SIZE},
            "binary": {"rewards": binary.tolist(), "group_size": GROUP_SIZE},
            "one_per_group": {"rewards": gaussian[:6].tolist(), "group_size": 1}}


def make_loss_inputs(advantages: list[float], seed: int = 1) -> dict:
    """Right-padded completions of random lengths; row 5 is fully masked (a masked truncated completion).

    Log-probs outside the mask are random garbage: TRL's model returns 0 there, ours must ignore them.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, WIDTH + 1, COMPLETIONS)
    lengths[3] = WIDTH
    completion_mask = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.int64)
    completion_mask[5] = 0
    prompt_mask = (np.arange(PROMPT_LENGTH)[None, :] >= rng.integers(0, 3, COMPLETIONS)[:, None]).astype(np.int64)
    logps = (-rng.exponential(1.0, (COMPLETIONS, WIDTH))).astype(np.float32)
    # Old-policy log-probs a few optimiser steps away: ratios of ~0.6-1.6, many outside [0.8, 1.28].
    old_logps = (logps + rng.normal(0.0, 0.25, logps.shape)).astype(np.float32)
    ref_logps = (logps + rng.normal(0.0, 0.5, logps.shape)).astype(np.float32)
    logits = rng.normal(0.0, 2.0, (COMPLETIONS, WIDTH, VOCAB)).astype(np.float32)
    return {
        "prompt_ids": rng.integers(3, 1000, (COMPLETIONS, PROMPT_LENGTH)).tolist(),
        "prompt_mask": prompt_mask.tolist(),
        "completion_ids": rng.integers(3, 1000, (COMPLETIONS, WIDTH)).tolist(),
        "completion_mask": completion_mask.tolist(),
        "advantages": advantages,
        "logps": logps.tolist(),
        "old_logps": old_logps.tolist(),
        "ref_logps": ref_logps.tolist(),
        "logits": logits.tolist(),
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "group_size": GROUP_SIZE,
    }


# --------------------------------------------------------------------------- TRL 1.16

def trl_advantages(rewards: list[float], group_size: int, scale_rewards: str, dtype_name: str) -> dict:
    """GRPOTrainer._generate_and_score_completions' normalisation (sum_then_normalize), restated."""
    import torch
    from trl.trainer.utils import nanstd

    dtype = getattr(torch, dtype_name)
    rewards_per_func = torch.tensor(rewards, dtype=dtype)[:, None]
    reward_weights = torch.ones(1, dtype=dtype)
    num_generations = group_size
    # --- from here as in trl==1.16.0, grpo_trainer.py
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)
    # ---
    return {"advantages": advantages.tolist(), "std_rewards": std_rewards.tolist(),
            "is_std_zero": is_std_zero.tolist()}


class _FusedHeadModel:
    """A `fused_lm_head=True` causal LM: per-token log-probs of the next token [rows, length-1]
    (0 where the label is -100) and per-position entropies, from fixed completion arrays."""

    def __init__(self, torch, logps, entropies):
        self.torch, self.logps, self.entropies = torch, logps, entropies

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, **kwargs):
        assert fused_lm_head
        rows, width = self.logps.shape
        valid = labels[:, 1:] != -100
        # Only the last `width` positions are completion; TRL slices them back out.
        assert valid[:, -width:].tolist() == (attention_mask[:, -width:] > 0).tolist()
        assert not valid[:, :-width].any()
        pad = self.torch.zeros(rows, input_ids.shape[1] - 1 - width, dtype=self.logps.dtype)
        log_probs = self.torch.cat([pad, self.logps], dim=1).masked_fill(~valid, 0.0)
        entropy = self.torch.cat([pad, self.entropies], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=entropy, aux_loss=None)


def trl_loss(inputs: dict, dtype_name: str, *, loss_type: str, beta: float, epsilon: float,
             epsilon_high: float | None, with_old: bool, rows: slice = slice(None), accumulation: int = 1) -> dict:
    import torch
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits

    dtype = getattr(torch, dtype_name)

    def tensor(key, dt=dtype):
        return torch.tensor(inputs[key], dtype=dt)[rows]

    completion_mask = tensor("completion_mask", torch.int64)
    entropies = entropy_from_logits(tensor("logits"))
    model = _FusedHeadModel(torch, tensor("logps"), entropies)
    batch = {
        "prompt_ids": tensor("prompt_ids", torch.int64), "prompt_mask": tensor("prompt_mask", torch.int64),
        "completion_ids": tensor("completion_ids", torch.int64), "completion_mask": completion_mask,
        "advantages": tensor("advantages"),
        # _generate_and_score_completions: gathered loss-mask sum of the whole generation batch.
        "num_items_in_batch": torch.tensor(inputs["completion_mask"]).sum(),
    }
    if with_old:
        batch["old_per_token_logps"] = tensor("old_logps") * completion_mask
    if beta != 0.0:
        batch["ref_per_token_logps"] = tensor("ref_logps") * completion_mask
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
                                  gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x, autocast=contextlib.nullcontext)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, loss_type=loss_type, beta=beta,
        epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, max_completion_length=inputs["max_completion_length"],
        current_gradient_accumulation_steps=accumulation,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = MethodType(GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    with torch.no_grad():
        loss = GRPOTrainer._compute_loss(trainer, model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": float(loss), "metrics": {k: float(logged[k]) for k in METRICS if k in logged},
            "entropies": entropies.tolist()}


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl", required=True, help="directory holding trl==1.16.0 and its import deps")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args()
    sys.path.insert(0, args.trl)
    import torch
    import transformers
    import trl

    assert trl.__version__ == "1.16.0", trl.__version__
    reward_sets = make_reward_sets()
    advantage_cases = []
    for name, reward_set in reward_sets.items():
        for scale in ("group", "batch", "none"):
            f32, f64 = (trl_advantages(reward_set["rewards"], reward_set["group_size"], scale, d)
                        for d in ("float32", "float64"))
            advantage_cases.append({"rewards": name, "scale_rewards": scale, **f32,
                                    "advantages_float64": f64["advantages"]})

    group = next(c for c in advantage_cases if c["rewards"] == "gaussian" and c["scale_rewards"] == "group")
    inputs = make_loss_inputs(group["advantages"])
    source = f"trl=={trl.__version__} GRPOTrainer._compute_loss"
    cases, entropies = [], None
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, 0.04):
            for epsilon, epsilon_high in ((0.2, None), (0.2, 0.28)):
                for with_old in (True, False):
                    kwargs = dict(loss_type=loss_type, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                                  with_old=with_old)
                    f32, f64 = trl_loss(inputs, "float32", **kwargs), trl_loss(inputs, "float64", **kwargs)
                    entropies = f32.pop("entropies")
                    cases.append({"name": f"{loss_type}_beta{beta}_eps{epsilon}-{epsilon_high or epsilon}"
                                          f"{'_old' if with_old else '_onpolicy'}", "source": source,
                                  **kwargs, "loss": f32["loss"], "metrics": f32["metrics"],
                                  "loss_float64": f64["loss"], "metrics_float64": f64["metrics"]})

    # Two micro-batches of 8 completions (two groups each), one accumulation window; losses added.
    split_cases = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        kwargs = dict(loss_type=loss_type, beta=0.04, epsilon=0.2, epsilon_high=0.28, with_old=True)
        total = {d: sum(trl_loss(inputs, d, rows=rows, accumulation=2, **kwargs)["loss"]
                        for rows in (slice(0, COMPLETIONS // 2), slice(COMPLETIONS // 2, None)))
                 for d in ("float32", "float64")}
        split_cases.append({"name": f"{loss_type}_split2", "source": source + " x 2 micro-batches", **kwargs,
                            "micro_batches": 2, "loss": total["float32"], "loss_float64": total["float64"]})

    meta = {"generator": "scripts/make_grpo_goldens.py", "trl": trl.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": metadata.version("accelerate"),
            "numpy": np.__version__,
            "note": "loss/metrics/advantages: reference run in float32; *_float64: same float32 inputs in "
                    "float64. entropies: trl entropy_from_logits(logits) in float32."}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grpo.json"
    path.write_text(json.dumps({"meta": meta, "inputs": inputs, "entropies": entropies, "reward_sets": reward_sets,
                                "advantage_cases": advantage_cases, "cases": cases, "split_cases": split_cases},
                               separators=(",", ":")) + "\n")
    print(f"wrote {path} ({len(cases)} loss cases, {len(split_cases)} split cases, "
          f"{len(advantage_cases)} advantage cases)")


if __name__ == "__main__":
    main()
