"""The `rl` config section and its resolution into one frozen `RLSettings`.

`rl.algorithm` picks defaults for the fields left at None; any field set explicitly wins:

| algorithm      | advantage      | policy loss               | aggregation     | KL                        | critic |
|----------------|----------------|---------------------------|-----------------|---------------------------|--------|
| `ppo`          | `gae`          | token, eps 0.2            | token_mean      | k1 in the reward, 0.05    | yes    |
| `grpo`         | `group`        | token, eps 0.2            | token_mean      | k3 in the loss, 0 (off)   | no     |
| `rloo`         | `rloo`         | sequence (sum), eps 0.2   | sequence_mean   | k1 in the reward, 0.05    | no     |
| `reinforce_pp` | `reinforce_pp` | token, eps 0.2            | token_mean      | k2 in the reward, 0.01    | no     |
| `gspo`         | `group`        | sequence (mean), 3e-4/4e-4 | sequence_mean  | off                       | no     |

Sources: TRL 1.16 RLOOConfig (beta 0.05, k1 in the reward, summed sequence ratio), verl's
REINFORCE++ example (kl_penalty in the reward), GSPO (Zheng et al. 2025: clip 3e-4 / 4e-4),
TRL/verl PPO (GAE gamma 1, lambda 0.95, k1 in the reward).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from posttrain_jax.losses.grpo import AGGREGATIONS, SCALES
from posttrain_jax.rl.advantages import ESTIMATORS
from posttrain_jax.rl.kl import KL_ESTIMATORS, KL_PLACEMENTS
from posttrain_jax.rl.policy_loss import POLICY_LOSSES, SEQUENCE_RATIOS

ALGORITHMS = {
    "ppo": dict(advantage="gae", policy_loss="token", loss_aggregation="token_mean", epsilon_low=0.2,
                epsilon_high=0.2, kl_coef=0.05, kl_estimator="k1", kl_in="reward", num_epochs=4),
    "grpo": dict(advantage="group", policy_loss="token", loss_aggregation="token_mean", epsilon_low=0.2,
                 epsilon_high=0.2, kl_coef=0.0, kl_estimator="k3", kl_in="loss", num_epochs=1),
    "rloo": dict(advantage="rloo", policy_loss="sequence", sequence_ratio="sum", loss_aggregation="sequence_mean",
                 epsilon_low=0.2, epsilon_high=0.2, kl_coef=0.05, kl_estimator="k1", kl_in="reward", num_epochs=1),
    "reinforce_pp": dict(advantage="reinforce_pp", policy_loss="token", loss_aggregation="token_mean",
                         epsilon_low=0.2, epsilon_high=0.2, kl_coef=0.01, kl_estimator="k2", kl_in="reward",
                         num_epochs=1),
    "gspo": dict(advantage="group", policy_loss="sequence", sequence_ratio="mean", loss_aggregation="sequence_mean",
                 epsilon_low=3e-4, epsilon_high=4e-4, kl_coef=0.0, kl_estimator="k3", kl_in="loss", num_epochs=1),
}
CURRICULA = ("none", "reward_variance")


def rl_config(**overrides) -> ml_collections.ConfigDict:
    """The `rl` section (None: the algorithm's default, see the module docstring)."""
    base = dict(
        algorithm="grpo",
        prompts_per_step=16, group_size=8,
        advantage=None, policy_loss=None, sequence_ratio="mean", loss_aggregation=None,
        epsilon_low=None, epsilon_high=None, clip_ratio_c=0.0,  # dual-clip bound (> 1; 0: off)
        kl_coef=None, kl_estimator=None, kl_in=None,  # kl_in: "loss" | "reward"
        advantage_scale="group", std_ddof=1, advantage_eps=1e-4, filter_zero_std=False,  # group
        normalize_advantages=False,  # rloo: batch-normalise (TRL normalize_advantages)
        gamma=1.0, lam=0.95, whiten_advantages=True,  # reinforce_pp / gae
        missing_eos_penalty=0.0,  # subtracted from the score of a completion that never stopped (Tülu 3: 10)
        num_epochs=None, num_minibatches=1,  # updates per rollout: epochs x minibatches
        loss_chunk_size=0, forward_chunks=1,  # rows of the scoring forward split into this many chunks
        max_staleness=0,  # rollouts for step t come from the params of step t - 1 - max_staleness
        tis_cap=0.0,  # truncated importance sampling against the sampler's log-probs (0: off; verl 2)
        curriculum="none", curriculum_pool_steps=4,  # reward_variance: Qwen 2.5's high-variance-first order
    )
    return ml_collections.ConfigDict({**base, **overrides})


def critic_config(**overrides) -> ml_collections.ConfigDict:
    """The `critic` section (PPO): where the value model starts, its loss and its own optimizer."""
    base = dict(
        checkpoint="",  # a run checkpoint: a reward-model run (scalar head kept) or any LM run (fresh head)
        hf_path="",  # a Hugging Face *ForSequenceClassification (or causal LM) directory
        # neither: the policy's own weights (model section) with a fresh scalar head
        value_clip=0.2, vf_coef=1.0,
        # RL steps at the start that train only the critic, the policy held still (verl's trainer.critic_warmup;
        # not a learning-rate warmup): its first advantages then come from values that mean something
        critic_only_steps=0,
        learning_rate=1e-5, schedule="constant", warmup_ratio=0.0, min_lr_ratio=0.0, weight_decay=0.0,
        max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
    )
    return ml_collections.ConfigDict({**base, **overrides})


@dataclasses.dataclass(frozen=True)
class RLSettings:
    algorithm: str
    prompts_per_step: int
    group_size: int
    advantage: str
    policy_loss: str
    sequence_ratio: str
    loss_aggregation: str
    epsilon_low: float
    epsilon_high: float
    clip_ratio_c: float
    kl_coef: float
    kl_estimator: str
    kl_in: str
    advantage_scale: str
    std_ddof: int
    advantage_eps: float
    filter_zero_std: bool
    normalize_advantages: bool
    gamma: float
    lam: float
    whiten_advantages: bool
    missing_eos_penalty: float
    num_epochs: int
    num_minibatches: int
    loss_chunk_size: int
    forward_chunks: int
    max_staleness: int
    tis_cap: float
    curriculum: str
    curriculum_pool_steps: int

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def kl_in_loss(self) -> float:
        return self.kl_coef if self.kl_in == "loss" else 0.0

    @property
    def kl_in_reward(self) -> float:
        return self.kl_coef if self.kl_in == "reward" else 0.0

    @property
    def updates_per_rollout(self) -> int:
        return self.num_epochs * self.num_minibatches

    @property
    def needs_old_logps(self) -> bool:
        """A separate forward for the pre-update log-probs: more than one update, or the KL in the reward."""
        return self.updates_per_rollout > 1 or bool(self.kl_in_reward)

    @property
    def needs_reference(self) -> bool:
        return bool(self.kl_coef)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"rl.{name}={value!r}; choose one of {tuple(options)}")


def resolve(rl: ml_collections.ConfigDict | dict) -> RLSettings:
    """Fill the algorithm's defaults into the None fields and check everything.

    Raises:
      ValueError: an unknown algorithm / option or an inconsistent combination, naming the key.
    """
    rl = dict(rl)
    _choice("algorithm", rl["algorithm"], ALGORITHMS)
    for key, value in ALGORITHMS[rl["algorithm"]].items():
        if rl.get(key) is None:
            rl[key] = value
    fields = {f.name for f in dataclasses.fields(RLSettings)}
    unknown = sorted(set(rl) - fields)
    if unknown:
        raise ValueError(f"unknown rl keys {unknown}; valid: {sorted(fields)}")
    s = RLSettings(**rl)
    _choice("advantage", s.advantage, ESTIMATORS)
    _choice("policy_loss", s.policy_loss, POLICY_LOSSES)
    _choice("sequence_ratio", s.sequence_ratio, SEQUENCE_RATIOS)
    _choice("loss_aggregation", s.loss_aggregation, AGGREGATIONS)
    _choice("kl_estimator", s.kl_estimator, KL_ESTIMATORS)
    _choice("kl_in", s.kl_in, KL_PLACEMENTS)
    _choice("advantage_scale", s.advantage_scale, SCALES)
    _choice("curriculum", s.curriculum, CURRICULA)
    if s.policy_loss == "sequence" and s.loss_aggregation != "sequence_mean":
        raise ValueError(f"rl.policy_loss='sequence' gives one loss per completion: set "
                         f"rl.loss_aggregation='sequence_mean' (got {s.loss_aggregation!r})")
    if s.advantage in ("group", "rloo") and s.group_size < 2:
        raise ValueError(f"rl.group_size={s.group_size}: {s.advantage} advantages need at least 2 completions "
                         f"per prompt")
    if s.group_size < 1 or s.prompts_per_step < 1:
        raise ValueError("rl.group_size and rl.prompts_per_step must be >= 1")
    if s.num_epochs < 1 or s.num_minibatches < 1 or s.forward_chunks < 1:
        raise ValueError("rl.num_epochs, rl.num_minibatches and rl.forward_chunks must be >= 1")
    if s.max_staleness < 0:
        raise ValueError(f"rl.max_staleness={s.max_staleness} must be >= 0")
    if s.tis_cap < 0:
        raise ValueError(f"rl.tis_cap={s.tis_cap} must be >= 0 (0: no importance-sampling correction)")
    if s.clip_ratio_c and s.clip_ratio_c <= 1:
        raise ValueError(f"rl.clip_ratio_c={s.clip_ratio_c}: the dual-clip bound must be > 1 (0: off)")
    if not 0 <= s.lam <= 1 or not 0 <= s.gamma <= 1:
        raise ValueError(f"rl.gamma={s.gamma} and rl.lam={s.lam} must lie in [0, 1]")
    return s
