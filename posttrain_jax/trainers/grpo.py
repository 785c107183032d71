"""`posttrain-jax grpo`: GRPO with verifiable and model-based rewards, sampled on-policy by the jitted sampler.

Per step: `prompts_per_step` prompts -> `group_size` completions each (same
params, same mesh as training) -> rewards -> group advantages -> for
`num_iterations` passes, `num_minibatches` optimizer steps over the rollout
batch, each one jitted train step (gradient accumulation inside) on the clipped
ratio objective with an optional KL penalty to a frozen reference (beta 0
keeps no reference). With one pass and one minibatch the policy that sampled is
the one being updated, so the ratio is exactly 1 (old log-probs =
stop_gradient of the current ones, as TRL does); otherwise the old log-probs
are recomputed once by a training forward before the updates.

The quickstart (no config) starts from the SFT quickstart model and rewards
correct answers to new synthetic arithmetic problems; it prints held-out
accuracy before and after, greedy and sampled at the training temperature
(the SFT model is near-perfect greedily; GRPO sharpens its sampled policy).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from posttrain_jax.checkpointing import RunCheckpointer
from posttrain_jax.data import synthetic
from posttrain_jax.losses.grpo import AGGREGATIONS, group_advantages
from posttrain_jax.mesh import local_mesh
from posttrain_jax.metrics import MetricsWriter, progress_bar
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sharding import batch_sharding, logical_rules, shard_batch
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.models.lora import base_graphdef, dropout_rate
from posttrain_jax.train import init_train_state, jit_train_step, make_train_step
from posttrain_jax.train.loop import resume_from_latest
from posttrain_jax.trainers import runner
from posttrain_jax.trainers.common import base_config, build_model, data_shards, mesh_and_rules, run_metadata
from posttrain_jax.trainers.grpo_objective import make_grpo_denominator, make_grpo_objective, sequence_token_logps
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR
from posttrain_jax.trainers.rollout import PromptIterator, load_prompts, sample_and_score, stop_tokens_for
from posttrain_jax.trainers.rollout import training_batch

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The GRPO quickstart: the SFT quickstart model, arithmetic with a verifiable reward, CPU minutes."""
    c = base_config("runs/grpo-quickstart")
    c.model.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = ml_collections.ConfigDict(dict(
        quickstart_task=True,  # write arithmetic prompts with their answers to <output_dir>/data and use them
        quickstart_num_train=4000, quickstart_num_eval=200, quickstart_max_operand=19,
        path="",  # JSONL: {"prompt": str | messages, <ground truth fields>} or {"messages": [..., assistant]}
        eval_path="",  # the same format; held-out greedy accuracy of the verifiable rewards
        epochs=1.0, max_prompt_length=64, length_policy="drop", on_bad_row="error",
        eval_batch=64, eval_samples=8,  # eval: greedy accuracy, and pass@1 over eval_samples (0: greedy only)
    ))
    # Each entry: {"name": math | exact_match | format | reward_model, "weight": w, ...its options}.
    c.rewards = [{"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    # temperature 1.5: the SFT model is so sure of itself (0.05 nats/token) that at 1.0 most groups score
    # alike and give no signal; hotter samples explore, and GRPO sharpens the policy back.
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.5, top_k=0, top_p=1.0,
                                                stop_tokens=[]))  # + the template's end of turn and the EOS
    c.grpo = ml_collections.ConfigDict(dict(
        prompts_per_step=16, group_size=8,
        advantage_scale="group",  # group: (r - mean) / (std + eps); batch: std of the whole batch; none: Dr. GRPO
        std_ddof=1, advantage_eps=1e-4, filter_zero_std=False,
        epsilon_low=0.2, epsilon_high=0.2,  # DAPO clip-higher: epsilon_high 0.28
        beta=0.0, kl_estimator="k3",  # beta 0: no reference model is kept
        loss_aggregation="token_mean",  # token_mean (DAPO) | sequence_mean (GRPO) | constant (Dr. GRPO)
        num_iterations=1, num_minibatches=1, loss_chunk_size=0,
    ))
    c.train = runner.loop_config(steps=100, log_every=5, eval_every=0, checkpoint_every=0)
    # RL gradients are mostly noise around a small signal: lr 1e-4 (3e-4 lowered accuracy in our runs).
    c.optim = runner.optimizer_config(learning_rate=1e-4, warmup_ratio=0.0, schedule="constant",
                                      weight_decay=0.0, b2=0.99)
    return c


def _quickstart_data(config) -> None:
    d = config.data
    directory = os.path.join(config.output_dir, "data")
    d.path, d.eval_path = os.path.join(directory, "prompts.jsonl"), os.path.join(directory, "eval_prompts.jsonl")
    if jax.process_index() == 0 and not os.path.exists(d.eval_path):
        os.makedirs(directory, exist_ok=True)
        # A seed of its own: none of these problems is the SFT quickstart's (seeds 0/1).
        for path, n, seed in ((d.path, d.quickstart_num_train, 7), (d.eval_path, d.quickstart_num_eval, 8)):
            problems = synthetic.generate_problems(n, seed=seed, max_operand=d.quickstart_max_operand)
            with open(path, "w") as f:
                f.writelines(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in problems)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("grpo quickstart data")


def _check(config) -> None:
    g = config.grpo
    if g.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo.loss_aggregation={g.loss_aggregation!r}; choose one of {AGGREGATIONS}")
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size={g.group_size}: group advantages need at least 2 completions per prompt")
    if g.num_iterations < 1 or g.num_minibatches < 1:
        raise ValueError("grpo.num_iterations and grpo.num_minibatches must be >= 1")
    if not config.data.path:
        raise ValueError("config.data.path is empty: give a JSONL file of prompts (or set data.quickstart_task)")


def _global(values: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (the same order as the global batch)."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Train with GRPO (continuing from the latest checkpoint with `resume`); returns a summary."""
    started = time.time()
    if config.data.quickstart_task:
        _quickstart_data(config)
    _check(config)
    g, s, t, d = config.grpo, config.sampling, config.train, config.data
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    prompts, stats = load_prompts(d.path, tokenizer, template=config.chat_template,
                                  max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                                  on_bad_row=d.on_bad_row)
    log.info(stats.report(d.path))
    prompt_iter = PromptIterator(prompts, g.prompts_per_step, seed=config.seed, epochs=d.epochs)
    total_steps = t.steps or prompt_iter.num_batches
    # A reward model is sharded over this process's devices: each process scores its own completions.
    rewards = build_rewards([dict(r) for r in config.rewards], mesh=local_mesh())
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        lora=config.lora)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, stop_tokens=stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens),
                            pad_token=pad, num_samples=g.group_size)
    optimizer_steps = total_steps * g.num_iterations * g.num_minibatches
    tx, schedule = runner.optimizer_from_config(config.optim, optimizer_steps)
    # LoRA: the adapters are trained; the frozen base is a step argument, joined back by `full` (no copy).
    trainable, base, full = runner.trainable_split(model)
    graphdef, state = init_train_state(model, tx, seed=config.seed, mesh=mesh, trainable=trainable)
    # The reference is the initial policy, frozen (rebuilt identically on resume). With LoRA it is the
    # base with the adapters off: the base graph over the frozen arrays, no second copy of the weights.
    reference, reference_graphdef = None, graphdef
    if g.beta:
        if base is not None:
            reference, reference_graphdef = base, base_graphdef(model)
        else:
            reference = jax.tree.map(jnp.copy, state.params)
    metadata = run_metadata(config, model)
    shards = data_shards(mesh)
    objective = make_grpo_objective(aggregation=g.loss_aggregation, epsilon_low=g.epsilon_low,
                                    epsilon_high=g.epsilon_high, beta=g.beta, kl_estimator=g.kl_estimator,
                                    temperature=s.temperature, chunk_size=g.loss_chunk_size or None)
    step = make_train_step(graphdef, tx, objective,
                           make_grpo_denominator(g.loss_aggregation, max_completion_length=s.max_new_tokens),
                           accum_steps=t.accum_steps, data_shards=shards, schedule=schedule,
                           dropout=dropout_rate(model) > 0)
    keys = ["tokens", "targets", "positions", "segment_ids", "loss_mask", "advantages", "sample_mask"]
    keys += ["ref_logps"] if g.beta else []
    keys += ["old_logps"] if g.num_iterations > 1 or g.num_minibatches > 1 else []
    per_row = ("advantages", "sample_mask")  # [rows]; everything else is [rows, length]
    step_fn = jit_train_step(step, state, {k: batch_sharding(mesh, rules, 1 if k in per_row else 2) for k in keys},
                             base=base)
    logps_fn = jax.jit(lambda p, b: sequence_token_logps(nnx.merge(graphdef, p), b, temperature=s.temperature,
                                                         chunk_size=g.loss_chunk_size or None))
    ref_logps_fn = logps_fn if reference_graphdef is graphdef else jax.jit(
        lambda p, b: sequence_token_logps(nnx.merge(reference_graphdef, p), b, temperature=s.temperature,
                                          chunk_size=g.loss_chunk_size or None))
    sampler = Sampler(graphdef, model.config, mesh=mesh, rules=rules)
    del model  # the train state holds the params from here on
    evaluate = _make_evaluate(config, sampler, tokenizer, rewards, pad) if d.eval_path else None

    checkpointer = RunCheckpointer(os.path.join(config.output_dir, "checkpoints"), keep=t.keep_checkpoints,
                                   async_save=t.async_checkpoint)
    start = 0
    if resume:
        state, start = resume_from_latest(checkpointer, state, prompt_iter)
    writer = MetricsWriter(config.output_dir)
    summary = {"output_dir": config.output_dir, "checkpoints": checkpointer.directory.as_posix(),
               "metrics": writer.path, "total_steps": total_steps, "prompts": stats.__dict__}
    if evaluate is not None:
        summary["eval_before"] = evaluate(full(state.params))
        writer.log(start, summary["eval_before"], prefix="eval")
    base_key = jax.random.key(config.seed)
    bar = progress_bar(total_steps, initial=start)
    step_num, last_saved, history = start, start, []
    with jax.set_mesh(mesh), logical_rules(rules):
        for local_prompts in prompt_iter:
            if step_num >= total_steps:
                break
            step_num += 1
            t0 = time.time()
            rollout = sample_and_score(sampler, full(state.params), local_prompts, params,
                                       jax.random.fold_in(base_key, step_num), tokenizer=tokenizer, rewards=rewards,
                                       max_prompt_length=d.max_prompt_length)
            t_sample = time.time() - t0
            # Groups are whole on each process; the global rewards serve "batch" scaling and the metrics.
            totals = _global(rollout.rewards.total.astype(np.float32))
            adv = group_advantages(jnp.asarray(totals), g.group_size, scale=g.advantage_scale,
                                   std_ddof=g.std_ddof, eps=g.advantage_eps)
            rows = rollout.tokens.shape[0]
            mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
            host = training_batch(rollout, pad)
            host["advantages"] = np.asarray(adv.advantages)[mine]
            keep = ~np.asarray(adv.zero_std)[mine] if g.filter_zero_std else np.ones(rows, bool)
            host["sample_mask"] = keep.astype(np.float32)
            t1 = time.time()
            minibatches = _minibatches(host, g.num_minibatches, mesh, rules)
            for mb in minibatches:
                if reference is not None:
                    mb["ref_logps"] = ref_logps_fn(reference, mb)
                if g.num_iterations > 1 or g.num_minibatches > 1:
                    mb["old_logps"] = logps_fn(full(state.params), mb)
            opt_metrics = []
            for _ in range(g.num_iterations):
                for mb in minibatches:
                    state, m = step_fn(state, mb)
                    opt_metrics.append(m)
            opt_metrics = jax.device_get(opt_metrics)
            t_train = time.time() - t1
            row = _step_metrics(rollout, totals, adv, opt_metrics, t_sample, t_train, host, g)
            row = writer.log(step_num, row)
            history.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['train/reward_mean']:.3f}", acc=f"{row.get('train/accuracy', 0):.2f}",
                            gen_tok_s=f"{row['train/rollout_tokens_per_s']:.0f}")
            if evaluate is not None and t.eval_every and step_num % t.eval_every == 0 and step_num < total_steps:
                writer.log(step_num, evaluate(full(state.params)), prefix="eval")
            if t.checkpoint_every and step_num % t.checkpoint_every == 0:
                checkpointer.save(step_num, state, data_state=prompt_iter.get_state(), metadata=metadata, force=True)
                last_saved = step_num
    bar.close()
    if step_num > last_saved:
        checkpointer.save(step_num, state, data_state=prompt_iter.get_state(), metadata=metadata, force=True)
    checkpointer.wait()
    checkpointer.close()
    if evaluate is not None:
        summary["eval_after"] = evaluate(full(state.params))
        writer.log(step_num, summary["eval_after"], prefix="eval")
    writer.close()
    summary.update(final_step=step_num, wall_time_s=time.time() - started, history=history, params=full(state.params),
                   graphdef=graphdef, compilations={"train_step": step_fn._cache_size(),
                                                    "sampler": sampler.compilations()})
    if jax.process_index() == 0 and evaluate is not None:
        b, a = summary["eval_before"], summary["eval_after"]
        line = f"held-out accuracy ({int(a['prompts'])} prompts): greedy {b['accuracy']:.1%} -> {a['accuracy']:.1%}"
        if "sampled_accuracy" in a:
            line += (f"; sampled at temperature {s.temperature} (pass@1 of {d.eval_samples}) "
                     f"{b['sampled_accuracy']:.1%} -> {a['sampled_accuracy']:.1%}")
        print(line)
    runner.print_paths(summary)
    return summary


def _minibatches(host: dict[str, np.ndarray], count: int, mesh, rules) -> list[dict[str, jax.Array]]:
    """Split this process's rows into `count` contiguous minibatches, each sharded over the mesh."""
    rows = host["tokens"].shape[0]
    if rows % count:
        raise ValueError(f"grpo.num_minibatches={count} does not divide the {rows} local rollout rows")
    size = rows // count
    return [shard_batch({k: v[i * size:(i + 1) * size] for k, v in host.items()}, mesh, rules)
            for i in range(count)]


def _step_metrics(rollout, totals, adv, opt_metrics, t_sample, t_train, host, g) -> dict[str, float]:
    lengths = _global(rollout.lengths.astype(np.float32))
    stopped = _global(rollout.stopped.astype(np.float32))
    out = {"reward_mean": float(totals.mean()), "reward_std": float(totals.std()),
           "completion_length_mean": float(lengths.mean()), "completion_length_min": float(lengths.min()),
           "completion_length_max": float(lengths.max()), "truncated_fraction": float(1.0 - stopped.mean()),
           "zero_std_fraction": float(np.mean(np.asarray(adv.zero_std))),
           "rollout_tokens_per_s": float(lengths.sum()) / max(t_sample, 1e-9),
           "train_tokens_per_s": float(np.count_nonzero(host["segment_ids"]) * jax.process_count()
                                       * g.num_iterations) / max(t_train, 1e-9),
           "rollout_time_s": t_sample, "train_time_s": t_train}
    for key, value in rollout.rewards.metrics(prefix="rewards").items():  # per reward function (local rows)
        out[key] = value
    verifiable = [k for k in out if k.endswith("/accuracy")]
    if verifiable:
        out["accuracy"] = out[verifiable[0]]
    last = opt_metrics[-1]
    tokens = max(float(last["num_tokens"]), 1.0)
    out.update(loss=float(last["loss"]), grad_norm=float(last["grad_norm"]),
               learning_rate=float(last.get("learning_rate", 0.0)),
               clip_low_fraction=float(last["is_low_clipped"]) / tokens,
               clip_high_fraction=float(last["is_high_clipped"]) / tokens,
               clip_fraction=float(last["is_region_clipped"]) / tokens, ratio_mean=float(last["ratio"]) / tokens)
    for key in ("kl", "entropy"):
        if key in last:
            out[key] = float(last[key]) / tokens
    return out


def _make_evaluate(config, sampler: Sampler, tokenizer, rewards, pad: int):
    """Held-out accuracy of the verifiable rewards: greedy, and pass@1 of `eval_samples` samples drawn at the
    training temperature (the policy GRPO optimises), plus the mean total reward of those samples."""
    d, s = config.data, config.sampling
    prompts, _ = load_prompts(d.eval_path, tokenizer, template=config.chat_template,
                              max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                              on_bad_row=d.on_bad_row)
    stops = stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens)
    modes = {"accuracy": SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True, pad_token=pad,
                                        stop_tokens=stops)}
    if d.eval_samples:
        modes["sampled_accuracy"] = SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            stop_tokens=stops, pad_token=pad, num_samples=d.eval_samples)
    batch, count = d.eval_batch, jax.process_count()
    if batch % count:
        raise ValueError(f"data.eval_batch={batch} must be divisible by the {count} processes")
    verifiable = list(rewards.verifiable)[:1]

    def evaluate(params) -> dict[str, float]:
        sums = np.zeros(2 * len(modes))  # per mode: correct, reward
        share = batch // count
        first = jax.process_index() * share
        # (the sampler sets its mesh itself; a reward model runs on its own)
        for begin in range(0, len(prompts), batch):
            chunk = prompts[begin:begin + batch]
            real = len(chunk)
            chunk = chunk + [prompts[0]] * (batch - real)  # a fixed shape: one compilation per mode
            local = chunk[first:first + share]
            for i, (name, params_) in enumerate(modes.items()):
                out = sample_and_score(sampler, params, local, params_, jax.random.key(begin),
                                       tokenizer=tokenizer, rewards=rewards,
                                       max_prompt_length=d.max_prompt_length)
                n = params_.num_samples
                valid = np.repeat(np.arange(first, first + share) < real, n).astype(np.float64) / n
                if verifiable:
                    sums[2 * i] += float((out.rewards.correct[verifiable[0]] * valid).sum())
                sums[2 * i + 1] += float((out.rewards.total * valid).sum())
        sums = _global(sums[None]).sum(axis=0) / len(prompts)
        result = {"prompts": float(len(prompts))}
        for i, name in enumerate(modes):
            if verifiable:
                result[name] = float(sums[2 * i])
            result["reward_mean" if name == "accuracy" else "sampled_reward_mean"] = float(sums[2 * i + 1])
        return result

    return evaluate
