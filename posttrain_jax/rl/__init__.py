"""On-policy (and slightly off-policy) RL as small pieces a reader can see and swap.

- `rollout.py`: prompts -> sampler -> rewards -> a host batch (the sampler's log-probs travel
  with it as the behaviour policy); a producer that can run `max_staleness` steps ahead.
- `advantages.py`: `group` (GRPO), `rloo` (leave-one-out), `reinforce_pp` (discounted returns,
  batch-whitened), `gae` (with a critic's values), from token-level rewards.
- `kl.py`: k1 / k2 / k3 estimators of KL(pi || pi_ref), used in the loss or in the reward.
- `policy_loss.py`: the clipped surrogate with a `token` ratio (PPO / GRPO / DAPO clip-higher,
  dual-clip) or a `sequence` ratio (GSPO's length-normalised one, TRL RLOO's summed one), and
  truncated importance-sampling weights against the behaviour policy.
- `value_loss.py`: PPO's clipped value loss and explained variance.
- `objectives.py`: the micro-batch objectives the shared train step differentiates, and the
  one jitted pass that scores a rollout (old / reference log-probs, values, advantages).
- `settings.py`: the `rl` config section, resolved per algorithm (ppo, grpo, rloo, reinforce_pp,
  gspo) into one frozen `RLSettings`.
- `critic.py`: the value model (scalar head) and its train state.
- `loop.py`: the one loop: rollout -> score -> minibatches x epochs -> metrics, checkpoints.

Importing this package imports nothing heavy: `losses/grpo.py` builds on `kl` and `policy_loss`.
"""
