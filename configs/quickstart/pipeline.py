"""The iterative-pipeline quickstart: run after the SFT quickstart (`posttrain-jax sft`).

Two rounds of RM -> rejection sampling (K = 4, math verifier + the round's RM) -> SFT -> verifier pairs ->
two DPO runs -> their average -> held-out eval of every candidate, on arithmetic with operands up to 29.
"""

from posttrain_jax.trainers.pipeline import default_config


def get_config():
    return default_config()
