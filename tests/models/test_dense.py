"""The CPU dense projection (custom weight gradient) against autodiff of the einsum it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from posttrain_jax.models.dense import dense

SPECS = {"btd,dhk->bthk": ((2, 5, 8), (8, 3, 4)), "bthk,hkd->btd": ((2, 5, 3, 4), (3, 4, 8)),
         "btd,dm->btm": ((2, 5, 8), (8, 6)), "btm,md->btd": ((2, 5, 6), (6, 8))}


def _inputs(spec):
    x_shape, w_shape = SPECS[spec]
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_values_and_gradients_equal_einsum(spec):
    x, w = _inputs(spec)
    ours = lambda x, w: jnp.sum(jnp.sin(dense(x, w, spec)))  # noqa: E731
    ref = lambda x, w: jnp.sum(jnp.sin(jnp.einsum(spec, x, w)))  # noqa: E731
    np.testing.assert_array_equal(jax.jit(lambda x, w: dense(x, w, spec))(x, w), jnp.einsum(spec, x, w))
    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(x, w)
    want = jax.grad(ref, argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # A frozen kernel (LoRA's base) or an input without gradient: the other gradient alone, unchanged.
    np.testing.assert_allclose(jax.grad(ours)(x, w), want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(ours, 1)(x, w), want[1], rtol=1e-6, atol=1e-6)


def test_sharded_rows_and_kernel_match():
    spec = "btd,dm->btm"
    x, w = jax.random.normal(jax.random.key(1), (8, 4, 8)), jax.random.normal(jax.random.key(2), (8, 6))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w, spec))), argnums=(0, 1)))
    want = grad(x, w)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        ws = jax.device_put(w, NamedSharding(mesh, P("fsdp")))
        got = grad(xs, ws)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cotangents_keep_each_input_dtype():
    """As autodiff of the einsum: d x in x's dtype, d W in W's, also when only one is differentiated."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 8)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (8, 6))
    f = lambda x, w: jnp.sum(dense(x, w, "btd,dm->btm").astype(jnp.float32))  # noqa: E731
    d_x, d_w = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    assert (d_x.dtype, d_w.dtype) == (jnp.bfloat16, jnp.float32)
    assert jax.grad(f)(x, w).dtype == jnp.bfloat16 and jax.grad(f, 1)(x, w).dtype == jnp.float32
