"""The iterative pipeline: a tiny round killed inside a stage and after a stage, resumed, never re-running a
finished stage; pairs from rejection sampling; the per-round table and plot."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.data import synthetic
from posttrain_jax.data.preference import write_arithmetic_preferences
from posttrain_jax.models import create_model, preset
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.trainers.pipeline_stages import MARKER, build_pairs
from posttrain_jax.cpu_devices import host_device_flags

STAGES = ["round_0/eval", "round_1/rm", "round_1/rejection", "round_1/sft", "round_1/pairs", "round_1/dpo_0",
          "round_1/dpo_1", "round_1/average", "round_1/eval", "round_1/hand_on"]


def tiny_pipeline_args(d, out):
    """A one-round pipeline of 2-3 step runs on tiny-llama (random init) and 8 prompts."""
    return [
        f"--config.output_dir={out}", f"--config.tokenizer={d}/tokenizer.model", "--config.rounds=1",
        f"--config.base.checkpoint={d}/base", "--config.data.quickstart_task=False",
        f"--config.data.sft_mix=[{{'path': '{d}/train.jsonl'}}]", f"--config.data.preferences=['{d}/prefs.jsonl']",
        f"--config.data.prompts={d}/prompts.jsonl", f"--config.data.eval_path={d}/eval.jsonl",
        "--config.data.prompts_per_round=8",
        "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}",
        "--config.rm.overrides={'train': {'steps': 3, 'global_pairs': 8, 'checkpoint_every': 1}}",
        "--config.rejection.reward_model_options={'batch_size': 16, 'max_length': 96}",
        "--config.rejection.overrides={'rejection': {'num_samples': 2, 'prompts_per_batch': 8, 'require_correct': [], "
        "'drop_truncated': False}, 'sampling': {'max_new_tokens': 6}}",
        "--config.sft.overrides={'train': {'steps': 2, 'global_batch': 8}}",
        "--config.pairs.mode=reward",
        "--config.dpo.overrides={'train': {'steps': 2, 'global_pairs': 8}}",
        "--config.eval.overrides={'eval': {'num_samples': 0, 'ks': [], 'prompts_per_batch': 8}, "
        "'sampling': {'max_new_tokens': 6}}",
        "--config.eval.metric=greedy_reward",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline_data")
    synthetic.train_sentencepiece(d / "tokenizer", synthetic.corpus(seed=0))
    synthetic.write_arithmetic_jsonl(d / "train.jsonl", 32, seed=1, show_work=True)
    write_arithmetic_preferences(d / "prefs.jsonl", 32, seed=2)
    for name, n, seed in (("prompts", 8, 3), ("eval", 8, 4)):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in synthetic.generate_problems(n, seed=seed):
                f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    base = create_model(preset("tiny-llama"), seed=6)
    with RunCheckpointer(d / "base", async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(base, nnx.Param)},
                          metadata={MODEL_CONFIG_KEY: model_config_to_dict(base.config)}, force=True)
    return d


def _run(args, **env):
    environ = dict(os.environ, XLA_FLAGS=host_device_flags(8), JAX_PLATFORMS="cpu", **env)
    cmd = [sys.executable, "-m", "posttrain_jax.cli", "pipeline", *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=1200)


def _markers(out):
    return {s: os.stat(out / s / MARKER).st_mtime_ns for s in STAGES if (out / s / MARKER).exists()}


def test_kill_inside_a_stage_and_after_a_stage_then_resume(data, tmp_path):
    out = tmp_path / "pipe"
    args = tiny_pipeline_args(data, out)
    # 1: killed inside the RM run, right after its step-2 checkpoint
    first = _run(args, POSTTRAIN_JAX_TEST_SIGKILL_AT_STEP="2", POSTTRAIN_JAX_TEST_SIGKILL_AFTER_SAVE="1")
    assert first.returncode == -9, first.stderr[-3000:]
    assert list(_markers(out)) == ["round_0/eval"]
    assert os.path.isdir(out / "round_1" / "rm" / "checkpoints" / "2")
    # 2: resumed; killed right after the first DPO candidate finished
    second = _run(args, POSTTRAIN_JAX_TEST_PIPELINE_KILL_AFTER="round_1/dpo_0")
    assert second.returncode == -9, second.stderr[-3000:]
    done = _markers(out)
    assert list(done) == STAGES[:6]
    assert "resumed from step 2" in second.stderr  # the RM run continued from its checkpoint
    assert json.load(open(out / "round_1" / "rm" / MARKER))["resumed"]
    # 3: finishes; nothing that had finished runs again
    third = _run(args)
    assert third.returncode == 0, third.stderr[-3000:]
    final = _markers(out)
    assert list(final) == STAGES
    assert all(final[s] == done[s] for s in done)  # untouched markers: never re-run
    assert "=== round_1/rm" not in third.stdout and "=== round_1/dpo_1 (starting)" in third.stdout
    results = json.load(open(out / "pipeline.json"))
    assert set(results["1"]["metrics"]) == {"sft", "dpo_0", "dpo_1", "average"}
    assert results["1"]["best"] in results["1"]["metrics"]
    assert "| 1 | average |" in open(out / "pipeline.md").read() and os.path.getsize(out / "pipeline.png") > 1000
    averaged = json.load(open(out / "round_1" / "average" / MARKER))["result"]["averaged_from"]
    assert [os.path.basename(os.path.dirname(p)) for p in averaged] == ["dpo_0", "dpo_1"]


def test_pairs_by_reward_margin_and_by_verifier(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "good"}], "score": 2.0,
             "correct": {"math": True}, "source": "p:1",
             "rejected": {"content": "bad", "score": 0.5, "correct": {"math": False}}},
            {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "ok"}], "score": 1.0,
             "correct": {"math": True}, "source": "p:2",
             "rejected": {"content": "also ok", "score": 0.9, "correct": {"math": True}}},
            {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "only"}], "score": 1.0,
             "correct": {"math": True}, "source": "p:3"}]
    samples = tmp_path / "rs.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_reward = build_pairs(str(tmp_path), str(samples), mode="reward", verifier="math", min_margin=0.5)
    assert by_reward["pairs"] == 1 and by_reward["prompts"] == 3
    pair = json.loads(open(by_reward["path"]).readline())
    assert pair["prompt"] == [{"role": "user", "content": "q1"}]
    assert (pair["chosen"], pair["rejected"]) == ("good", "bad")
    assert build_pairs(str(tmp_path), str(samples), mode="reward", verifier="math", min_margin=0.0)["pairs"] == 2
    assert build_pairs(str(tmp_path), str(samples), mode="verifier", verifier="math", min_margin=0.0)["pairs"] == 1
    with pytest.raises(ValueError, match="no verdict of 'code'"):
        build_pairs(str(tmp_path), str(samples), mode="verifier", verifier="code", min_margin=0.0)


def test_a_worse_round_hands_the_earlier_best_on_and_the_table_says_so():
    from posttrain_jax.trainers.pipeline import hand_on, table
    r0 = {"metrics": {"initial": {"accuracy": 0.5}}, "best": "initial", "next": {"round": 0, "candidate": "initial"}}
    leader = {"round": 0, "candidate": "initial", "model": {"checkpoint": "base"}, "value": 0.5}
    worse = {"metrics": {"sft": {"accuracy": 0.3}, "dpo_0": {"accuracy": 0.4}}, "best": "dpo_0",
             "best_model": {"checkpoint": "r1/dpo_0"}}
    assert hand_on(leader, 1, worse, "accuracy", keep_best=True) is leader
    assert hand_on(leader, 1, worse, "accuracy", keep_best=False)["model"] == {"checkpoint": "r1/dpo_0"}
    tie = {"metrics": {"sft": {"accuracy": 0.5}}, "best": "sft", "best_model": {"checkpoint": "r1/sft"}}
    assert hand_on(leader, 1, tie, "accuracy", keep_best=True)["candidate"] == "sft"  # ties: the newer model
    worse["next"] = {"round": 0, "candidate": "initial"}
    lines = table({0: r0, 1: worse}, "accuracy").splitlines()
    assert lines[2].startswith("| 0 | initial | 0.5 |") and lines[2].endswith("| * next |")
    assert lines[4].endswith("| * |")  # round 1's best, not handed on
    assert lines[5].startswith("| 1 | kept: round 0 initial | 0.5 |") and lines[5].endswith("| next |")
