"""Token-embedding lookup that keeps the table and its gradient sharded.

The table is `[vocab, embed]`, sharded like every weight: vocab over the
tensor axis, embed over fsdp (default rules). Left to GSPMD, a gather from it
either replicates the table on every chip (one all-gather of the whole table
per step, and an all-reduce of its whole gradient in the backward pass) or
replicates the activations. Here the lookup is written per shard with
`jax.shard_map`:

1. all-gather the token ids over the embed axes (int32, [tokens] per chip:
   small next to the table),
2. look up this chip's `[vocab / tensor, embed / fsdp]` block for all of them,
   zero where a token lies outside this chip's vocabulary range, and sum over
   the vocab axes (a masked lookup: exactly one chip contributes each row),
3. all-to-all over the embed axes: each chip gets back its own rows with the
   whole hidden dimension.

The backward pass is the transpose of these three steps: an all-to-all of the
activation gradient, a scatter-add into this chip's own block, and (only over
axes the table is replicated on, e.g. `data`) an all-reduce of that block.
No chip ever holds the whole table or its whole gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from posttrain_jax.sharding import active_rules, constrain, logical_to_spec


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """`table[tokens]` cast to `dtype`: [batch, length, embed], batch sharded like activations.

    table: [vocab, embed] (any float dtype); tokens: [batch, length] int.
    Without an active mesh and logical rules this is `jnp.take`. The sharded
    path needs the batch to split over the batch axes, every embed axis to be
    a batch axis too (true for the default rules: embed -> fsdp, batch ->
    (data, fsdp)) and whole hidden states in activations (`act_embed` and
    `length` unsharded); otherwise the lookup is left to GSPMD from the
    table's own sharding, which still never replicates the table.
    Token ids outside [0, vocab) give zero vectors on the sharded path
    (`jnp.take` clamps them); the data pipeline never produces them.
    """
    rules = active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return jnp.take(table, tokens, axis=0).astype(dtype)
    table_spec = logical_to_spec(("vocab", "embed"), rules, mesh.axis_names)
    tokens_spec = logical_to_spec(("batch", "length"), rules, mesh.axis_names)
    out_spec = logical_to_spec(("batch", "length", "act_embed"), rules, mesh.axis_names)
    vocab_axes, embed_axes = _axes(table_spec[0]), _axes(table_spec[1])
    batch_axes = _axes(tokens_spec[0])
    batch_parts = int(np.prod([mesh.shape[a] for a in batch_axes]))
    if (not set(embed_axes) <= set(batch_axes) or tokens_spec[1] is not None or out_spec[2] is not None
            or tokens.shape[0] % batch_parts):
        # e.g. decoding a batch smaller than the data-parallel axes: GSPMD from the table's own sharding.
        x = jnp.take(constrain(table, ("vocab", "embed")), tokens, axis=0).astype(dtype)
        return constrain(x, ("batch", "length", "act_embed"))
    vocab_shard = table.shape[0] // int(np.prod([mesh.shape[a] for a in vocab_axes]))

    def lookup(block, ids):
        if embed_axes:
            ids = jax.lax.all_gather(ids, embed_axes, axis=0, tiled=True)
        if vocab_axes:
            local = ids - jax.lax.axis_index(vocab_axes) * vocab_shard
            inside = (local >= 0) & (local < vocab_shard)
            rows = jnp.take(block, jnp.where(inside, local, 0), axis=0)
            rows = jax.lax.psum(jnp.where(inside[..., None], rows, jnp.zeros((), rows.dtype)), vocab_axes)
        else:
            rows = jnp.take(block, ids, axis=0)
        rows = rows.astype(dtype)  # the all-to-all moves compute-dtype activations
        if embed_axes:  # [rows of the embed group, T, D / n] -> [own rows, T, D]
            rows = jax.lax.all_to_all(rows, embed_axes, split_axis=0, concat_axis=2, tiled=True)
        return rows

    return jax.shard_map(lookup, mesh=mesh, in_specs=(table_spec, tokens_spec),
                         out_specs=P(tokens_spec[0], None, None))(table, tokens)
