"""The distillation objective of one micro-batch, and the teacher pieces that run outside the step."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from posttrain_jax.losses.distill import teacher_topk, token_divergence_from_hidden, topk_divergence_from_hidden
from posttrain_jax.losses.logprobs import lm_head_logprobs
from posttrain_jax.losses.sft import AGGREGATIONS, sft_token_weights
from posttrain_jax.sharding import batch_sharding
from posttrain_jax.rl.rollout import training_batch

log = logging.getLogger(__name__)


def make_distill_objective(aggregation: str, *, beta: float, temperature: float, sft_weight: float = 0.0,
                           data_shards: int = 1, loss_chunk_size: int | None = None, teacher_graphdef=None,
                           vocab_size: int | None = None):
    """`objective(model, micro_batch, context) -> (sum of weighted token losses, metric sums)`.

    Per token: JSD_beta(teacher || student) at `temperature` (+ sft_weight x NLL of the target), weighted
    like SFT's `aggregation` (the step divides by SFT's denominator once). The teacher is either the
    frozen model in context["frozen"] (full vocabulary, run here under the same shardings) or, when the
    batch carries "teacher_logps"/"teacher_ids" [rows, length, k], its top-k log-probs.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss_aggregation {aggregation!r}; choose one of {AGGREGATIONS}")

    def objective(model, mb, context):
        hidden, _ = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        mask = mb["loss_mask"].astype(jnp.float32)
        weights = sft_token_weights(mask, mb["segment_ids"], aggregation, data_shards)
        if "teacher_ids" in mb:
            div = topk_divergence_from_hidden(model.head, hidden, mb["teacher_logps"], mb["teacher_ids"], beta=beta,
                                              temperature=temperature, chunk_size=loss_chunk_size)
        else:
            teacher = nnx.merge(teacher_graphdef, context["frozen"])
            teacher_hidden, _ = teacher.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
            div = token_divergence_from_hidden(model.head, hidden, teacher.head, jax.lax.stop_gradient(teacher_hidden),
                                               beta=beta, temperature=temperature, vocab_size=vocab_size,
                                               chunk_size=loss_chunk_size)
        per_token = div
        sums = {"divergence_sum": jnp.sum(div * mask), "loss_tokens": jnp.sum(mask)}
        if sft_weight:
            nll = -lm_head_logprobs(model, hidden, mb["targets"], chunk_size=loss_chunk_size).logps
            per_token = per_token + sft_weight * nll
            sums["nll_sum"] = jnp.sum(nll * mask)
        return jnp.sum(per_token * weights), sums

    return objective


def make_teacher_topk(teacher_graphdef, *, k: int, temperature: float, vocab_size: int | None, mesh, rules):
    """jitted (teacher_params, global batch) -> (log-probs, ids) [rows, length, k], sharded like the batch."""
    def fn(params, batch):
        teacher = nnx.merge(teacher_graphdef, params)
        logits = teacher(batch["tokens"], batch["positions"], batch["segment_ids"])
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        return teacher_topk(logits, k, temperature=temperature)
    sharding = batch_sharding(mesh, rules, 3)
    return jax.jit(fn, out_shardings=(sharding, sharding))


def is_on_policy(seed: int, step: int, fraction: float) -> bool:
    """GKD's lambda: whether step `step` trains on student samples. The same on every process and on resume."""
    return fraction > 0 and float(np.random.default_rng([seed, step, 0x6B64]).random()) < fraction


def cache_teacher_topk(directory: str, fingerprint: str, batches, topk_fn, teacher_params, shard, mesh, *,
                       steps: int, skip=lambda step: False) -> None:
    """Teacher top-k log-probs of batches 1..steps of the stream, each in its own file, written once.

    Files are written atomically (temporary name, then rename), so a killed run resumes by computing only
    the missing ones; a fingerprint (data, teacher, k, temperature) guards against a stale cache.
    Steps with skip(step) (on-policy steps: their data is sampled) are not computed.
    """
    os.makedirs(directory, exist_ok=True)
    stamp = os.path.join(directory, "fingerprint.txt")
    if os.path.exists(stamp) and open(stamp).read() != fingerprint:
        log.warning("%s was computed for other data or another teacher: recomputing", directory)
        if jax.process_index() == 0:
            for name in os.listdir(directory):
                if name.startswith("batch_"):
                    os.remove(os.path.join(directory, name))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("distill cache check")
    if jax.process_index() == 0:
        with open(stamp + ".tmp", "w") as f:
            f.write(fingerprint)
        os.replace(stamp + ".tmp", stamp)
    spec = batch_sharding(mesh).spec
    batches.reset()
    computed = 0
    for step, host_batch in enumerate(batches, 1):
        if step > steps:
            break
        path = cache_file(directory, step)
        if skip(step) or os.path.exists(path):
            continue
        logps, ids = topk_fn(teacher_params, shard(host_batch))
        local = [np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec)) for x in (logps, ids)]
        with open(path + ".tmp", "wb") as f:
            np.savez(f, logps=local[0], ids=local[1])
        os.replace(path + ".tmp", path)  # a kill never leaves a half-written batch behind
        computed += 1
    batches.reset()
    log.info("teacher top-k cache %s: %d batches computed, the rest reused", directory, computed)


def cache_file(directory: str, step: int) -> str:
    return os.path.join(directory, f"batch_{step:07d}-p{jax.process_index():05d}.npz")


def load_cached(directory: str, step: int) -> dict[str, np.ndarray]:
    with np.load(cache_file(directory, step)) as f:
        return {"teacher_logps": f["logps"], "teacher_ids": f["ids"]}


def prompt_rows(host_batch: dict[str, np.ndarray], max_prompt_length: int, pad: int):
    """The prompt of each unpacked row (the tokens before its first trained target), left-padded.

    Returns (tokens, mask) [rows, max_prompt_length] and valid [rows] (a row with no trained token or a
    longer prompt gets a one-token dummy prompt and no loss).
    """
    rows = host_batch["tokens"].shape[0]
    tokens = np.full((rows, max_prompt_length), pad, np.int32)
    mask = np.zeros((rows, max_prompt_length), np.int32)
    valid = np.zeros(rows, bool)
    for r in range(rows):
        trained = np.flatnonzero(host_batch["loss_mask"][r])
        end = int(trained[0]) + 1 if len(trained) else 0  # tokens[end] is the first trained token
        if 0 < end <= max_prompt_length:
            prompt, valid[r] = host_batch["tokens"][r, :end], True
        else:
            prompt = host_batch["tokens"][r, :1]
        tokens[r, max_prompt_length - len(prompt):], mask[r, max_prompt_length - len(prompt):] = prompt, 1
    return tokens, mask, valid


def on_policy_batch(host_batch, sampler, params, sampling, rng, *, max_prompt_length: int, pad: int) -> dict:
    """This process's rows with the dataset responses replaced by student samples (GKD on-policy).

    The rows keep their width: prompt (max_prompt_length) + sampling.max_new_tokens = the data seq_len.
    """
    tokens, mask, valid = prompt_rows(host_batch, max_prompt_length, pad)
    out = sampler.generate_padded(params, tokens, mask, sampling, rng)
    local = {}
    for key in ("tokens", "lengths"):
        x = getattr(out, key)
        if jax.process_count() > 1:
            spec = sampler._sharding(("batch",) + (None,) * (x.ndim - 1)).spec
            x = multihost_utils.global_array_to_host_local_array(x, sampler.mesh, spec)
        local[key] = np.asarray(x)
    batch = training_batch(SimpleNamespace(prompt_ids=tokens, prompt_mask=mask, tokens=local["tokens"],
                                           lengths=local["lengths"]), pad)
    batch["loss_mask"] = batch["loss_mask"] * valid[:, None].astype(np.int32)
    # the dataset's dtypes and keys: the same step program serves both kinds of batch
    return {k: batch[k].astype(host_batch[k].dtype) for k in host_batch}
