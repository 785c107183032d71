"""The train state as ShapeDtypeStructs with shardings: planning without parameters.

`nnx.eval_shape` builds the model abstractly, `nnx.split` separates its
Params, the logical-axis rules give each one its NamedSharding, and
`jax.eval_shape(tx.init, ...)` gives the optimizer state. Nothing is
allocated, so this works for models far larger than the host (an AOT compile
of a 70B step on a laptop) and for restore targets.

A LoRA / QLoRA model is built the same way (`apply_lora` traced abstractly: the
base quantized, the adapters added) and split into the trained adapters (the
train state) and the frozen, possibly quantized, base (the step's argument).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.lora import LoraConfig, apply_lora, trainable_filter
from posttrain_jax.models.transformer import Decoder
from posttrain_jax.sharding import DEFAULT_RULES, Rules, state_shardings
from posttrain_jax.train.step import TrainState


def abstract_params(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, Params state) whose leaves are ShapeDtypeStructs carrying each parameter's NamedSharding."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(params, mesh, rules)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def abstract_lora_split(config: ModelConfig, lora: LoraConfig, mesh: Mesh,
                        rules: Rules = DEFAULT_RULES) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trained state, frozen base) of `config` with `lora` applied (QLoRA: the base quantized), as
    ShapeDtypeStructs with shardings: what `models.from_config.build_model(..., lora=...)` then
    `train.trainable_split` give for a real model. Trained: the adapters (plus a scalar head); frozen: everything else."""
    def build():
        return apply_lora(Decoder(config, rngs=nnx.Rngs(0)), lora)
    graphdef, trained, base = nnx.split(nnx.eval_shape(build), trainable_filter(config.head), ...)

    def place(state):
        shardings = state_shardings(state, mesh, rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, place(trained), place(base)


def abstract_train_state(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules = DEFAULT_RULES, *, ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """What `init_train_state(create_model(config, mesh=mesh, rules=rules), tx, mesh=mesh, ema=ema)` returns,
    as ShapeDtypeStructs: the same tree, shapes, dtypes and shardings, with no array allocated.

    Optimizer leaves shaped like a parameter (Adam's moments) take that
    parameter's sharding, as `tx.init` under eager execution gives them;
    everything else (counts, step, RNG key data) is replicated on `mesh`.
    Raises ValueError (from `state_shardings`) when a dimension does not split
    over its mesh axes.
    """
    graphdef, params = abstract_params(config, mesh, rules)
    return graphdef, _train_state(params, tx, mesh, ema)


def abstract_lora_train_state(config: ModelConfig, tx: optax.GradientTransformation, lora: LoraConfig, mesh: Mesh,
                              rules: Rules = DEFAULT_RULES, *,
                              ema: bool = False) -> tuple[nnx.GraphDef, TrainState, nnx.State]:
    """(graphdef, train state of the adapters, frozen base) as ShapeDtypeStructs: what `trainers.runner`
    (and the RL loop) builds for a LoRA / QLoRA run (`init_train_state(..., trainable=...)` and `frozen_state`)."""
    graphdef, trained, base = abstract_lora_split(config, lora, mesh, rules)
    return graphdef, _train_state(trained, tx, mesh, ema), base


def _train_state(params, tx: optax.GradientTransformation, mesh: Mesh, ema: bool) -> TrainState:
    replicated = NamedSharding(mesh, P())
    opt_state = jax.eval_shape(tx.init, params)
    # Moments are built by zeros_like from each parameter: match them by path suffix to their parameter.
    by_path = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def place(path, leaf):
        for start in range(len(path)):
            param = by_path.get(path[start:])
            if param is not None and param.shape == leaf.shape:
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    opt_state = jax.tree_util.tree_map_with_path(place, opt_state)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                       opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated),
                       ema_params=params if ema else None)
    return state
