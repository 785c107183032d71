"""The Tülu 3 loss-aggregation ablation (Tülu 3 report §4.3) on the CPU-sized synthetic task.

{mean_per_microbatch, sum, token_mean} x learning rates x accumulation splits,
plus the gradient difference between device/accumulation splits of one batch.
Run: posttrain-jax ablate --config configs/tulu3/loss_ablation.py
"""

from posttrain_jax.ablation import default_config


def get_config():
    return default_config()
