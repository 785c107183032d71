"""The SFT trainer end to end: pulse, no recompilation, crash + resume, averaging, export."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
import torch

from posttrain_jax.checkpointing import load_params
from posttrain_jax.trainers import sft
from posttrain_jax.models.from_config import load_checkpoint_model
from posttrain_jax.cpu_devices import host_device_flags
from tests.trainers.sft_helpers import SMALL, read_metrics, small_config



def test_pulse_on_8_devices(tmp_path):
    """2 accumulation steps on a (2,2,2) mesh: loss falls, one compilation, files written."""
    summary = sft.main(small_config(tmp_path, "--config.train.steps=12", "--config.train.accum_steps=2",
                                    "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"))
    rows = read_metrics(tmp_path)
    assert sorted(rows) == list(range(1, 13))
    assert rows[12]["train/loss"] < 0.6 * rows[1]["train/loss"]
    assert summary["compilations"] == 1
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    for key in ("train/grad_norm", "train/learning_rate", "train/tokens_per_s", "train/mfu",
                "train/loss_per_token", "train/loss_tokens", "train/step_time_s"):
        assert key in rows[12], key
    assert os.listdir(tmp_path / "tensorboard")
    assert os.path.isdir(tmp_path / "checkpoints" / "12")


def _cli(out, *extra, kill_at=0, after_save=True, devices=8):
    env = dict(os.environ, XLA_FLAGS=host_device_flags(devices), JAX_PLATFORMS="cpu")
    if kill_at:
        env["POSTTRAIN_JAX_TEST_SIGKILL_AT_STEP"] = str(kill_at)
        env["POSTTRAIN_JAX_TEST_SIGKILL_AFTER_SAVE"] = "1" if after_save else "0"
    cmd = [sys.executable, "-m", "posttrain_jax.cli", "sft", f"--config.output_dir={out}", *SMALL, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _params(out, step=None):
    return [np.asarray(x) for x in jax.tree.leaves(load_params(os.path.join(out, "checkpoints"), step))]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = _cli(out, "--config.train.steps=6", "--config.train.checkpoint_every=3")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigkill_then_resume_is_exact(straight_run, tmp_path):
    """Train 3 steps, SIGKILL, resume, 3 more: the same losses and parameters as 6 straight."""
    killed = _cli(tmp_path, "--config.train.steps=6", "--config.train.checkpoint_every=3", kill_at=3)
    assert killed.returncode == -9
    resumed = _cli(tmp_path, "--config.train.steps=6", "--config.train.checkpoint_every=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stderr
    a, b = read_metrics(straight_run), read_metrics(tmp_path)
    losses = [(a[s]["train/loss"], b[s]["train/loss"]) for s in range(1, 7)]
    print("losses straight vs killed+resumed:", losses)
    assert all(x == y for x, y in losses)
    for x, y in zip(_params(straight_run), _params(tmp_path)):
        np.testing.assert_array_equal(x, y)


def test_killed_mid_save_resumes_from_last_complete(straight_run, tmp_path):
    """SIGKILL while step 5's async save is being written: resume from step 4, the last complete one."""
    args = ["--config.train.steps=6", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2"]
    killed = _cli(tmp_path, *args, kill_at=5, after_save=False)
    assert killed.returncode == -9
    assert any(name.endswith(".orbax-checkpoint-tmp") for name in os.listdir(tmp_path / "checkpoints"))
    resumed = _cli(tmp_path, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stderr
    for x, y in zip(_params(straight_run), _params(tmp_path)):
        np.testing.assert_array_equal(x, y)


def test_resume_on_another_mesh(straight_run, tmp_path):
    """A checkpoint from a (1,8,1) run resumes on (2,2,2); losses agree to fp32 reduction order."""
    first = _cli(tmp_path, "--config.train.steps=6", "--config.train.checkpoint_every=3", kill_at=3)
    assert first.returncode == -9
    again = _cli(tmp_path, "--config.train.steps=6", "--config.train.checkpoint_every=3", "--resume",
                 "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = read_metrics(straight_run), read_metrics(tmp_path)
    for s in range(4, 7):
        assert abs(a[s]["train/loss"] - b[s]["train/loss"]) < 1e-5 * abs(a[s]["train/loss"])


def test_average_then_export_loads_in_transformers(straight_run, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ckpts = [os.path.join(straight_run, "checkpoints", s) for s in ("3", "6")]
    avg = tmp_path / "avg"
    run = subprocess.run([sys.executable, "-m", "posttrain_jax.cli", "average", "--checkpoints", *ckpts,
                          "--weights", "1", "3", "--out", str(avg)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [0.25 * x + 0.75 * y for x, y in zip(_params(straight_run, 3), _params(straight_run, 6))]
    for x, y in zip(expected, [np.asarray(v) for v in jax.tree.leaves(load_params(str(avg)))]):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
    hf_dir = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "posttrain_jax.cli", "export", "--checkpoint", str(avg),
                          "--out", str(hf_dir)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    model = load_checkpoint_model(str(avg))
    tokens = np.random.RandomState(0).randint(4, 500, (2, 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(tokens))) - ref).max() < 1e-4


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(KeyError, match=r"unknown config key 'train.stepz'.*valid keys there: .*accum_steps"):
        small_config(tmp_path, "--config.train.stepz=3")
    with pytest.raises(ValueError, match=r"--config.train.steps=abc: not a valid int"):
        small_config(tmp_path, "--config.train.steps=abc")
    result = subprocess.run([sys.executable, "-m", "posttrain_jax.cli", "sft", "--bogus"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
    with pytest.raises(ValueError, match=r"loss_aggregation 'avg'.*sum"):
        sft.main(small_config(tmp_path, "--config.train.loss_aggregation=avg", "--config.train.steps=1"))
