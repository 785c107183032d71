"""The evaluation quickstart: the SFT quickstart model on 200 new arithmetic problems: greedy accuracy, pass@k and
maj@k of 8 samples, mean reward and response length."""

from posttrain_jax.eval.command import default_config


def get_config():
    return default_config()
