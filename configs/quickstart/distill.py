"""The distillation quickstart: run after the SFT quickstart (`posttrain-jax sft`); the SFT model is the teacher
of a 2-layer student (generalised JSD, beta 0.5)."""

from posttrain_jax.trainers.distill import default_config


def get_config():
    return default_config()
