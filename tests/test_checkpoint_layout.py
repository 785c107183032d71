"""Runs saved before layers were scanned (one `blocks.<i>` entry per layer) restore into the scanned model."""

import jax
import numpy as np
import pytest

from posttrain_jax.checkpointing import RunCheckpointer, abstract_target, load_params
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import abstract_model, model_shardings, preset
from posttrain_jax.models.config import FULL, SLIDING
from posttrain_jax.models.stacking import scanned_location
from tests.test_checkpoint import TrainState, make_state

# Period 2, two scanned groups and one tail layer: every kind of leaf the conversion meets.
CONFIG = preset("tiny-gemma3", num_layers=5, layer_types=(SLIDING, FULL) * 2 + (SLIDING,))


def _flat(tree):
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)}


def _assert_is_stacked(scanned_tree, per_layer_tree):
    """Every per-layer leaf equals its slice of the scanned tree; every other leaf is equal."""
    scanned, per_layer = _flat(scanned_tree), _flat(per_layer_tree)
    seen = set()
    for name, value in per_layer.items():
        if ".blocks." in f".{name}":
            prefix, rest = name.split("blocks.", 1)
            layer, rest = rest.split(".", 1)
            where, g = scanned_location(CONFIG, int(layer))
            key = f"{prefix}{where}.{rest}"
            np.testing.assert_array_equal(scanned[key] if g is None else scanned[key][g], value, err_msg=name)
        else:
            key = name
            np.testing.assert_array_equal(scanned[key], value, err_msg=name)
        seen.add(key)
    assert seen == set(scanned)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, mesh):
    """A run written by the unscanned layout (as every run before scanned layers was)."""
    state = make_state(CONFIG.replace(scan_layers=False), mesh=mesh)
    assert "blocks" in state.params and "layers" not in state.params
    directory = tmp_path_factory.mktemp("old_run")
    with RunCheckpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(3, state, data_state={"position": 3})
    return directory, state


def test_old_run_resumes_scanned(old_run, mesh):
    directory, old_state = old_run
    target = abstract_target(make_state(CONFIG, mesh=mesh, seed=1))  # the scanned run's state
    with RunCheckpointer(directory) as checkpointer:
        restored, data_state, _ = checkpointer.restore(target=target)
    assert isinstance(restored, TrainState) and data_state == {"position": 3}
    assert restored.params["layers"][0]["attn"]["q"].shape[0] == 2
    # params, both AdamW moments and the EMA: all stacked from the per-layer leaves.
    _assert_is_stacked(restored, old_state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_old_run_params_load_scanned(old_run, mesh):
    directory, old_state = old_run
    abstract = abstract_model(CONFIG)[1]
    params = load_params(directory, target=abstract_target(abstract, model_shardings(CONFIG, mesh)))
    _assert_is_stacked(params, old_state.params)
    ema = load_params(directory, target=abstract_target(abstract, model_shardings(CONFIG, mesh)),
                      params_key="ema_params")
    _assert_is_stacked(ema, old_state.ema_params)


def test_scanned_run_into_unscanned_target_says_what_to_do(tmp_path, mesh):
    state = make_state(CONFIG, mesh=mesh)
    with RunCheckpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)
        unscanned = abstract_target(make_state(CONFIG.replace(scan_layers=False), mesh=mesh))
        with pytest.raises(ValueError, match=r"has scanned layers .* restore it with model.scan_layers=True"):
            checkpointer.restore(target=unscanned)
