"""The CPU quickstart (what `posttrain-jax sft` runs without --config)."""

from posttrain_jax.trainers.sft import default_config


def get_config():
    return default_config()
