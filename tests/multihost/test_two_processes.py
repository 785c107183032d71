"""Multi-controller SPMD on one machine: the SFT trainer as 2 processes x 4 CPU devices vs 1 x 8.

JAX's own multi-host runtime (`jax.distributed`, gloo collectives on CPU, loopback
coordinator) runs the same program in two processes; each feeds its half of every
global batch. The run must match the single-process run on the same 8-device mesh
(losses and final params, to fp32 reduction order: gloo sums across processes in
another order than XLA's in-process all-reduce), and its checkpoint must resume in
a single process and continue as the uninterrupted single-process run does.
"""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from posttrain_jax.checkpointing import load_params
from posttrain_jax.data import synthetic
from posttrain_jax.cpu_devices import host_device_flags

STEPS = 4
TIMEOUT_S = 300
# fp32 sums in another order: losses differ by about an ulp (measured 8.8e-8 relative), params after
# 4 Adam steps by < 4e-7 absolute.
LOSS_RTOL = 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache_dir) -> dict:
    env = dict(os.environ, XLA_FLAGS=host_device_flags(devices), JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false")
    # The resumed single-process run compiles what the first one did: reuse it.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for key in ("POSTTRAIN_JAX_TEST_SIGKILL_AT_STEP", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        env.pop(key, None)
    return env


def _args(data, out, *extra):
    sources = [{"path": str(data / "train.jsonl"), "weight": 1.0, "epochs": 1.0}]
    return [sys.executable, "-m", "posttrain_jax.cli", "sft", f"--config.output_dir={out}",
            "--config.data.quickstart_task=False", f"--config.tokenizer={data / 'tokenizer.model'}",
            f"--config.data.sources={sources!r}", "--config.data.eval_path=", "--config.model.preset=tiny-llama",
            "--config.train.global_batch=16", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.checkpoint_every=2", "--config.train.peak_flops=1e9", *extra]


def _finish(procs: list[tuple[subprocess.Popen, str]]) -> list[tuple[int, str]]:
    """Wait for all; once one fails or time is up, kill the rest (a lone survivor would wait forever)."""
    deadline, timed_out = time.time() + TIMEOUT_S, False
    while any(proc.poll() is None for proc, _ in procs):
        timed_out = time.time() > deadline
        if timed_out or any(proc.returncode not in (None, 0) for proc, _ in procs):
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
            break
        time.sleep(0.2)
    results = [(proc.wait(), open(log).read()) for proc, log in procs]
    if timed_out:
        pytest.fail(f"training processes did not finish within {TIMEOUT_S} s:\n" +
                    "\n".join(err[-2000:] for _, err in results))
    return results


def _launch(cmd, env, log) -> tuple[subprocess.Popen, str]:
    # stderr to a file: a full pipe would block the process (tqdm and gloo write a lot).
    with open(log, "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True), str(log)


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate metric rows (more than one writer?): {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(out, step):
    return [np.asarray(x) for x in jax.tree.leaves(load_params(os.path.join(out, "checkpoints"), step))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a) 1 process x 8 devices and (b) 2 processes x 4 devices, concurrently; then (c) resume (b)'s step-2
    checkpoint in 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("multihost")
    data, cache = root / "data", root / "xla_cache"
    synthetic.make_quickstart_data(data, num_train=400, num_eval=8, seed=0, show_work=True, max_operand=19)
    started, cpu_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    one, two, resumed = root / "one", root / "two", root / "resumed"
    port = _free_port()
    procs = [_launch(_args(data, one), _env(8, cache), root / "one.log")]
    procs += [_launch(_args(data, two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i)), _env(4, cache), root / f"two_{i}.log") for i in range(2)]
    (rc_one, err_one), (rc0, err0), (rc1, err1) = _finish(procs)
    assert rc_one == 0, err_one[-3000:]
    assert rc0 == 0 and rc1 == 0, f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"
    shutil.copytree(two / "checkpoints" / "2", resumed / "checkpoints" / "2")
    [(rc, err_resumed)] = _finish([_launch(_args(data, resumed, "--resume"), _env(8, cache), root / "resumed.log")])
    assert rc == 0, err_resumed[-3000:]
    wall, cpu = time.time() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    print(f"\nmultihost runs: {wall:.1f} s wall, {cpu_s:.1f} s CPU in the 4 training processes")
    return dict(one=one, two=two, resumed=resumed, err0=err0, err1=err1, err_resumed=err_resumed, wall=wall)


def _max_rel(a: dict, b: dict, steps) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)


def test_two_processes_match_one(runs):
    a, b = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    print("losses 1x8 vs 2x4:", [(a[s], b[s]) for s in a], f"max rel diff {_max_rel(a, b, a):.2e}")
    assert _max_rel(a, b, a) < LOSS_RTOL
    assert b[STEPS] < b[1]  # it trains
    worst = 0.0
    for x, y in zip(_params(runs["one"], STEPS), _params(runs["two"], STEPS), strict=True):
        worst = max(worst, float(np.max(np.abs(x - y))))
        np.testing.assert_allclose(y, x, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    print(f"final params max abs diff {worst:.2e}")


def test_two_process_checkpoint_resumes_in_one_process(runs):
    assert "resumed from step 2" in runs["err_resumed"]
    a, c = _losses(runs["one"]), _losses(runs["resumed"])
    assert sorted(c) == list(range(3, STEPS + 1))
    print("losses 1x8 vs 2x4 -> 1x8 resumed:", [(a[s], c[s]) for s in c], f"max rel diff {_max_rel(a, c, c):.2e}")
    assert _max_rel(a, c, c) < LOSS_RTOL
    worst = 0.0
    for x, y in zip(_params(runs["one"], STEPS), _params(runs["resumed"], STEPS), strict=True):
        worst = max(worst, float(np.max(np.abs(x - y))))
        np.testing.assert_allclose(y, x, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    print(f"final params max abs diff {worst:.2e}")


def test_every_process_saves_only_process_zero_logs(runs):
    step_dir = runs["two"] / "checkpoints" / "2"
    assert sorted(os.listdir(step_dir / "data_state")) == ["commit_success.txt", "process_0-of-2.json",
                                                           "process_1-of-2.json"]
    states = [json.loads((step_dir / "data_state" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states[0] == states[1] and states[0]["grain"] == {"next_index": 2}  # both at batch 2 of their shard
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir / "state"))  # both wrote arrays
    assert "saving checkpoint for step 2" in runs["err0"]
    assert "saving checkpoint for step 2" not in runs["err1"]  # process 1 logs warnings only
    assert "train:" not in runs["err1"]  # and shows no progress bar
    assert os.listdir(runs["two"] / "tensorboard")
