"""Dense projections `x @ W` whose weight gradient suits XLA:CPU.

The weight gradient of `y = x W` is `x^T dy`, contracting the token axis, which is the major
axis of both operands. XLA:CPU's matmul library wants the contracting axis of its left operand
minor, so layout assignment inserts a transposing copy, and it often picks `dy` (the larger
operand, e.g. the MLP's [tokens, 4 x hidden] gradient) and fuses the activation's backward into
that copy, which then reads its inputs in column order: in the bench-small SFT step those copies
took ~10% of the step. Here the backward pass transposes `x` itself, once, behind an
`optimization_barrier` (so XLA cannot fold the transpose back into the dot), and the weight
gradient is a plain row-major matmul: an MLP's forward + backward ran 1.4x faster in isolation,
with bit-identical gradients. Only on CPU: TPU and GPU keep autodiff of the einsum, whose matmul
units take either operand layout. The remat policies still see these matmuls (`tests/models/
test_scan.py` checks their memory ordering on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from posttrain_jax.models.attention import traced_platform


def dense(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a projection spec whose x ends in w's input axes, e.g. "btd,dhk->bthk"
    (x [batch, length, in...], w [in..., out...] -> [batch, length, out...])."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    num_in = (len(x_axes) + len(w_axes) - len(out)) // 2  # contracted axes
    if traced_platform() != "cpu" or x_axes[-num_in:] != w_axes[:num_in] or out != x_axes[:-num_in] + w_axes[num_in:]:
        return jnp.einsum(spec, x, w)
    return _dense(num_in, x, w)


def contract(x: jax.Array, w: jax.Array, num_in: int) -> jax.Array:
    """`jnp.tensordot(x, w, axes=num_in)` (x's last num_in axes against w's first), with `dense`'s CPU gradient."""
    if traced_platform() != "cpu":
        return jnp.tensordot(x, w, axes=num_in)
    return _dense(num_in, x, w)


def _matmul(num_in: int, x, w):
    lead, out = x.shape[:-num_in], w.shape[num_in:]
    k = math.prod(w.shape[:num_in])
    return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(num_in: int, x, w):
    return _matmul(num_in, x, w)


def _dense_fwd(num_in: int, x, w):
    # symbolic_zeros: a frozen kernel (a LoRA base) or an input that carries no gradient skips its matmul.
    # Zero-size tokens carry the dtypes the cotangents must have (autodiff gives each input's own dtype).
    dtypes = (jnp.zeros((0,), x.value.dtype), jnp.zeros((0,), w.value.dtype))
    return _matmul(num_in, x.value, w.value), (x.value if w.perturbed else None, w.value if x.perturbed else None,
                                               dtypes)


def _dense_bwd(num_in: int, residuals, g):
    x, w, (x_dtype, w_dtype) = residuals  # x is kept only if w needs a gradient, w only if x does
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    d_x = d_w = None
    if w is not None:  # d x = g W^T: [tokens, out] x [out, in]
        k = math.prod(w.shape[:num_in])
        lead = g.shape[:g.ndim - (w.ndim - num_in)]
        d_x = (g.reshape(math.prod(lead), -1) @ w.reshape(k, -1).T).reshape(*lead, *w.shape[:num_in])
        d_x = d_x.astype(x_dtype.dtype)
    if x is not None:  # d W = x^T g: transpose the smaller of x and g first (behind a barrier), then a plain matmul
        k = math.prod(x.shape[-num_in:])
        out = g.shape[x.ndim - num_in:]
        x2, g2 = x.reshape(-1, k), g.reshape(-1, math.prod(out))
        if g2.shape[1] < k:  # e.g. the MLP's down projection, or a LoRA B: (g^T x)^T, a small result transposed
            d_w = (jax.lax.optimization_barrier(g2.T) @ x2).T
        else:
            d_w = jax.lax.optimization_barrier(x2.T) @ g2
        d_w = d_w.reshape(*x.shape[-num_in:], *out).astype(w_dtype.dtype)
    return d_x, d_w


_dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)
