"""Train state placement, schedules and micro-batch splitting."""

import jax
import numpy as np
import pytest

from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.train import init_train_state, make_optimizer, make_schedule, split_microbatches


def test_optimizer_moments_are_sharded_like_params():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = create_model(preset("tiny-llama"), mesh=mesh)
    tx, _ = make_optimizer(learning_rate=1e-3, total_steps=10)
    _, state = init_train_state(model, tx, mesh=mesh)
    adam = state.opt_state[1][0]
    for p, mu, nu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        assert mu.sharding == p.sharding and nu.sharding == p.sharding
    for scalar in (state.step, state.rng, adam.count):
        assert scalar.sharding.mesh == mesh


def test_schedules():
    lin = make_schedule(learning_rate=1.0, total_steps=100, schedule="linear", warmup_ratio=0.1)
    assert [float(lin(s)) for s in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    cos = make_schedule(learning_rate=1.0, total_steps=20, schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert float(cos(0)) == pytest.approx(1.0) and float(cos(20)) == pytest.approx(0.1)
    assert float(cos(10)) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        make_schedule(learning_rate=1.0, total_steps=5, schedule="step")


def test_microbatches_take_rows_from_each_shard():
    rows = np.arange(16)[:, None]  # shard d holds rows 4d..4d+3 on 4 data shards
    out = np.asarray(split_microbatches({"x": rows}, accum_steps=2, data_shards=4)["x"])[..., 0]
    # Step a takes rows [4d + 2a, 4d + 2a + 1] of every shard d: no row leaves its device.
    assert out.tolist() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    with pytest.raises(ValueError, match="does not split into 3 accumulation steps x 4 data shards"):
        split_microbatches({"x": rows}, accum_steps=3, data_shards=4)
