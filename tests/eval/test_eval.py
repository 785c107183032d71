"""Evaluation: the statistics against hand computations, the evaluator against the sampler and rewards
called directly, resume after a kill, one compilation per shape, the command with a win rate."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.config import apply_overrides
from posttrain_jax.data import synthetic
from posttrain_jax.eval import EvalSettings, Evaluator, maj_at_k, majority_index, pass_at_k, vote_key, win_rate
from posttrain_jax.eval import command
from posttrain_jax.mesh import make_mesh
from posttrain_jax.models import create_model, preset
from posttrain_jax.rewards import PerSampleReward, Rewards, RewardTerm
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sharding import DEFAULT_RULES
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.sampling.text import completion_text, pad_prompts, stop_tokens_for

NUM_PROMPTS, PER_BATCH, N = 10, 4, 4  # 3 batches, the last one half padding


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_majority_vote_by_hand():
    assert vote_key("so 1/2") == vote_key("it is 0.5") == vote_key("\\boxed{\\frac{1}{2}}")
    assert vote_key("no digits here") is None and vote_key("") is None
    votes, correct = ["#3/1", None, "#4/1", "#4/1"], [True, False, False, False]
    assert majority_index(votes) == 2 and majority_index([None, None]) == -1
    assert [maj_at_k(votes, correct, k) for k in (1, 2, 3, 4)] == [True, True, True, False]  # k=3: a tie, first seen
    assert not maj_at_k([None, None], [True, True], 2)


def test_win_rate_by_hand():
    out = win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.1])
    assert out == {"win_rate": 0.625, "wins": 0.5, "ties": 0.25, "losses": 0.25}


def _parity(completion, prompt, row):  # a verifier that a random model passes about half the time
    return float(len(completion) % 2 == 0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_toy")
    tokenizer = str(synthetic.train_sentencepiece(d / "tok"))
    with open(d / "prompts.jsonl", "w") as f:
        for p in synthetic.generate_problems(NUM_PROMPTS, seed=5):
            f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    return d, tokenizer


def _evaluator(toy, model, mesh):
    d, tokenizer_path = toy
    tokenizer = load_tokenizer(tokenizer_path)
    prompts, _ = load_prompts(str(d / "prompts.jsonl"), tokenizer, template="chatml", max_prompt_length=64)
    rewards = Rewards([RewardTerm("parity", PerSampleReward(_parity, correct_score=1.0), 2.0)])
    settings = EvalSettings(num_samples=N, ks=(1, 2, N), max_new_tokens=8, prompts_per_batch=PER_BATCH,
                            max_prompt_length=64, seed=3, answer_extract="last_number")
    sampler = Sampler(nnx.graphdef(model), model.config, mesh=mesh, rules=DEFAULT_RULES)
    return Evaluator(prompts, sampler=sampler, tokenizer=tokenizer, rewards=rewards, settings=settings,
                     stop_tokens=stop_tokens_for(tokenizer, "chatml")), prompts, tokenizer


def test_evaluator_against_a_direct_recomputation_and_resume(toy, tmp_path, monkeypatch):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = create_model(preset("tiny-llama"), mesh=mesh, rules=DEFAULT_RULES, seed=2)
    evaluator, prompts, tokenizer = _evaluator(toy, model, mesh)
    params = nnx.state(model, nnx.Param)
    metrics = evaluator(params, records=str(tmp_path / "a" / "records.jsonl"))
    assert evaluator.compilations() == 2  # greedy + sampled, three batches (the last padded) of one shape

    # By hand: the sampler directly, per batch with the same keys; metrics as plain means.
    stops = stop_tokens_for(tokenizer, "chatml")
    modes = {"greedy": SamplingParams(max_new_tokens=8, greedy=True, stop_tokens=stops),
             "samples": SamplingParams(max_new_tokens=8, temperature=1.0, stop_tokens=stops, num_samples=N)}
    direct = Sampler(nnx.graphdef(model), model.config, mesh=mesh)
    texts = {m: [] for m in modes}
    lengths = {m: [] for m in modes}
    for b in range(0, NUM_PROMPTS, PER_BATCH):
        chunk = prompts[b:b + PER_BATCH]
        tokens, mask = pad_prompts(chunk + [prompts[0]] * (PER_BATCH - len(chunk)), 64, 0)
        key = jax.random.fold_in(jax.random.key(3), b // PER_BATCH)
        for m, sp in modes.items():
            out = jax.tree.map(np.asarray, direct.generate_padded(params, tokens, mask, sp,
                                                                   jax.random.fold_in(key, len(m))))
            n = sp.num_samples
            for i in range(len(chunk) * n):
                texts[m].append(completion_text(tokenizer, out.tokens[i], int(out.lengths[i]), bool(out.stopped[i])))
                lengths[m].append(int(out.lengths[i]))
    greedy_ok = np.asarray([len(t) % 2 == 0 for t in texts["greedy"]], float)
    sampled_ok = np.asarray([len(t) % 2 == 0 for t in texts["samples"]], float).reshape(NUM_PROMPTS, N)
    assert 0 < sampled_ok.mean() < 1  # not a vacuous check
    assert metrics["prompts"] == NUM_PROMPTS
    assert metrics["accuracy"] == pytest.approx(greedy_ok.mean())
    assert metrics["greedy_reward"] == pytest.approx(2.0 * greedy_ok.mean())
    assert metrics["greedy_length"] == pytest.approx(np.mean(lengths["greedy"]))
    assert metrics["sampled_length"] == pytest.approx(np.mean(lengths["samples"]))
    assert metrics["sampled_reward"] == pytest.approx(2.0 * sampled_ok.mean())
    assert metrics["pass@1"] == pytest.approx(sampled_ok.mean())  # pass@1 is the mean accuracy of the samples
    assert metrics[f"pass@{N}"] == pytest.approx(sampled_ok.max(axis=1).mean())
    pass2 = np.mean([1 - math.comb(N - int(c), 2) / math.comb(N, 2) for c in sampled_ok.sum(axis=1)])
    assert metrics["pass@2"] == pytest.approx(pass2) and metrics["parity/pass@2"] == metrics["pass@2"]
    votes = [[vote_key(t, "last_number") for t in texts["samples"][i * N:(i + 1) * N]] for i in range(NUM_PROMPTS)]
    maj = np.mean([maj_at_k(votes[i], sampled_ok[i] > 0, N) for i in range(NUM_PROMPTS)])
    assert metrics[f"maj@{N}"] == pytest.approx(maj)

    # Killed during the third batch (after two were written): the resumed run ends with the same numbers.
    calls = {"n": 0}
    original = Evaluator.batch_records

    def dies_on_third(self, p, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(str(tmp_path / "b" / "records.jsonl"), "a") as f:
                f.write('{"half": ')  # a torn write
            raise KeyboardInterrupt
        return original(self, p, batch)

    monkeypatch.setattr(Evaluator, "batch_records", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluator(params, records=str(tmp_path / "b" / "records.jsonl"))
    monkeypatch.setattr(Evaluator, "batch_records", original)
    resumed = evaluator(params, records=str(tmp_path / "b" / "records.jsonl"), resume=True)
    assert resumed == metrics
    assert open(tmp_path / "b" / "records.jsonl").read() == open(tmp_path / "a" / "records.jsonl").read()
    with pytest.raises(ValueError, match="settings changed"):
        Evaluator(evaluator.prompts, sampler=evaluator.sampler, tokenizer=tokenizer, rewards=evaluator.rewards,
                  settings=EvalSettings(num_samples=2, ks=(1,), max_new_tokens=8, prompts_per_batch=PER_BATCH,
                                        max_prompt_length=64),
                  stop_tokens=stops)(params, records=str(tmp_path / "b" / "records.jsonl"), resume=True)


def _save(model, path):
    with RunCheckpointer(path, async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(model, nnx.Param)},
                          metadata={MODEL_CONFIG_KEY: model_config_to_dict(model.config)}, force=True)


def test_command_with_a_reward_model_win_rate(toy, tmp_path):
    d, tokenizer = toy
    rm = create_model(preset("tiny-llama", head="scalar"), seed=1)
    rm.score[...] = rm.score[...] * 100.0
    _save(rm, tmp_path / "rm")
    _save(create_model(preset("tiny-llama"), seed=4), tmp_path / "a")
    rewards = [{"name": "reward_model", "checkpoint": str(tmp_path / "rm"), "tokenizer": tokenizer,
                "batch_size": 8, "max_length": 128},
               {"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    config = apply_overrides(command.default_config(), [
        f"--config.output_dir={tmp_path / 'out'}", "--config.data.quickstart_task=False",
        f"--config.data.path={d}/prompts.jsonl", f"--config.tokenizer={tokenizer}",
        f"--config.model.checkpoint={tmp_path / 'a'}", "--config.model_b.preset=tiny-llama",
        "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}", f"--config.rewards={rewards}",
        "--config.sampling.max_new_tokens=8", "--config.eval.num_samples=0", "--config.eval.ks=[]",
        f"--config.eval.prompts_per_batch={PER_BATCH}"])
    results = command.main(config)
    win = results["win_rate"]
    assert win["reward"] == "reward_model" and win["wins"] + win["ties"] + win["losses"] == pytest.approx(1.0)
    records = {name: map(json.loads, open(tmp_path / "out" / name / "records.jsonl")) for name in ("model", "model_b")}
    a, b = ({r["index"]: r["greedy"]["rewards"]["reward_model"] for r in records[n]} for n in ("model", "model_b"))
    assert sorted(a) == list(range(NUM_PROMPTS))
    assert win["win_rate"] == pytest.approx(np.mean([(a[i] > b[i]) + 0.5 * (a[i] == b[i]) for i in a]))
    assert 0 < win["win_rate"] < 1
    table = open(tmp_path / "out" / "results.md").read()
    assert "| metric | model | model_b |" in table and "| accuracy |" in table and "win rate" in table
    assert json.load(open(tmp_path / "out" / "results.json"))["model"]["prompts"] == NUM_PROMPTS
    assert results["model"]["compilations"] == 1  # greedy only


def test_sft_generation_eval_before_and_after(tmp_path):
    """A trainer's before/after evaluation by sampling: SFT's teacher-forced metrics plus the evaluator's."""
    from posttrain_jax.trainers import sft
    out = tmp_path / "sft"
    config = apply_overrides(sft.default_config(), [
        f"--config.output_dir={out}", "--config.data.quickstart_num_train=200", "--config.data.quickstart_num_eval=8",
        "--config.train.global_batch=8", "--config.train.steps=2", "--config.model.preset=tiny-llama",
        f"--config.generation_eval.path={out}/data/eval.jsonl", "--config.generation_eval.max_new_tokens=8",
        "--config.generation_eval.prompts_per_batch=8", "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"])
    summary = sft.main(config)
    for when in ("eval_before", "eval_after"):
        metrics = summary[when]
        assert "exact_match" in metrics and metrics["generation/prompts"] == 8
        assert 0.0 <= metrics["generation/accuracy"] <= 1.0 and metrics["generation/greedy_length"] > 0
