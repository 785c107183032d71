"""The rejection-sampling quickstart: run after the SFT quickstart (`posttrain-jax sft`).

Best of 8 answers of that model to 512 arithmetic prompts (operands up to 29,
harder than most of what SFT saw), kept when the math verifier marks the best
one correct: `runs/rejection-quickstart/rejection_sampled.jsonl`, SFT-ready.
"""

from posttrain_jax.trainers.rejection import default_config


def get_config():
    return default_config()
