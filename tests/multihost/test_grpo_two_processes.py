"""GRPO as 2 processes x 4 CPU devices vs 1 x 8: the sampler, rewards and updates across processes.

Each process samples completions for its own prompts on the global mesh, scores them, and
trains on its rows; with partitionable RNG the samples are the same as in one process, so
rewards match exactly and losses to fp32 reduction order.
"""

import json
import os
import sys

import pytest

from posttrain_jax.data import synthetic
from tests.multihost.test_two_processes import _env, _finish, _free_port, _launch

STEPS = 2


def _args(data, out, *extra):
    return [sys.executable, "-m", "posttrain_jax.cli", "grpo", f"--config.output_dir={out}",
            "--config.data.quickstart_task=False", f"--config.tokenizer={data / 'tokenizer.model'}",
            f"--config.data.path={data / 'prompts.jsonl'}", f"--config.data.eval_path={data / 'eval.jsonl'}",
            # 8 eval prompts: 4 per process, split over the 8 data shards of the global mesh (a share per
            # process that is not itself a multiple of the shards, as on a pod with several hosts)
            "--config.data.eval_batch=8", "--config.data.eval_samples=0", "--config.model.checkpoint=",
            "--config.model.preset=quickstart", "--config.grpo.prompts_per_step=8", "--config.grpo.group_size=4",
            "--config.sampling.max_new_tokens=6", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.optim.learning_rate=1e-3", "--config.grpo.beta=0.04",
            # A random model never answers right; a reward it sometimes earns makes the advantages non-zero.
            "--config.rewards=[{'name': 'format', 'pattern': '[0-9]', 'mode': 'search'}]", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_multihost")
    data, cache = root / "data", root / "xla_cache"
    synthetic.make_quickstart_data(data, num_train=16, num_eval=8, seed=0, show_work=True, max_operand=19)
    with open(data / "prompts.jsonl", "w") as f:
        for p in synthetic.generate_problems(32, seed=4, max_operand=9):
            f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    one, two = root / "one", root / "two"
    port = _free_port()
    procs = [_launch(_args(data, one), _env(8, cache), root / "one.log")]
    procs += [_launch(_args(data, two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i)), _env(4, cache), root / f"two_{i}.log") for i in range(2)]
    (rc_one, err_one), (rc0, err0), (rc1, err1) = _finish(procs)
    assert rc_one == 0, err_one[-3000:]
    assert rc0 == 0 and rc1 == 0, f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"
    return one, two


def _rows(out, key="train/loss"):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if f'"{key}"' in line]
    if key != "train/loss":
        return rows
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one writer, every step"
    return rows


def test_grpo_two_processes_match_one(runs):
    one, two = (_rows(out) for out in runs)
    print("1x8 vs 2x4:", [(a["train/reward_mean"], b["train/reward_mean"], a["train/loss"], b["train/loss"])
                          for a, b in zip(one, two)])
    for a, b in zip(one, two):
        for key in ("reward_mean", "reward_std", "completion_length_mean", "zero_std_fraction"):
            assert a[f"train/{key}"] == b[f"train/{key}"], (key, a[f"train/{key}"], b[f"train/{key}"])
        for key in ("loss", "kl", "entropy"):
            assert abs(a[f"train/{key}"] - b[f"train/{key}"]) <= 1e-5 * max(abs(a[f"train/{key}"]), 1e-3), key
    # Held-out eval (greedy, before and after training) across processes: the same prompts and replies.
    evals = [_rows(out, "eval/reward_mean") for out in runs]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert a["eval/prompts"] == b["eval/prompts"] == 8
        assert abs(a["eval/reward_mean"] - b["eval/reward_mean"]) < 1e-9
        assert abs(a["eval/greedy_length"] - b["eval/greedy_length"]) < 1e-9
