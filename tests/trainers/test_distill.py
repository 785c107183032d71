"""Distillation end to end on 8 fake devices: the step's loss against the losses on the two models' logits,
top-k cache (k = vocabulary equals the full loss; written once, resumable), on-policy GKD with one
compilation, and sequence-level distillation as rejection sampling with the teacher + SFT."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, RunCheckpointer
from posttrain_jax.config import apply_overrides
from posttrain_jax.data import SourceSpec, make_sft_pipeline, synthetic
from posttrain_jax.losses.distill import token_divergence
from posttrain_jax.losses.logprobs import token_logprobs
from posttrain_jax.models import create_model, preset
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.trainers import distill, rejection, sft
from posttrain_jax.models.from_config import build_model
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.trainers.distill_objective import prompt_rows

MESH = "--config.mesh={'data': 2, 'fsdp': 2, 'tensor': 2}"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill_task")
    synthetic.make_quickstart_data(str(d), num_train=300, num_eval=8, seed=0, show_work=True, max_operand=19)
    teacher = create_model(preset("tiny-llama"), seed=5)
    with RunCheckpointer(d / "teacher", async_save=False) as checkpointer:
        checkpointer.save(1, {"params": nnx.state(teacher, nnx.Param)},
                          metadata={MODEL_CONFIG_KEY: model_config_to_dict(teacher.config)}, force=True)
    return d


def _config(out, task, *extra):
    return apply_overrides(distill.default_config(), [
        f"--config.output_dir={out}", f"--config.tokenizer={task}/tokenizer.model",
        f"--config.teacher.checkpoint={task}/teacher", f"--config.data.sources=[{{'path': '{task}/train.jsonl'}}]",
        "--config.eval.path=", "--config.train.global_batch=16", "--config.train.steps=4", "--config.train.log_every=1",
        "--config.data.seq_len=48", MESH, *extra])


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _first_batch(config):
    tokenizer = load_tokenizer(config.tokenizer)
    it, _ = make_sft_pipeline([SourceSpec(s["path"]) for s in config.data.sources], tokenizer, template="chatml",
                              seq_len=config.data.seq_len, global_batch=config.train.global_batch, packing=False,
                              seed=config.seed)
    return next(iter(it))


@pytest.mark.parametrize("divergence,beta,sft_weight", [("jsd", 0.3, 0.5), ("reverse_kl", 0.0, 0.0)])
def test_step_loss_equals_the_losses_on_both_models_logits(task, tmp_path, divergence, beta, sft_weight):
    config = _config(tmp_path, task, f"--config.distill.divergence={divergence}", f"--config.distill.beta={beta}",
                     f"--config.distill.sft_weight={sft_weight}", "--config.distill.temperature=1.5",
                     "--config.train.loss_aggregation=sequence_mean", "--config.train.accum_steps=2",
                     "--config.train.loss_chunk_size=16")
    summary = distill.main(config)
    assert summary["compilations"] == 1
    losses = _losses(tmp_path)
    # By hand on the first batch: both models' full logits, the divergence, the NLL, per-sequence means.
    mesh, rules = mesh_and_rules(config)
    student = build_model(config.model, mesh, rules, seed=config.seed)
    teacher = build_model(config.teacher, mesh, rules, seed=1)
    b = {k: jnp.asarray(v) for k, v in _first_batch(config).items()}
    zs, zt = (m(b["tokens"], b["positions"], b["segment_ids"]) for m in (student, teacher))
    per_token = token_divergence(zs, zt, beta=1.0 if divergence == "reverse_kl" else beta, temperature=1.5)
    per_token += sft_weight * -token_logprobs(zs, b["targets"])
    mask = np.asarray(b["loss_mask"], np.float64)
    per_seq = (np.asarray(per_token) * mask).sum(1) / np.maximum(mask.sum(1), 1)
    expected = per_seq[mask.sum(1) > 0].mean()  # unpacked rows: one sequence per row
    assert losses[1]["train/loss"] == pytest.approx(expected, rel=2e-5)
    assert losses[4]["train/loss"] < losses[1]["train/loss"]


def test_topk_cache_with_the_whole_vocabulary_equals_the_full_loss_and_resumes(task, tmp_path):
    full = _config(tmp_path / "full", task)
    distill.main(full)
    cached = _config(tmp_path / "topk", task, "--config.distill.teacher_topk=512",
                     "--config.distill.cache_teacher=True")
    summary = distill.main(cached)
    assert summary["compilations"] == 1
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "topk")
    for step in range(1, 5):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
    cache = tmp_path / "topk" / "teacher_topk"
    files = sorted(p for p in os.listdir(cache) if p.startswith("batch_"))
    assert len(files) == 4
    stamps = {f: os.stat(cache / f).st_mtime_ns for f in files}
    os.remove(cache / files[2])  # as if killed while caching the third batch
    with open(cache / (files[2] + ".tmp"), "wb") as f:
        f.write(b"torn")
    distill.main(_config(tmp_path / "topk", task, "--config.distill.teacher_topk=512",
                         "--config.distill.cache_teacher=True", "--config.output_dir=" + str(tmp_path / "topk")))
    after = {f: os.stat(cache / f).st_mtime_ns for f in files}
    assert [f for f in files if after[f] != stamps[f]] == [files[2]]  # only the missing batch was recomputed


def test_on_policy_gkd_one_compilation_and_prompts(task, tmp_path):
    config = _config(tmp_path, task, "--config.distill.lambda_on_policy=0.5", "--config.distill.max_prompt_length=32",
                     "--config.train.steps=6", "--config.distill.teacher_topk=8",
                     f"--config.eval.path={task}/eval.jsonl", "--config.eval.num_samples=2", "--config.eval.ks=[1, 2]",
                     "--config.eval.prompts_per_batch=8", "--config.sampling.max_new_tokens=8")
    summary = distill.main(config)
    assert 0 < summary["on_policy_steps"] < 6 and summary["compilations"] == 1
    for key in ("accuracy", "pass@2", "maj@2", "sampled_length", "greedy_reward"):
        assert key in summary["eval_after"] and key in summary["teacher_eval"], key
    batch = _first_batch(config)
    tokens, mask, valid = prompt_rows(batch, 32, 0)
    r = int(np.flatnonzero(valid)[0])
    first = int(np.flatnonzero(batch["loss_mask"][r])[0])
    assert list(tokens[r][mask[r] > 0]) == list(batch["tokens"][r, :first + 1])  # ends with the generation prompt


def test_sequence_level_distillation_is_rejection_sampling_with_the_teacher(task, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for p in synthetic.generate_problems(8, seed=21):
            f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
    generated = rejection.main(apply_overrides(rejection.default_config(), [
        f"--config.output_dir={tmp_path / 'rs'}", "--config.data.quickstart_task=False",
        f"--config.data.path={prompts}",
        f"--config.tokenizer={task}/tokenizer.model", f"--config.model.checkpoint={task}/teacher",
        "--config.rejection.num_samples=1", "--config.rejection.prompts_per_batch=8",
        "--config.rejection.require_correct=[]", "--config.rejection.drop_truncated=False",
        "--config.rewards=[{'name': 'format', 'pattern': '.*', 'value': 1.0, 'otherwise': 0.0}]",
        "--config.sampling.max_new_tokens=8", MESH]))
    assert generated["kept"] == 8
    summary = sft.main(apply_overrides(sft.default_config(), [
        f"--config.output_dir={tmp_path / 'student'}", "--config.data.quickstart_task=False",
        f"--config.tokenizer={task}/tokenizer.model", f"--config.data.sources=[{{'path': '{generated['output']}'}}]",
        "--config.model.preset=tiny-llama", "--config.train.global_batch=8", "--config.train.steps=1",
        "--config.data.packing=False", MESH]))
    assert summary["final_step"] == 1  # the student trained on the teacher's generations
