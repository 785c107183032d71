"""Build a model with every parameter created directly in its sharding."""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.transformer import Decoder
from posttrain_jax.sharding import DEFAULT_RULES, Rules, state_shardings


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and a state of ShapeDtypeStructs (no memory allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))


def model_shardings(config: ModelConfig, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """Per-parameter NamedShardings (all on the first device when there is no mesh)."""
    _, abstract = abstract_model(config)
    if mesh is None:
        single = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda v: v.replace(single), abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return state_shardings(abstract, mesh, rules)


def create_model(config: ModelConfig, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 seed: int = 0) -> Decoder:
    """A randomly initialised model; with a mesh, each shard is created on its own device."""
    if mesh is None:
        return Decoder(config, rngs=nnx.Rngs(seed))
    graphdef, _ = abstract_model(config)
    shardings = model_shardings(config, mesh, rules)

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Decoder(config, rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, init())
