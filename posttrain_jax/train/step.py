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
from posttrain_jax.models.lora import has_adapters, set_dropout_keys, trainable_filter
from posttrain_jax.sharding import constrain


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's Params (float32 master weights)
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0, ema: bool = False,
                     mesh: jax.sharding.Mesh | None = None, trainable=nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
    """Split the model and build the optimizer state next to each (sharded) trainable parameter.

    `trainable` filters what is trained (default: every Param); with LoRA it is the
    adapters (`posttrain_jax.models.lora.trainable_filter`), and the rest is the frozen
    state (`frozen_state`) passed to the step as an argument, never held in the run state,
    its optimizer moments or its checkpoints.
    With a mesh, scalars (step, RNG) are replicated on it so the whole state
    lives on the mesh the step is compiled for.
    """
    graphdef, params, _ = nnx.split(model, trainable, ...)
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


def frozen_state(model: nnx.Module, trainable=nnx.Param) -> nnx.State | None:
    """Everything `init_train_state(..., trainable=...)` does not train; None when that is nothing."""
    _, _, rest = nnx.split(model, trainable, ...)
    return rest if jax.tree.leaves(rest) else None


def trainable_split(model: nnx.Module):
    """(trainable filter, frozen state or None, params -> full model state) for a full or LoRA model.

    LoRA: only the adapters (and a reward model's head) are trained; the frozen base is
    passed to the step as an argument and joined back (no copy) wherever the whole model
    is needed (evaluation, the returned params).
    """
    if not has_adapters(model):
        return nnx.Param, None, lambda params: params
    trainable = trainable_filter(model.config.head)
    base = frozen_state(model, trainable)
    return trainable, base, lambda params: nnx.merge_state(params, base)


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
                 denominator: Callable[[dict], jax.Array | dict], *, accum_steps: int = 1, data_shards: int = 1,
                 dropout: bool = False):
    """`grads(params, batch, frozen=None, base=None, rng=None) -> (grads, metrics)` for a whole global batch,
    divided once.

    `frozen` (e.g. a teacher's params) reaches the objective as `context["frozen"]`; `base` (LoRA: the
    frozen base weights) joins the params in the model. No gradient flows to either.
    With `dropout` (LoRA dropout), `rng` (a typed key) gives each micro-batch its own masks.
    """

    def grads_fn(params, batch, frozen=None, base=None, rng=None):
        extra = () if base is None else (base,)
        context = denominator(batch)
        context = dict(context) if isinstance(context, dict) else {"denominator": context}
        if frozen is not None:
            context["frozen"] = frozen
        denom = context["denominator"]

        def micro_grads(params, micro, key=None):
            def loss(p):
                model = nnx.merge(graphdef, p, *extra)
                if dropout and key is not None:
                    set_dropout_keys(model, key)
                return objective(model, micro, context)
            return jax.value_and_grad(loss, has_aux=True)(params)

        micro = split_microbatches(batch, accum_steps, data_shards)
        keys = None if rng is None else jax.random.split(rng, accum_steps)
        if accum_steps == 1:
            (total, sums), grads = micro_grads(params, jax.tree.map(lambda x: x[0], micro),
                                               None if keys is None else keys[0])
        else:
            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(lambda: micro_grads(params, first)[0][1])
            init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros(()),
                    jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))

            def body(carry, xs):
                g_acc, t_acc, s_acc = carry
                mb, key = xs
                (t, s), g = micro_grads(params, mb, key)
                add = lambda a, b: a + b.astype(a.dtype)  # noqa: E731
                return (jax.tree.map(add, g_acc, g), t_acc + t, jax.tree.map(add, s_acc, s)), None

            (grads, total, sums), _ = jax.lax.scan(body, init, (micro, keys))
        grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
        return grads, {"loss": total / denom, "denominator": denom, **sums}

    return grads_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    objective: Callable[[nnx.Module, dict, dict], tuple[jax.Array, dict]],
                    denominator: Callable[[dict], jax.Array | dict], *, accum_steps: int = 1, data_shards: int = 1,
                    ema_decay: float | None = None, schedule: optax.Schedule | None = None, dropout: bool = False):
    """Build `train_step(state, batch, frozen=None, base=None) -> (state, metrics)` (not yet jitted).

    `dropout`: draw LoRA dropout masks from the state's RNG (a fresh key every step).
    """
    grads_fn = make_grad_fn(graphdef, objective, denominator, accum_steps=accum_steps, data_shards=data_shards,
                            dropout=dropout)

    def train_step(state: TrainState, batch: dict[str, jax.Array], frozen=None, base=None):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1) if dropout else None
        grads, metrics = grads_fn(state.params, batch, frozen, base, step_key)
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


def jit_train_step(train_step, state: TrainState, batch_sharding, frozen=None, base=None):
    """Compile with the state's own shardings in and out, donating the old state.

    With `frozen` (a pytree of arrays, e.g. a teacher's params), the step takes it as a third argument
    in its own shardings (not donated).
    With `base` (LoRA's frozen base weights) the result is `step(state, batch[, frozen])` calling the
    jitted `train_step(state, batch, frozen, base)`: the base is an argument in its own shardings
    (never closed over, never donated, never copied).
    """
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    if frozen is None and base is None:
        return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)
    frozen_sharding = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    if base is None:
        return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, frozen_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0)
    jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, frozen_sharding,
                                               jax.tree.map(lambda x: x.sharding, base)),
                     out_shardings=(state_sharding, None), donate_argnums=0)
    return WithBase(jitted, base)


class WithBase:
    """`step(state, batch, frozen=None)` for a jitted `fn(state, batch, frozen, base)` with `base` bound;
    `_cache_size()` counts its compilations."""

    def __init__(self, jitted, base):
        self.jitted, self.base = jitted, base

    def __call__(self, state, batch, frozen=None):
        return self.jitted(state, batch, frozen, self.base)

    def lower(self, state, batch, frozen=None):
        return self.jitted.lower(state, batch, frozen, self.base)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()
