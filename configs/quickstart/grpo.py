"""The GRPO quickstart: run after the SFT quickstart (`posttrain-jax sft`); it starts from that model."""

from posttrain_jax.trainers.grpo import default_config


def get_config():
    return default_config()
