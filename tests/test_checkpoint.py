"""Checkpointing: whole-run save/restore across mesh shapes, crash safety, averaging, EMA."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, struct

from posttrain_jax.checkpointing import (MODEL_CONFIG_KEY, RunCheckpointer, abstract_target, average_checkpoints,
                                      ema_update, load_params, read_metadata, resolve_step_dir)
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import abstract_model, model_shardings, preset
from posttrain_jax.cpu_devices import host_device_flags

# 4 KV heads (tiny-llama has 2) so the (1, 2, 4) mesh can split them over `tensor`.
CONFIG = preset("tiny-llama", num_kv_heads=4)


@struct.dataclass
class TrainState:  # stands in for the train loop's TrainState: any pytree of arrays
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array
    ema_params: nnx.State | None = None


def _host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(_host(a), _host(e))


def assert_shardings(actual, target):
    for a, t in zip(jax.tree.leaves(actual), jax.tree.leaves(target), strict=True):
        assert a.sharding.is_equivalent_to(t.sharding, a.ndim), (a.sharding, t.sharding)


TX = optax.adamw(1e-2)


@jax.jit
def _one_adamw_step(params):
    opt_state = TX.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_params(config, seed, mesh):
    """Random params of the model's exact tree, shapes, dtypes and shardings.

    (Drawn with numpy rather than by `create_model`, whose jitted init compiles
    anew on every call: seconds per model.)
    """
    _, abstract = abstract_model(config)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf, sharding: jax.device_put(
            (rng.standard_normal(leaf.shape) * 0.1).astype(leaf.dtype), sharding),
        abstract, model_shardings(config, mesh))


def make_state(config=CONFIG, seed=0, mesh=None):
    """A run state after one adamw step: non-zero moments, count 1, a typed PRNG key, EMA params."""
    mesh = mesh or make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, opt_state = _one_adamw_step(make_params(config, seed, mesh))
    return TrainState(step=jnp.array(1, jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key(7), ema_params=jax.tree.map(lambda p: p * 0.5, params))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def state(mesh):
    return make_state(mesh=mesh)


DATA_STATE = {"epoch": 1, "position": 1234, "shard": [0, 8]}
METADATA = {MODEL_CONFIG_KEY: json.loads(json.dumps(dataclasses.asdict(CONFIG))), "tokenizer": "/tok"}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, state):
    directory = tmp_path_factory.mktemp("run")
    with RunCheckpointer(directory, keep=3, async_save=True) as checkpointer:
        assert checkpointer.save(1, state, data_state=DATA_STATE, metadata=METADATA)
    return directory


def test_save_restore_roundtrip(saved_run, state):
    target = abstract_target(state)
    with RunCheckpointer(saved_run) as checkpointer:
        assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
        restored, data_state, metadata = checkpointer.restore(target=target)
    assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert_trees_equal(restored, state)
    assert_shardings(restored, target)
    assert data_state == DATA_STATE and metadata == METADATA


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 2, 4)])
def test_restore_onto_another_mesh_shape(saved_run, state, shape):
    new_mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    # Params by the model's sharding rules on the new mesh; the rest keeps its specs on the new mesh.
    target = abstract_target(state, new_mesh)
    target = target.replace(params=abstract_target(state.params, model_shardings(CONFIG, new_mesh)))
    with RunCheckpointer(saved_run) as checkpointer:
        restored, data_state, _ = checkpointer.restore(target=target)
    assert_trees_equal(restored, state)
    assert_shardings(restored, target)
    embed = restored.params["embed"].get_raw_value()
    assert embed.sharding.mesh.shape == new_mesh.shape
    assert data_state == DATA_STATE


def test_keep_last_k(tmp_path):
    state = {"w": jnp.arange(8.0), "step": jnp.array(0)}
    with RunCheckpointer(tmp_path, keep=2, async_save=False) as checkpointer:
        for step in range(1, 6):
            assert checkpointer.save(step, {**state, "step": jnp.array(step)})
        assert checkpointer.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


def test_save_interval_and_force(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with RunCheckpointer(tmp_path, keep=None, save_interval_steps=5, async_save=False) as checkpointer:
        saved = [step for step in range(1, 13) if checkpointer.save(step, state)]
        # Orbax also saves the first step of a run that has no checkpoint yet.
        assert saved == [1, 5, 10]
        assert checkpointer.save(12, state, force=True)
        assert not checkpointer.save(12, state, force=True)  # already saved: skipped, not an error
        assert checkpointer.all_steps() == [1, 5, 10, 12]


def test_async_save_snapshots_state_then_wait(tmp_path, mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    weights = jax.device_put(jnp.arange(512 * 512, dtype=jnp.float32).reshape(512, 512), sharding)
    expected = np.asarray(weights)
    state = {"w": weights * 1.0, "step": jnp.array(3)}
    data_state = {"position": [1, 2]}
    target = abstract_target(state)
    checkpointer = RunCheckpointer(tmp_path, async_save=True)
    assert checkpointer.save(3, state, data_state=data_state)
    # The train step donates the state and the loop moves on while Orbax writes.
    state["w"].delete()
    data_state["position"].append(3)
    checkpointer.wait()
    assert checkpointer.latest_step() == 3
    restored, restored_data, metadata = checkpointer.restore(target=target)
    checkpointer.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
    assert restored_data == {"position": [1, 2]} and metadata is None


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from posttrain_jax.checkpointing import RunCheckpointer
    from posttrain_jax.mesh import make_mesh

    kill_point, directory = sys.argv[1], sys.argv[2]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    def state(step):
        return {"w": jax.device_put(jnp.arange(4096.0) * step, sharding), "step": jnp.array(step)}
    checkpointer = RunCheckpointer(directory, keep=3, async_save=True)
    checkpointer.save(1, state(1), data_state={"position": 1}, metadata={"step": 1})
    checkpointer.wait()

    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_point == "before_commit":  # every file of step 2 written, nothing committed
        async def finalize(self):
            die()
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:  # commit_success.txt written inside the tmp dir, only the final rename missing
        rename = atomicity.async_path.rename
        async def rename_or_die(src, dst, *args, **kwargs):
            if os.path.basename(str(dst).rstrip("/")) == "2":
                die()
            return await rename(src, dst, *args, **kwargs)
        atomicity.async_path.rename = rename_or_die
    checkpointer.save(2, state(2), data_state={"position": 2}, metadata={"step": 2})
    checkpointer.wait()
""")


@pytest.mark.parametrize("kill_point", ["before_commit", "before_rename"])
def test_save_killed_midway_is_ignored(tmp_path, mesh, kill_point):
    run_dir = tmp_path / "run"
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": host_device_flags(8), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(script), kill_point, str(run_dir)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    partial = run_dir / "2.orbax-checkpoint-tmp"
    assert partial.is_dir() and list(partial.glob("state*/manifest.ocdbt"))  # the arrays were written
    assert (partial / "commit_success.txt").exists() == (kill_point == "before_rename")

    # Read-only paths see only the complete step.
    assert resolve_step_dir(run_dir).name == "1"
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_step_dir(partial)
    with pytest.raises(FileNotFoundError, match="complete steps: \\[1\\]"):
        resolve_step_dir(run_dir, 2)

    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    target = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=sharding),
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.update(spec=()))}
    with RunCheckpointer(run_dir, read_only=True) as reader:  # e.g. an evaluation job
        assert reader.latest_step() == 1
        with pytest.raises(ValueError, match="read-only"):
            reader.save(3, {"w": jnp.zeros(2)}, force=True)
    assert partial.exists()  # a reader never deletes what may be a live run's save in progress
    with RunCheckpointer(run_dir, keep=3) as checkpointer:
        assert checkpointer.latest_step() == 1 and checkpointer.all_steps() == [1]
        restored, data_state, metadata = checkpointer.restore(target=target)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096.0))
        assert (data_state, metadata) == ({"position": 1}, {"step": 1})
        # The resumed run reaches step 2 again and saves it normally.
        assert checkpointer.save(2, {"w": restored["w"] * 2, "step": jnp.array(2)}, data_state={"position": 2})
        checkpointer.wait()
        assert not partial.exists()  # the writer removed the interrupted save (in the background, before saving)
        assert checkpointer.all_steps() == [1, 2]
        restored, data_state, _ = checkpointer.restore(target=target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096.0) * 2)
    assert data_state == {"position": 2}


def test_restore_errors_name_the_problem(saved_run, state, mesh, tmp_path):
    other_model = preset("tiny-llama", num_kv_heads=4, intermediate_size=256)
    other = abstract_target(state).replace(
        params=abstract_target(abstract_model(other_model)[1], model_shardings(other_model, mesh)))
    with RunCheckpointer(saved_run) as checkpointer:
        with pytest.raises(ValueError, match=r"'params\.layers\.0\.mlp\.down\.value' has shape \(2, 128, 64\) in "
                                             r"the checkpoint but \(2, 256, 64\)"):
            checkpointer.restore(target=other)
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 7 .* complete steps: \[1\]"):
            checkpointer.restore(7, target=abstract_target(state))
        no_sharding = jax.eval_shape(lambda: state)
        with pytest.raises(ValueError, match="'step' has no sharding"):
            checkpointer.restore(target=no_sharding)
        with pytest.raises(ValueError, match="the checkpoint has 'ema_params.*pass partial=True"):
            checkpointer.restore(target=abstract_target(state.replace(ema_params=None)))
        # A new run taking only the weights of an old one.
        params, _, _ = checkpointer.restore(target={"params": abstract_target(state.params)}, partial=True)
        assert_trees_equal(params["params"], state.params)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        RunCheckpointer(tmp_path / "empty").restore(target=abstract_target(state))


def test_data_state_is_per_process(saved_run, state, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    files = [p.name for p in (run_dir / "1" / "data_state").glob("process_*")]
    assert files == ["process_0-of-1.json"]
    # As if the run had been saved by two processes.
    os.rename(run_dir / "1" / "data_state" / files[0], run_dir / "1" / "data_state" / "process_0-of-2.json")
    with RunCheckpointer(run_dir) as checkpointer:
        with pytest.raises(ValueError, match="process 0 of 1.*restore_data_state=False"):
            checkpointer.restore(target=abstract_target(state))
        restored, data_state, metadata = checkpointer.restore(target=abstract_target(state), restore_data_state=False)
    assert data_state is None and metadata == METADATA


def test_metadata_must_be_json(tmp_path):
    with RunCheckpointer(tmp_path, async_save=False) as checkpointer:
        with pytest.raises(ValueError, match=r"metadata\['config'\]\['lr'\] \(a ArrayImpl\) is not|"
                                             r"metadata\['config'\]\['lr'\] \(a ArrayImpl\)"):
            checkpointer.save(1, {"w": jnp.zeros(2)}, metadata={"config": {"lr": jnp.array(1.0)}})
        assert checkpointer.all_steps() == []


def test_load_params(saved_run, state, mesh):
    step_dir = saved_run / "1"
    on_host = load_params(saved_run)
    np.testing.assert_array_equal(on_host["layers"]["0"]["attn"]["q"]["value"],
                                  np.asarray(state.params["layers"][0]["attn"]["q"].get_raw_value()))
    target = abstract_target(state.params, model_shardings(CONFIG, mesh))
    params = load_params(step_dir, target=target)
    assert_trees_equal(params, state.params)
    assert_trees_equal(load_params(saved_run, 1, target=target, params_key="ema_params"), state.ema_params)
    model = nnx.merge(abstract_model(CONFIG)[0], params)  # ready for export_hf
    np.testing.assert_array_equal(np.asarray(model.embed.get_raw_value()),
                                  np.asarray(state.params["embed"].get_raw_value()))
    assert read_metadata(step_dir) == METADATA


# ---------------------------------------------------------------- averaging

def _save_run(directory, state, metadata, step=10):
    with RunCheckpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(step, state, metadata=metadata, force=True)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, mesh):
    root = tmp_path_factory.mktemp("average")
    states = []
    for seed in range(3):
        state = make_state(seed=seed, mesh=mesh)
        _save_run(root / f"run{seed}", state, METADATA, step=10 * (seed + 1))
        states.append(state)
    return root, states


def _reference_average(trees, weights):
    """Independent numpy: float32 weighted sum in checkpoint order, cast back to the stored dtype."""
    weights = np.asarray(weights, np.float64)
    weights = (weights / weights.sum()).tolist()
    def mean(*leaves):
        total = np.float32(weights[0]) * np.asarray(leaves[0], np.float32)
        for weight, leaf in zip(weights[1:], leaves[1:]):
            total = total + np.float32(weight) * np.asarray(leaf, np.float32)
        return total.astype(np.asarray(leaves[0]).dtype)
    return jax.tree.map(mean, *trees)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_average_matches_numpy(three_runs, mesh, tmp_path, weights):
    root, states = three_runs
    target = abstract_target(states[0].params)
    sources = [root / "run0", (root / "run1", 20), root / "run2" / "30"]
    out = average_checkpoints(sources, tmp_path / "avg", weights=weights, target=target)
    assert out.name == "30"
    averaged = load_params(tmp_path / "avg", target=target)
    expected = _reference_average([s.params for s in states], weights or [1, 1, 1])
    assert_trees_equal(averaged, expected)
    assert_shardings(averaged, target)
    metadata = read_metadata(out)
    assert metadata[MODEL_CONFIG_KEY] == METADATA[MODEL_CONFIG_KEY]
    assert [entry["weight"] for entry in metadata["averaged_from"]] == pytest.approx(
        [1 / 3] * 3 if weights is None else [1 / 8, 2 / 8, 5 / 8])
    # An averaged checkpoint has params only: a full-run restore says so.
    with RunCheckpointer(tmp_path / "avg") as checkpointer, pytest.raises(ValueError, match="holds params only"):
        checkpointer.restore(target=abstract_target(states[0]))


def test_average_reads_one_params_leaf_at_a_time(three_runs, tmp_path, monkeypatch):
    root, states = three_runs
    reads = []
    restore = ocp.PyTreeCheckpointHandler.restore

    def recording_restore(self, directory, *positional, args=None, **keywords):
        names = [".".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(args.item)[0]]
        reads.append((args.partial_restore, names))
        return restore(self, directory, *positional, args=args, **keywords)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", recording_restore)
    average_checkpoints([root / "run0", root / "run1"], tmp_path / "avg")
    monkeypatch.undo()
    # Each read is a partial restore of a single params leaf: the optimizer state and EMA
    # params in these checkpoints are never read, nor is more than one leaf at a time.
    assert len(reads) == 2 * len(jax.tree.leaves(states[0].params))
    assert all(partial and len(names) == 1 and names[0].startswith("params.") for partial, names in reads)


def test_average_bfloat16_on_host(tmp_path):
    config = preset("tiny-llama", num_kv_heads=4, param_dtype="bfloat16")
    metadata = {MODEL_CONFIG_KEY: json.loads(json.dumps(dataclasses.asdict(config)))}
    one_device = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params = [make_params(config, seed, one_device) for seed in range(3)]
    for seed, tree in enumerate(params):
        _save_run(tmp_path / f"run{seed}", {"params": tree}, metadata)
    average_checkpoints([tmp_path / f"run{seed}" for seed in range(3)], tmp_path / "avg", weights=[3, 1, 1])
    averaged = load_params(tmp_path / "avg", target=abstract_target(params[0]))
    assert {leaf.dtype for leaf in jax.tree.leaves(averaged)} == {jnp.dtype(jnp.bfloat16)}
    assert_trees_equal(averaged, _reference_average(params, [3, 1, 1]))


@pytest.mark.parametrize("other_config, message", [
    (dict(intermediate_size=256), r"'params\.layers\.0\.mlp\.down\.value' has shape \(2, 128, 64\) in .*run0/10 "
                                  r"but \(2, 256, 64\) in .*other"),
    (dict(tie_embeddings=True), r"'params\.lm_head\.value' is in .*run0/10 but not in .*other"),
])
def test_average_refuses_other_architectures(three_runs, mesh, tmp_path, other_config, message):
    root, _ = three_runs
    config = preset("tiny-llama", num_kv_heads=4, **other_config)
    _save_run(tmp_path / "other", {"params": make_params(config, 0, mesh)}, {"tokenizer": "/tok"})
    # Without model configs in the metadata, the tree comparison catches it.
    _save_run(tmp_path / "run0", {"params": load_params(root / "run0")}, {"tokenizer": "/tok"})
    with pytest.raises(ValueError, match=message):
        average_checkpoints([tmp_path / "run0", tmp_path / "other"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists() or os.listdir(tmp_path / "avg") == []


def test_average_refuses_other_model_config(three_runs, mesh, tmp_path):
    root, _ = three_runs
    config = preset("tiny-llama", num_kv_heads=4, rms_norm_eps=1e-6)  # same shapes, another model
    metadata = {MODEL_CONFIG_KEY: json.loads(json.dumps(dataclasses.asdict(config)))}
    _save_run(tmp_path / "other", {"params": make_params(config, 0, mesh)}, metadata)
    with pytest.raises(ValueError, match=r"differ in model_config: 'rms_norm_eps' is 1e-05 in the first but 1e-06"):
        average_checkpoints([root / "run0", tmp_path / "other"], tmp_path / "avg")


def test_average_argument_errors(three_runs, tmp_path):
    root, _ = three_runs
    runs = [root / "run0", root / "run1"]
    with pytest.raises(ValueError, match="weight 1 is -1.0"):
        average_checkpoints(runs, tmp_path / "a", weights=[1, -1])
    with pytest.raises(ValueError, match="got 3 weights for 2 checkpoints"):
        average_checkpoints(runs, tmp_path / "a", weights=[1, 1, 1])
    average_checkpoints(runs, tmp_path / "a")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        average_checkpoints(runs, tmp_path / "a")


# ---------------------------------------------------------------- EMA

def test_ema_update_math():
    rng = np.random.default_rng(0)
    ema = {"w": rng.standard_normal((4, 3)).astype(np.float32),
           "b": rng.standard_normal(3).astype(ml_dtypes.bfloat16), "count": np.int32(3)}
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32),
              "b": rng.standard_normal(3).astype(ml_dtypes.bfloat16), "count": np.int32(4)}
    decay = 0.9
    out = jax.jit(ema_update)(ema, params, decay)  # decay traced
    for key in ("w", "b"):
        old, new = ema[key].astype(np.float32), params[key].astype(np.float32)
        expected = np.float32(decay) * old + np.float32(1 - decay) * new
        # float32 rounding of the two products and their sum (XLA may fuse them), then the
        # rounding to the EMA's dtype: a bound from the magnitudes, not a fudge factor.
        bound = (3 * np.finfo(np.float32).eps * (np.abs(np.float32(decay) * old) + np.abs(np.float32(1 - decay) * new))
                 + float(jnp.finfo(ema[key].dtype).eps) * np.abs(expected))
        assert out[key].dtype == ema[key].dtype
        assert np.all(np.abs(np.asarray(out[key], np.float32) - expected) <= bound), key
    assert int(out["count"]) == 4
    # decay 1 keeps the EMA, decay 0 copies the params.
    np.testing.assert_array_equal(ema_update(ema, params, 1.0)["w"], ema["w"])
    np.testing.assert_array_equal(ema_update(ema, params, 0.0)["w"], params["w"])
