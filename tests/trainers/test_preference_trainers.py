"""RM and DPO trainers: pulses on 8 devices, online vs cached reference, every loss type, scoring."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.config import apply_overrides
from posttrain_jax.data import synthetic
from posttrain_jax.trainers import dpo, rm
from posttrain_jax.models.from_config import load_checkpoint_model
from posttrain_jax.tokenizer import load_tokenizer

MESH = "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A separable preference set: the chosen reply always agrees, the rejected one always refuses."""
    d = tmp_path_factory.mktemp("toy")
    problems = synthetic.generate_problems(600, seed=3)
    for name, part in (("train", problems[:480]), ("eval", problems[480:])):
        with open(d / f"{name}.jsonl", "w") as f:
            for p in part:
                f.write(json.dumps({"prompt": p.question, "chosen": f"Sure: {p.answer}.",
                                    "rejected": "No, I will not."}) + "\n")
    tokenizer = synthetic.train_sentencepiece(d / "tok", synthetic.corpus(seed=0) + ["Sure", "No, I will not."])
    return d, str(tokenizer)


def _config(module, out, toy, *extra):
    d, tokenizer = toy
    return apply_overrides(module.default_config(), [
        f"--config.output_dir={out}", "--config.data.quickstart_task=False", f"--config.tokenizer={tokenizer}",
        f"--config.data.sources=[{{'path': '{d}/train.jsonl'}}]", f"--config.data.eval_path={d}/eval.jsonl",
        "--config.model.checkpoint=", "--config.data.sft_eval_path=", "--config.train.global_pairs=16", "--config.data.seq_len=96",
        "--config.train.log_every=1", MESH, *extra])


def _losses(out):
    return [json.loads(line)["train/loss"] for line in open(os.path.join(out, "metrics.jsonl"))
            if '"train/loss"' in line]


def test_reward_model_learns_a_separable_set_and_scores_like_training(tmp_path, toy):
    summary = rm.main(_config(rm, tmp_path, toy, "--config.train.steps=20", "--config.optim.learning_rate=3e-3"))
    assert summary["eval_after"]["accuracy"] > 0.95 > summary["eval_before"]["accuracy"]
    losses = _losses(tmp_path)
    assert losses[-1] < 0.5 * losses[0] and summary["compilations"] == 1
    # `score` reads the reward where training does.
    model = load_checkpoint_model(str(tmp_path / "checkpoints"))
    row = json.loads(open(f"{toy[0]}/eval.jsonl").readline())
    tok = load_tokenizer(toy[1])
    good, bad = rm.score(model, tok, [{"prompt": row["prompt"], "response": row["chosen"]},
                                      {"prompt": row["prompt"], "response": row["rejected"]}])
    from posttrain_jax.data.preference import make_preference_eval_pipeline
    it, _ = make_preference_eval_pipeline(f"{toy[0]}/eval.jsonl", tok, template="chatml", seq_len=96,
                                          global_pairs=16, reward_inputs=True)
    batch = next(iter(it))
    _, terms = rm.make_rm_objective(pairs_per_row=it.pairs_per_row, use_margin=False, center_coef=0.0)
    sums = terms(model, {k: jnp.asarray(v) for k, v in batch.items()})[1]
    scores = np.asarray(model(jnp.asarray(batch["tokens"][:1]), jnp.asarray(batch["positions"][:1]),
                              jnp.asarray(batch["segment_ids"][:1])))
    np.testing.assert_allclose([good, bad], [scores[0, batch["chosen_last"][0, 0]],
                                             scores[0, batch["rejected_last"][0, 0]]], rtol=1e-5, atol=1e-5)
    assert float(sums["accuracy"]) == 16
    # The CLI over a JSONL of prompt/response rows gives the same rewards.
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": row["prompt"], "response": r})
                               for r in (row["chosen"], row["rejected"])) + "\n")
    result = subprocess.run([sys.executable, "-m", "posttrain_jax.cli", "score", "--checkpoint",
                             str(tmp_path / "checkpoints"), "--tokenizer", toy[1], "--input", str(rows),
                             "--output", str(tmp_path / "scored.jsonl")], capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    scored = [json.loads(line)["reward"] for line in open(tmp_path / "scored.jsonl")]
    np.testing.assert_allclose(scored, [good, bad], rtol=1e-5, atol=1e-5)


def test_dpo_learns_and_online_equals_cached_reference(tmp_path, toy):
    online = dpo.main(_config(dpo, tmp_path / "online", toy, "--config.train.steps=8", "--config.train.nll_coef=0.2",
                              "--config.optim.learning_rate=1e-3"))
    dpo.main(_config(dpo, tmp_path / "cached", toy, "--config.train.steps=8", "--config.train.nll_coef=0.2",
                              "--config.optim.learning_rate=1e-3", "--config.train.reference=cached"))
    assert _losses(tmp_path / "online") == _losses(tmp_path / "cached")
    # Step 1: policy == reference, so the DPO term is log 2 per pair (+ the NLL term, reported apart).
    first = json.loads([line for line in open(tmp_path / "online" / "metrics.jsonl") if '"train/loss"' in line][0])
    assert abs(first["train/dpo_loss"] - np.log(2)) < 1e-6 and first["train/denominator"] == 16
    assert os.path.exists(tmp_path / "cached" / "reference_logps" / "process_0.npz")
    assert online["eval_after"]["rewards_accuracy"] > 0.9 and online["eval_after"]["rewards_margin"] > 0
    losses = _losses(tmp_path / "online")
    assert losses[-1] < losses[0]
    assert online["compilations"] == 1


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "dpo_norm", "simpo", "robust"])
def test_every_loss_type_trains(tmp_path, toy, loss_type):
    summary = dpo.main(_config(dpo, tmp_path, toy, "--config.train.steps=3", f"--config.train.loss_type={loss_type}",
                               "--config.optim.learning_rate=1e-3", "--config.train.accum_steps=2"))
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert summary["eval_after"]["rewards_margin"] > summary["eval_before"]["rewards_margin"]


def test_dpo_says_to_run_sft_first(tmp_path):
    config = apply_overrides(dpo.default_config(), [f"--config.output_dir={tmp_path}",
                                                    f"--config.model.checkpoint={tmp_path}/nope"])
    with pytest.raises(FileNotFoundError, match="run the SFT quickstart"):
        dpo.main(config)
