"""The train step: one pure function, one jit boundary.

`objective(model, micro_batch, context) -> (weighted_sum, sums)` returns the
unnormalised loss of a micro-batch and a dict of sums for metrics;
`denominator(batch)` is computed once on the whole global batch and returns the
one divisor, or a dict `context` holding it under "denominator" plus any other
global quantities a loss needs (e.g. DPO's NLL term is normalised by the global
number of chosen tokens); every micro-batch's objective receives that context, plus, under "frozen",
the step's optional third argument (params of a frozen model the objective runs, e.g. a distillation
teacher: an argument of the jitted step with its own shardings, never a closed-over constant). Gradients of the sums are accumulated
over micro-batches with `lax.scan` and divided once, so the result does not
depend on how the global batch was split (see `posttrain_jax.losses.sft`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from posttrain_jax.checkpointing.averaging import ema_update
from posttrain_jax.sharding import constrain


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's Params (float32 master weights)
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0, ema: bool = False,
                     mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Split the model and build the optimizer state next to each (sharded) parameter.

    With a mesh, scalars (step, RNG) are replicated on it so the whole state
    lives on the mesh the step is compiled for.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    # Eager init: zeros_like keeps each parameter's sharding for its moments (under
    # jit they would land on one device).
    opt_state = tx.init(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.random.key_data(jax.random.key(seed)),
                       ema_params=jax.tree.map(jnp.copy, params) if ema else None)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def on_mesh(x):  # scalars (step, RNG, optimizer counts) are made on one device
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
                return x
            return jax.device_put(x, replicated)

        state = jax.tree.map(on_mesh, state)
    return graphdef, state


def split_microbatches(batch: dict[str, jax.Array], accum_steps: int, data_shards: int) -> dict[str, jax.Array]:
    """[global_rows, ...] -> [accum_steps, global_rows // accum_steps, ...].

    Rows are taken from each data shard's own block, so no row changes device;
    inside a micro-batch rows stay shard-major (what `mean_per_microbatch` needs).
    """
    def split(x):
        rows = x.shape[0]
        if rows % (accum_steps * data_shards):
            raise ValueError(f"global batch of {rows} rows does not split into {accum_steps} accumulation steps "
                             f"x {data_shards} data shards")
        micro = rows // (accum_steps * data_shards)
        x = x.reshape(data_shards, accum_steps, micro, *x.shape[1:]).swapaxes(0, 1)
        x = x.reshape(accum_steps, data_shards * micro, *x.shape[3:])
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
    return {k: split(v) for k, v in batch.items()}


def make_grad_fn(graphdef: nnx.GraphDef, objective: Callable[[nnx.Module, dict, dict], tuple[jax.Array, dict]],
                 denominator: Callable[[dict], jax.Array | dict], *, accum_steps: int = 1, data_shards: int = 1):
    """`grads(params, batch) -> (grads, metrics)` for a whole global batch, divided once."""

    def grads_fn(params, batch, frozen=None):
        context = denominator(batch)
        context = dict(context) if isinstance(context, dict) else {"denominator": context}
        if frozen is not None:
            context["frozen"] = frozen
        denom = context["denominator"]

        def micro_grads(params, micro):
            def loss(p):
                return objective(nnx.merge(graphdef, p), micro, context)
            return jax.value_and_grad(loss, has_aux=True)(params)

        micro = split_microbatches(batch, accum_steps, data_shards)
        if accum_steps == 1:
            (total, sums), grads = micro_grads(params, jax.tree.map(lambda x: x[0], micro))
        else:
            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(lambda: micro_grads(params, first)[0][1])
            init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros(()),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))

            def body(carry, mb):
                g_acc, t_acc, s_acc = carry
                (t, s), g = micro_grads(params, mb)
                add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
                return (jax.tree.map(add, g_acc, g), t_acc + t, jax.tree.map(add, s_acc, s)), None

            (grads, total, sums), _ = jax.lax.scan(body, init, micro)
        grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
        return grads, {"loss": total / denom, "denominator": denom, **sums}

    return grads_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    objective: Callable[[nnx.Module, dict, dict], tuple[jax.Array, dict]],
                    denominator: Callable[[dict], jax.Array | dict], *, accum_steps: int = 1, data_shards: int = 1,
                    ema_decay: float | None = None, schedule: optax.Schedule | None = None):
    """Build `train_step(state, batch) -> (state, metrics)` (not yet jitted)."""
    grads_fn = make_grad_fn(graphdef, objective, denominator, accum_steps=accum_steps, data_shards=data_shards)

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen=None):
        grads, metrics = grads_fn(state.params, batch, frozen)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None and ema_decay is not None:
            ema = ema_update(ema, params, ema_decay)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=new_rng,
                             ema_params=ema), metrics

    return train_step


def jit_train_step(train_step, state: TrainState, batch_sharding, frozen=None):
    """Compile with the state's own shardings in and out, donating the old state.

    With `frozen` (a pytree of arrays, e.g. a teacher's params), the step takes it as a third argument
    in its own shardings (not donated).
    """
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    if frozen is None:
        return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, frozen_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)
