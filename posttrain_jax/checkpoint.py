"""Orbax checkpoints of the whole run; model averaging; EMA. Implemented in `posttrain_jax.checkpointing`."""

from posttrain_jax.checkpointing import (MODEL_CONFIG_KEY, RunCheckpointer, abstract_target, average_checkpoints,
                                         ema_update, load_params, read_metadata, resolve_step_dir)

__all__ = ["MODEL_CONFIG_KEY", "RunCheckpointer", "abstract_target", "average_checkpoints", "ema_update",
           "load_params", "read_metadata", "resolve_step_dir"]
