"""Rejection sampling: best of K against an independent recomputation, threshold, resume, SFT-readiness, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.eval import progress
from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.config import apply_overrides, check_keys, load_config
from posttrain_jax.data import SourceSpec, make_sft_pipeline, synthetic
from posttrain_jax.models import create_model, preset
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.trainers import rejection
from posttrain_jax.models.from_config import build_model
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.sampling.text import completion_text, pad_prompts, stop_tokens_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K, PER_BATCH, NUM_PROMPTS = 4, 4, 10  # 3 batches, the last one half padding


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Prompts (one with a system message), a tokenizer, and a random reward model with O(1) scores."""
    d = tmp_path_factory.mktemp("rs_toy")
    tokenizer = str(synthetic.train_sentencepiece(d / "tok"))
    with open(d / "prompts.jsonl", "w") as f:
        for i, p in enumerate(synthetic.generate_problems(NUM_PROMPTS, seed=5)):
            prompt = p.question if i != 3 else [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": p.question}]
            f.write(json.dumps({"prompt": prompt, "answer": str(p.answer), "id": i}) + "\n")
    rm = create_model(preset("tiny-llama", head="scalar"), seed=1)
    rm.score[...] = rm.score[...] * 100.0  # a random head scores ~0.03; scaled, candidates differ clearly
    with RunCheckpointer(d / "rm", async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(rm)}, metadata={MODEL_CONFIG_KEY: model_config_to_dict(rm.config)},
                          force=True)
    return d, tokenizer


def _config(out, toy, *extra):
    d, tokenizer = toy
    rewards = [{"name": "reward_model", "checkpoint": str(d / "rm"), "tokenizer": tokenizer, "batch_size": 16, "max_length": 128},
               {"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    return apply_overrides(rejection.default_config(), [
        f"--config.output_dir={out}", "--config.data.quickstart_task=False", f"--config.data.path={d}/prompts.jsonl",
        f"--config.tokenizer={tokenizer}", "--config.model.checkpoint=", "--config.model.preset=tiny-llama",
        "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}", f"--config.rewards={rewards}",
        "--config.sampling.max_new_tokens=8", f"--config.rejection.num_samples={K}",
        f"--config.rejection.prompts_per_batch={PER_BATCH}", "--config.rejection.require_correct=[]",
        "--config.rejection.drop_truncated=False", "--config.seed=3", *extra])


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, toy):
    out = tmp_path_factory.mktemp("rs_straight")
    config = _config(out, toy)
    return config, rejection.main(config)


def _recompute(config):
    """Every candidate's text and scores, by the sampler and the rewards directly (same seed, same batches)."""
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    prompts, _ = rejection.load_prompts(config.data.path, tokenizer, template="chatml", max_prompt_length=64)
    model = build_model(config.model, mesh, rules, seed=config.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    sampler = Sampler(graphdef, model.config, mesh=mesh, rules=rules)
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=K, pad_token=0,
                              stop_tokens=stop_tokens_for(tokenizer, "chatml"))
    rewards = build_rewards([dict(r) for r in config.rewards])
    texts, totals, scores = [], [], {n: [] for n in rewards.names}
    for b in range(0, NUM_PROMPTS, PER_BATCH):
        chunk = prompts[b:b + PER_BATCH]
        padded = chunk + [prompts[0]] * (PER_BATCH - len(chunk))
        tokens, mask = pad_prompts(padded, 64, 0)
        out = jax.tree.map(np.asarray, sampler.generate_padded(
            params, tokens, mask, sampling, jax.random.fold_in(jax.random.key(config.seed), b // PER_BATCH)))
        for i, p in enumerate(chunk):
            t = [completion_text(tokenizer, out.tokens[i * K + j], int(out.lengths[i * K + j]),
                                 bool(out.stopped[i * K + j])) for j in range(K)]
            scored = rewards(t, prompts=[list(p.messages)] * K, rows=[p.row] * K)
            texts.append(t)
            totals.append(scored.total)
            for n in rewards.names:
                scores[n].append(scored.scores[n])
    return texts, np.asarray(totals), {n: np.asarray(v) for n, v in scores.items()}, rewards


def test_keeps_the_argmax_of_an_independent_recomputation(straight):
    config, summary = straight
    texts, totals, scores, rewards = _recompute(config)
    assert totals.shape == (NUM_PROMPTS, K) and np.all(totals.std(axis=1) > 0.1)  # not a vacuous argmax
    rows = _rows(summary["output"])
    assert [r["prompt_row"]["id"] for r in rows] == list(range(NUM_PROMPTS))
    for i, row in enumerate(rows):
        best = int(np.argmax(totals[i]))
        assert row["sample_index"] == best, (i, totals[i])
        assert row["messages"][-1] == {"role": "assistant", "content": texts[i][best]}
        np.testing.assert_allclose(row["score"], totals[i, best], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([row["rewards"][n] for n in rewards.names],
                                   [scores[n][i, best] for n in rewards.names], rtol=1e-5, atol=1e-5)
        assert row["num_candidates"] == K and row["source"].endswith(f"prompts.jsonl:{i + 1}")
        assert row["prompt_row"]["answer"] and "prompt" not in row["prompt_row"]
    assert rows[3]["messages"][0] == {"role": "system", "content": "Be brief."}
    math = scores["math"] == 1.0
    assert summary["prompts"] == summary["kept"] == NUM_PROMPTS and summary["samples"] == NUM_PROMPTS * K
    np.testing.assert_allclose(summary["mean_score"], totals.mean(), rtol=1e-6)
    np.testing.assert_allclose(summary["mean_best_score"], totals.max(axis=1).mean(), rtol=1e-6)
    acc = summary["accuracy"]["math"]
    assert acc["pass@1"] == math.mean() and acc["pass@k"] == math.any(axis=1).mean()
    assert acc["best_of_k"] == math[np.arange(NUM_PROMPTS), totals.argmax(axis=1)].mean()
    assert summary["compilations"]["sampler"] == 1  # the padded last batch has the same shape
    assert json.load(open(summary["summary"]))["kept"] == NUM_PROMPTS


def test_threshold_drops_are_counted_and_absent(straight, tmp_path, toy):
    _, summary = straight
    rows = _rows(summary["output"])
    threshold = float(np.median([r["score"] for r in rows]))
    result = rejection.main(_config(tmp_path, toy, f"--config.rejection.threshold={threshold}"))
    expected = [r for r in rows if r["score"] >= threshold]
    assert 0 < len(expected) < NUM_PROMPTS
    assert _rows(result["output"]) == expected
    assert result["kept"] == len(expected) and result["rejected_below_threshold"] == NUM_PROMPTS - len(expected)
    assert result["rejected_no_eligible"] == 0 and result["mean_kept_score"] >= threshold


def test_resume_after_a_crash_mid_batch_equals_a_straight_run(straight, tmp_path, toy):
    config, summary = straight
    shutil.copy(summary["output"], tmp_path / "rejection_sampled.jsonl")
    progress = json.load(open(summary["output"] + ".progress"))
    assert [e["batches"] for e in progress["entries"]] == [2, 3]
    progress["entries"] = progress["entries"][:1]  # the crash came after batch 2 was recorded
    json.dump(progress, open(tmp_path / "rejection_sampled.jsonl.progress", "w"))
    with open(tmp_path / "rejection_sampled.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "half a line')  # and batch 3 was half written
    resumed = rejection.main(_config(tmp_path, toy), resume=True)
    assert resumed["resumed_at_batch"] == 2
    assert open(resumed["output"], "rb").read() == open(summary["output"], "rb").read()
    for key in ("prompts", "kept", "samples", "mean_score", "mean_best_score", "accuracy"):
        assert resumed[key] == summary[key], key
    with pytest.raises(ValueError, match=r"settings changed \(num_samples: 4 -> 2"):
        rejection.main(_config(tmp_path, toy, "--config.rejection.num_samples=2"), resume=True)


def test_output_trains_with_the_sft_pipeline(straight):
    config, summary = straight
    tokenizer = load_tokenizer(config.tokenizer)
    iterator, stats = make_sft_pipeline(SourceSpec(summary["output"]), tokenizer, template="chatml", seq_len=128,
                                        global_batch=2, packing=False, process_index=0, process_count=1)
    assert stats.examples == NUM_PROMPTS
    trained = []
    for batch in iterator:
        for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["loss_mask"]):
            trained.append(tokenizer.decode([int(t) for t in targets[mask > 0]]))
    # What SFT trains on is each kept completion followed by the end of turn and chatml's newline after it.
    expected = sorted(r["messages"][-1]["content"] + "<|im_end|>\n" for r in _rows(summary["output"]))
    assert sorted(trained) == expected


def test_select_best_ties_filters_and_threshold():
    totals = np.asarray([[1.0, 3.0, 3.0, 0.0], [5.0, 2.0, 2.0, 1.0], [0.5, 0.5, 0.2, 0.1], [9.0, 1.0, 1.0, 1.0]])
    eligible = np.asarray([[1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
    choice = rejection.select_best(totals, eligible, threshold=1.0)
    assert choice.index.tolist() == [1, 1, 0, -1]  # ties -> the lowest index; the best of the eligible only
    assert choice.keep.tolist() == [True, True, False, False]
    assert choice.below_threshold.tolist() == [False, False, True, False]
    assert choice.no_eligible.tolist() == [False, False, False, True]
    assert rejection.select_best(totals, np.ones_like(eligible)).index.tolist() == [1, 0, 0, 0]


def test_process_shares_and_shard_names():
    prompts = list(range(10))
    for batch in range(3):
        shares = [progress.batch_share(prompts, batch, 4, p, 2) for p in range(2)]
        assert [x for share, _ in shares for x in share] == (prompts[batch * 4:batch * 4 + 4] + [0, 0])[:4]
        assert sum(real for _, real in shares) == min(4, 10 - batch * 4)
    assert progress.batch_share(prompts, 2, 4, 1, 2) == ([0, 0], 0)
    assert progress.shard_path("d/out.jsonl", 0, 1) == "d/out.jsonl"
    assert progress.shard_path("d/out.jsonl", 1, 2) == "d/out-00001-of-00002.jsonl"
    assert rejection.summary_path("d/out.jsonl") == "d/out.summary.json"


@pytest.mark.parametrize("override, error", [
    ("--config.rejection.num_samples=0", "rejection.num_samples=0"),
    ("--config.sampling.temperature=0.0", "sampling.temperature=0.0"),
    ("--config.rejection.output=out.txt", "must end in .jsonl"),
    ("--config.rejection.threshold='high'", "rejection.threshold='high'"),
    ("--config.data.path=/nonexistent.jsonl", "data.path /nonexistent.jsonl does not exist"),
    ("--config.rejection.require_correct=['reward_model']", "'reward_model', which has no notion of correct"),
    ("--config.rejection.require_correct=['maths']", "'maths', which is not a configured reward"),
    ("--config.rejection.prompts_per_batch=6", "prompts_per_batch=6 must be a multiple of the 4 data shards"),
])
def test_bad_config_fails_clearly(tmp_path, toy, override, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error.replace("[", r"\[").replace("(", r"\(")):
        rejection.main(_config(tmp_path, toy, override))


def test_shipped_configs_use_known_keys():
    for name in ("quickstart", "llama3"):
        config = load_config(os.path.join(ROOT, "configs", name, "rejection_sampling.py"))
        check_keys(config, rejection.default_config())
    llama3 = load_config(os.path.join(ROOT, "configs", "llama3", "rejection_sampling.py"))
    assert 10 <= llama3.rejection.num_samples <= 30 and llama3.chat_template == "llama3"
    assert llama3.rewards[0]["name"] == "reward_model" and llama3.rejection.threshold is None
