"""Held-out evaluation by sampling: greedy accuracy, pass@k, maj@k, rewards, lengths, win rates.

`metrics` holds the statistics as pure functions (unbiased pass@k, majority
vote, win rate); `evaluator.Evaluator` runs the jitted sampler over a prompt
set (sharded, one compilation per shape, resumable records); `from_config`
builds evaluators from config sections (trainers and `eval`); `command` is
`posttrain-jax eval`.
"""

from posttrain_jax.eval.evaluator import EvalSettings, Evaluator, prompt_values, summarize
from posttrain_jax.eval.metrics import maj_at_k, majority_index, pass_at_k, vote_key, win_rate

__all__ = ["EvalSettings", "Evaluator", "maj_at_k", "majority_index", "pass_at_k", "prompt_values", "summarize",
           "vote_key", "win_rate"]
