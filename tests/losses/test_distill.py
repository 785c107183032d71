"""Distillation losses against TRL's GKD `generalized_jsd_loss`, restated in torch on identical inputs.

TRL (huggingface/trl, trl/trainer/gkd_trainer.py, GKDTrainer.generalized_jsd_loss, v0.2x-1.x) is restated
below line for line (torch's kl_div with log_target: exp(target) * (target - input)); trl itself is not a
dependency (it would pull datasets/accelerate pins into the test extra).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from posttrain_jax.losses.distill import (divergence_beta, teacher_topk, token_divergence,
                                          token_divergence_from_hidden, topk_divergence, topk_divergence_from_hidden)


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    return jsd


def _inputs(seed=0, batch=3, length=7, vocab=50):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(batch, length, vocab)).astype(np.float64) * 2.0
    teacher = rng.normal(size=(batch, length, vocab)).astype(np.float64) * 3.0
    labels = rng.integers(0, vocab, size=(batch, length))
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 2.0), (0.9, 0.7),
                                              (0.0, 2.0), (1.0, 0.7)])
def test_equals_trl_generalized_jsd(beta, temperature):
    student, teacher, labels = _inputs()
    expected = float(trl_generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
                                              beta=beta, temperature=temperature))
    per_token = token_divergence(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), beta=beta,
                                 temperature=temperature)
    mask = jnp.asarray(labels != -100, jnp.float32)
    ours = float(jnp.sum(per_token * mask) / jnp.sum(mask))
    assert ours == pytest.approx(expected, rel=2e-6, abs=1e-7)
    unreduced = trl_generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher), None, beta=beta,
                                         temperature=temperature, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(per_token), unreduced, rtol=2e-5, atol=2e-7)


def test_named_divergences_and_limits():
    assert divergence_beta("forward_kl", 0.3) == 0.0 and divergence_beta("reverse_kl", 0.3) == 1.0
    assert divergence_beta("jsd", 0.3) == 0.3
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_beta("kl", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        divergence_beta("jsd", 1.5)
    student, teacher, _ = _inputs(1)
    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    # the two KLs by hand
    ls, lt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
    np.testing.assert_allclose(token_divergence(s, t, beta=0.0), jnp.sum(jnp.exp(lt) * (lt - ls), -1), rtol=1e-6)
    np.testing.assert_allclose(token_divergence(s, t, beta=1.0), jnp.sum(jnp.exp(ls) * (ls - lt), -1), rtol=1e-6)
    assert float(jnp.max(jnp.abs(token_divergence(t, t, beta=0.5)))) < 1e-6  # zero for equal distributions


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_with_the_whole_vocabulary_is_exact_and_chunking_changes_nothing(beta):
    student, teacher, _ = _inputs(2, batch=2, length=8, vocab=32)
    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    full = token_divergence(s, t, beta=beta, temperature=1.3)
    logps, ids = teacher_topk(t, 32, temperature=1.3)
    np.testing.assert_allclose(topk_divergence(s, logps, ids, beta=beta, temperature=1.3), full, rtol=1e-5, atol=1e-6)
    # k < vocab: the divergence of the two distributions renormalised on the teacher's top k, by hand
    logps4, ids4 = teacher_topk(t, 4, temperature=1.3)
    ls = jnp.take_along_axis(jax.nn.log_softmax(s / 1.3, -1), ids4, -1)
    ls, lt = ls - jax.nn.logsumexp(ls, -1, keepdims=True), logps4 - jax.nn.logsumexp(logps4, -1, keepdims=True)
    expected = trl_generalized_jsd_loss(torch.tensor(np.asarray(ls, np.float64)),
                                        torch.tensor(np.asarray(lt, np.float64)), None, beta=beta,
                                        reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(topk_divergence(s, logps4, ids4, beta=beta, temperature=1.3), expected, rtol=1e-5,
                               atol=1e-6)
    # through LM heads, chunked over the sequence = unchunked
    rng = np.random.default_rng(3)
    hs, ht = jnp.asarray(rng.normal(size=(2, 8, 6)), jnp.float32), jnp.asarray(rng.normal(size=(2, 8, 10)), jnp.float32)
    ws, wt = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32), jnp.asarray(rng.normal(size=(10, 36)), jnp.float32)
    head_s, head_t = (lambda h: h @ ws), (lambda h: h @ wt)
    whole = token_divergence(head_s(hs)[..., :32], head_t(ht)[..., :32], beta=beta)
    for chunk in (None, 2, 4):
        got = token_divergence_from_hidden(head_s, hs, head_t, ht, beta=beta, vocab_size=32, chunk_size=chunk)
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    lp, ix = teacher_topk(head_t(ht)[..., :32], 5)
    np.testing.assert_allclose(topk_divergence_from_hidden(head_s, hs, lp, ix, beta=beta, chunk_size=4),
                               topk_divergence(head_s(hs), lp, ix, beta=beta), rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda w: jnp.sum(token_divergence_from_hidden(lambda h: h @ w, hs, head_t, ht, beta=beta,
                                                                    vocab_size=32, chunk_size=2)))(ws)
    expected_grads = jax.grad(lambda w: jnp.sum(token_divergence((hs @ w)[..., :32], head_t(ht)[..., :32],
                                                                 beta=beta)))(ws)
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-4, atol=1e-5)
