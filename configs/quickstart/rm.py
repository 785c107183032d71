"""The reward-model quickstart: synthetic right-vs-wrong arithmetic preferences.

Starting from the SFT quickstart's backbone helps the RM judge answers:
--config.model.checkpoint=runs/sft-quickstart/checkpoints
--config.tokenizer=runs/sft-quickstart/data/tokenizer.model
"""

from posttrain_jax.trainers.rm import default_config


def get_config():
    return default_config()
