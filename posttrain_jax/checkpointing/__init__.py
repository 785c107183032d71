"""Checkpointing of whole training runs, restore onto any mesh, model averaging and EMA.

`RunCheckpointer` saves params, optimizer state, step, RNG (any state pytree),
each process's data-iterator state and JSON metadata with Orbax; `restore`
puts the state straight into the shardings of an abstract target
(`abstract_target`), so a run can resume on another mesh shape.
`average_checkpoints` builds the weighted mean of several checkpoints' params
(Llama 3 model averaging) one leaf at a time; `ema_update` is the jit-friendly
EMA step; `load_params` reads just the params (export, evaluation, new runs).
"""

from posttrain_jax.checkpointing.averaging import MODEL_CONFIG_KEY, average_checkpoints, ema_update
from posttrain_jax.checkpointing.manager import RunCheckpointer, load_params, read_metadata
from posttrain_jax.checkpointing.trees import abstract_target, resolve_step_dir

__all__ = ["MODEL_CONFIG_KEY", "RunCheckpointer", "abstract_target", "average_checkpoints", "ema_update",
           "load_params", "read_metadata", "resolve_step_dir"]
