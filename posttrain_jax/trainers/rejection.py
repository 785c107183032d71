"""`posttrain-jax rejection-sample`: best of K samples per prompt -> SFT-ready JSONL (Llama 3 §4.2.2).

For every prompt, `rejection.num_samples` (K) completions are sampled by the
jitted sampler and scored by the configured rewards (a reward model, verifiers
or a weighted mix, see `posttrain_jax.rewards.build_rewards`). Per prompt the
candidate with the highest total reward is kept (ties: the lowest sample
index) among the *eligible* ones: with `drop_truncated`, a completion that hit
`max_new_tokens` without a stop token is not eligible (cut-off text would be
trained on as a finished reply); with `require_correct`, only completions the
named verifiable rewards score as correct are (so a reward model picks the
best among correct answers). The kept candidate must also reach `threshold`
(if set). Prompts with no eligible candidate, or below the threshold, are
rejected and counted, never silently dropped.

Output (one JSON object per kept prompt, read directly by the SFT pipeline,
`make_sft_pipeline(SourceSpec(path), ...)`)::

    {"messages": [...prompt messages..., {"role": "assistant", "content": best}],
     "score": total, "sample_index": k, "num_candidates": K, "rewards": {name: raw score},
     "correct": {verifiable name: bool}, "num_tokens": n, "stopped": bool,
     "source": "prompts.jsonl:12", "prompt_row": {the prompt row's other fields, e.g. "answer"},
     "rejected": {"content": worst, "score": ..., "sample_index": ..., "correct": {...}}}

"rejected" is the lowest-scoring candidate (among the finished ones with
`drop_truncated`), present when it is not the kept one: the other half of an
on-policy DPO pair (`posttrain-jax pipeline` builds pairs from it).

Prompts go through in file order, `prompts_per_batch` (global) at a time; the
last batch is padded to the same shape (one compilation) and the padding is
dropped. Each process samples its contiguous share of every batch and writes
its own shard: `out.jsonl` with one process, `out-00000-of-00002.jsonl` etc.
otherwise (read them with the glob `out-*-of-00002.jsonl`). Next to the output,
`out.summary.json` holds the counts, mean best-of-K vs mean score, and for
verifiable rewards best-of-K accuracy vs pass@1 (mean over all samples) vs
pass@K. (Give SFT the .jsonl file or glob, not the directory: the summary's
.json name would be read as data.) The output path must be a local (or
mounted) file system: resuming truncates and appends.

Resume (`--resume`): after every batch each process records, in
`<shard>.progress`, how many batches and bytes it has written and its
running counts; a resumed run truncates a half-written batch and continues
with the next one, so the output equals that of an uninterrupted run (each
batch's RNG is `fold_in(seed, batch index)`). Without `--resume` the output
is overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from posttrain_jax.data import synthetic
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.eval.progress import batch_share, global_sum, read_progress, shard_path, write_progress
from posttrain_jax.mesh import local_mesh, mesh_and_rules
from posttrain_jax.models.from_config import build_model
from posttrain_jax.rl.rollout import sample_and_score
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.sampling.text import stop_tokens_for
from posttrain_jax.sharding import logical_to_spec
from posttrain_jax.tokenizer import load_tokenizer, validate_messages
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The quickstart: best of 8 answers of the SFT quickstart model to arithmetic prompts, kept if correct."""
    c = base_config("runs/rejection-quickstart")
    c.model.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = ml_collections.ConfigDict(dict(
        quickstart_task=True,  # write arithmetic prompts with their answers to <output_dir>/data and use them
        quickstart_num_prompts=512, quickstart_max_operand=29,
        path="",  # JSONL: {"prompt": str | messages, <fields for the rewards>} or {"messages": [...]}
        max_prompt_length=64, length_policy="drop", on_bad_row="error",
    ))
    # Each entry: {"name": math | exact_match | format | reward_model, "weight": w, ...its options}.
    c.rewards = [{"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                                                stop_tokens=[]))  # + the template's end of turn and the EOS
    c.rejection = ml_collections.ConfigDict(dict(
        num_samples=8,  # K candidates per prompt (Llama 3: 10-30)
        prompts_per_batch=64,  # global; a multiple of the data shards and of the process count
        threshold=None,  # keep the best only if its total reward >= threshold (None: always)
        require_correct=["math"],  # names of verifiable rewards a candidate must pass to be eligible
        drop_truncated=True,  # a candidate that ran out of max_new_tokens is not eligible
        output="",  # default <output_dir>/rejection_sampled.jsonl
    ))
    return c


def _quickstart_data(config) -> None:
    d = config.data
    directory = os.path.join(config.output_dir, "data")
    d.path = os.path.join(directory, "prompts.jsonl")
    if jax.process_index() == 0 and not os.path.exists(d.path):
        os.makedirs(directory, exist_ok=True)
        # A seed of its own: none of these problems is the SFT (0/1) or GRPO (7/8) quickstart's.
        problems = synthetic.generate_problems(d.quickstart_num_prompts, seed=11, max_operand=d.quickstart_max_operand)
        with open(d.path + ".tmp", "w") as f:
            f.writelines(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in problems)
        os.replace(d.path + ".tmp", d.path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rejection quickstart data")


def _check(config) -> None:
    r, s = config.rejection, config.sampling
    if not isinstance(r.num_samples, int) or r.num_samples < 1:
        raise ValueError(f"rejection.num_samples={r.num_samples!r}: sample at least one candidate per prompt")
    if not isinstance(r.prompts_per_batch, int) or r.prompts_per_batch < 1:
        raise ValueError(f"rejection.prompts_per_batch={r.prompts_per_batch!r} must be a positive integer")
    if r.threshold is not None and (isinstance(r.threshold, bool) or not isinstance(r.threshold, (int, float))
                                    or not np.isfinite(r.threshold)):
        raise ValueError(f"rejection.threshold={r.threshold!r} must be a finite number or None")
    if isinstance(r.require_correct, str) or not all(isinstance(n, str) for n in r.require_correct):
        raise ValueError(f"rejection.require_correct={r.require_correct!r} must be a list of reward names, "
                         f"e.g. ['math'] (or [] for none)")
    if s.temperature <= 0:
        raise ValueError(f"sampling.temperature={s.temperature}: rejection sampling needs K different samples; "
                         f"use a temperature > 0")
    if r.output and not r.output.endswith(".jsonl"):
        raise ValueError(f"rejection.output={r.output!r} must end in .jsonl (the SFT pipeline reads it by suffix)")
    if not config.data.path:
        raise ValueError("config.data.path is empty: give a JSONL file of prompts (or set data.quickstart_task)")
    if not os.path.exists(config.data.path):
        raise FileNotFoundError(f"data.path {config.data.path} does not exist")
    if config.model.checkpoint and not os.path.exists(config.model.checkpoint):
        raise FileNotFoundError(f"model.checkpoint {config.model.checkpoint} does not exist: run the SFT quickstart "
                                f"(`posttrain-jax sft`) first, or point --config.model.checkpoint / "
                                f"--config.model.hf_path at the policy to sample from")


def _check_rewards(rewards, require_correct) -> None:
    for name in require_correct:
        if name not in rewards.names:
            raise ValueError(f"rejection.require_correct names {name!r}, which is not a configured reward; "
                             f"rewards: {list(rewards.names)}")
        if name not in rewards.verifiable:
            raise ValueError(f"rejection.require_correct names {name!r}, which has no notion of correct (not a "
                             f"verifiable reward); verifiable rewards: {list(rewards.verifiable)}")


def _check_batch(prompts_per_batch: int, mesh, rules) -> None:
    # The sampler's prompt rows are sharded over the mesh axes of "batch" (as in `Sampler.data_shards`).
    spec = logical_to_spec(("batch",), rules, mesh.axis_names)[0]
    shards = int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else tuple(spec or ()))]))
    count = jax.process_count()
    if prompts_per_batch % count or prompts_per_batch % shards:
        raise ValueError(f"rejection.prompts_per_batch={prompts_per_batch} must be a multiple of the {shards} data "
                         f"shards of the mesh and of the {count} processes")


def _sft_ready(prompts) -> None:
    """Fail before sampling if a prompt plus a reply would not be a valid SFT conversation."""
    for p in prompts:
        try:
            validate_messages([*p.messages, {"role": "assistant", "content": ""}])
        except ValueError as e:
            raise ValueError(f"{p.source}: the prompt plus a reply is not a valid SFT conversation: {e}") from None


def _start(resume: bool, progress_file: str, shard: str, fingerprint: dict, tally: Tally) -> list[dict]:
    """Where to begin: [] (batch 0, an empty shard) or, resuming, [the progress entry of the last batch every
    process finished] (the shard truncated to it, the counts restored)."""
    entries = read_progress(progress_file, fingerprint) if resume else []
    mine = entries[-1]["batches"] if entries else 0
    start = mine
    if jax.process_count() > 1:  # a process may have recorded one batch more than another before the crash
        start = int(np.asarray(multihost_utils.process_allgather(np.asarray([mine]))).min())
    if start == 0:
        open(shard, "wb").close()
        return []
    entry = next((e for e in entries if e["batches"] == start), None)
    if entry is None:
        raise ValueError(f"{progress_file}: cannot resume at batch {start} (this process recorded batches "
                         f"{[e['batches'] for e in entries]}); delete the output to start over")
    with open(shard, "r+b") as f:  # drop whatever a crashed batch left after the last complete one
        f.truncate(entry["bytes"])
    tally.load(entry["tally"])
    log.info("resuming %s after batch %d (%d bytes)", shard, start, entry["bytes"])
    return [entry]


# ---- pieces of the loop, pure where possible ---------------------------------------------------------------------

def summary_path(output: str) -> str:
    return output.removesuffix(".jsonl") + ".summary.json"


@dataclasses.dataclass(frozen=True)
class Selection:
    """Per prompt: `index` of the chosen candidate (-1: none eligible), whether it is kept, and why not."""

    index: np.ndarray  # [prompts] int
    keep: np.ndarray  # [prompts] bool
    no_eligible: np.ndarray  # [prompts] bool: no candidate passed drop_truncated / require_correct
    below_threshold: np.ndarray  # [prompts] bool: the best eligible candidate scored < threshold


def select_best(totals: np.ndarray, eligible: np.ndarray, threshold: float | None = None) -> Selection:
    """The highest-scoring eligible candidate of each prompt (ties: the lowest sample index).

    totals, eligible: [prompts, K] total rewards and eligibility masks.
    """
    masked = np.where(eligible, totals, -np.inf)
    best = np.argmax(masked, axis=1)  # argmax returns the first maximum: ties go to the lowest index
    has = eligible.any(axis=1)
    score = np.take_along_axis(totals, best[:, None], axis=1)[:, 0]
    below = has & (score < threshold) if threshold is not None else np.zeros_like(has)
    return Selection(index=np.where(has, best, -1), keep=has & ~below, no_eligible=~has, below_threshold=below)


def sft_row(prompt, completion: str, *, sample_index: int, num_candidates: int, total: float,
            scores: dict, correct: dict, num_tokens: int, stopped: bool, rejected: dict | None = None) -> dict:  # fmt: skip
    """One output row: the conversation SFT trains on, plus where it came from and how it scored."""
    row = {"messages": [dict(m) for m in prompt.messages] + [{"role": "assistant", "content": completion}],
           "score": float(total), "sample_index": int(sample_index), "num_candidates": int(num_candidates),
           "rewards": {name: float(v) for name, v in scores.items()}}
    if correct:
        row["correct"] = {name: bool(v) for name, v in correct.items()}
    row.update(num_tokens=int(num_tokens), stopped=bool(stopped), source=prompt.source,
               prompt_row={k: v for k, v in prompt.row.items() if k not in ("prompt", "messages")})
    if rejected is not None:
        row["rejected"] = rejected
    return row


_COUNTS = ("prompts", "kept", "rejected_no_eligible", "rejected_below_threshold", "samples", "truncated_samples",
           "generated_tokens", "score_sum", "best_score_sum", "kept_score_sum")
_PER_VERIFIABLE = ("correct_samples", "best_correct", "any_correct", "kept_correct")


class Tally:
    """Running sums over this process's real prompts; summed over processes once, at the end."""

    def __init__(self, reward_names, verifiable):
        self.reward_names, self.verifiable = list(reward_names), list(verifiable)
        self.keys = list(_COUNTS) + [f"{n}/score_sum" for n in self.reward_names]
        self.keys += [f"{n}/{field}" for n in self.verifiable for field in _PER_VERIFIABLE]
        self.values = dict.fromkeys(self.keys, 0.0)

    def add(self, choice: Selection, totals, scores: dict, correct: dict, stopped, lengths) -> None:
        v, rows = self.values, np.arange(totals.shape[0])
        best = np.argmax(totals, axis=1)  # best of K by the reward alone, whatever the filters say
        kept = choice.keep
        v["prompts"] += totals.shape[0]
        v["kept"] += kept.sum()
        v["rejected_no_eligible"] += choice.no_eligible.sum()
        v["rejected_below_threshold"] += choice.below_threshold.sum()
        v["samples"] += totals.size
        v["truncated_samples"] += (~stopped).sum()
        v["generated_tokens"] += lengths.sum()
        v["score_sum"] += totals.sum()
        v["best_score_sum"] += totals[rows, best].sum()
        v["kept_score_sum"] += totals[rows, choice.index][kept].sum()
        for name in self.reward_names:
            v[f"{name}/score_sum"] += scores[name].sum()
        for name in self.verifiable:
            c = correct[name]
            v[f"{name}/correct_samples"] += c.sum()
            v[f"{name}/best_correct"] += c[rows, best].sum()
            v[f"{name}/any_correct"] += c.any(axis=1).sum()
            v[f"{name}/kept_correct"] += c[rows, choice.index][kept].sum()

    def vector(self) -> np.ndarray:
        return np.asarray([self.values[k] for k in self.keys], np.float64)

    def dump(self) -> dict:
        return {k: float(x) for k, x in self.values.items()}

    def load(self, values: dict) -> None:
        if sorted(values) != sorted(self.keys):
            raise ValueError(f"saved counts {sorted(values)} do not match this run's rewards {sorted(self.keys)}")
        self.values = {k: float(values[k]) for k in self.keys}

    def summary(self, vector: np.ndarray, *, num_samples: int) -> dict:
        """Counts, mean best-of-K vs mean score, and best-of-K accuracy vs pass@1 vs pass@K, from summed sums."""
        v = dict(zip(self.keys, (float(x) for x in vector)))
        prompts, samples, kept = max(v["prompts"], 1.0), max(v["samples"], 1.0), v["kept"]
        out = {key: int(v[key]) for key in ("prompts", "kept", "rejected_no_eligible", "rejected_below_threshold",
                                           "samples", "truncated_samples", "generated_tokens")}
        out.update(num_samples=num_samples, mean_score=v["score_sum"] / samples,
                   mean_best_score=v["best_score_sum"] / prompts,
                   mean_kept_score=v["kept_score_sum"] / kept if kept else None,
                   reward_means={n: v[f"{n}/score_sum"] / samples for n in self.reward_names})
        out["accuracy"] = {n: {"pass@1": v[f"{n}/correct_samples"] / samples,
                               "best_of_k": v[f"{n}/best_correct"] / prompts,
                               "pass@k": v[f"{n}/any_correct"] / prompts,
                               "kept": v[f"{n}/kept_correct"] / kept if kept else None} for n in self.verifiable}
        return out


def fingerprint_of(config, *, num_prompts: int, process_count: int) -> dict:
    """What must not change between a run and its resumption."""
    r = config.rejection
    fp = {"data.path": os.path.abspath(config.data.path), "num_prompts": num_prompts,
          "prompts_per_batch": r.prompts_per_batch, "num_samples": r.num_samples, "seed": config.seed,
          "process_count": process_count, "sampling": config.sampling.to_dict(),
          "rewards": [dict(x) for x in config.rewards], "threshold": r.threshold,
          "require_correct": list(r.require_correct), "drop_truncated": r.drop_truncated,
          "chat_template": config.chat_template, "model": config.model.to_dict(), "tokenizer": config.tokenizer}
    return json.loads(json.dumps(fp, default=str))


def _report(summary: dict) -> str:
    k = summary["num_samples"]
    lines = [f"rejection sampling: {summary['prompts']} prompts x {k} samples -> {summary['kept']} kept, "
             f"{summary['rejected_no_eligible']} with no eligible sample (truncated or incorrect), "
             f"{summary['rejected_below_threshold']} below threshold {summary['threshold']}",
             f"mean total reward: best of {k} {summary['mean_best_score']:.4g} vs one sample "
             f"{summary['mean_score']:.4g}" + (f" (kept: {summary['mean_kept_score']:.4g})"
                                               if summary["mean_kept_score"] is not None else "")]
    for name, acc in summary["accuracy"].items():
        lines.append(f"{name} accuracy: best of {k} {acc['best_of_k']:.1%}, one sample (pass@1) {acc['pass@1']:.1%}, "
                     f"pass@{k} {acc['pass@k']:.1%}")
    lines.append(f"{summary['prompts_per_s']:.1f} prompts/s, {summary['tokens_per_s']:.0f} generated tokens/s")
    lines.append(f"wrote {', '.join(summary['shards'])}\nsummary: {summary['summary']}")
    return "\n".join(lines)


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Sample K candidates per prompt, keep the best, write SFT-ready JSONL; returns the summary."""
    started = time.time()
    if config.data.quickstart_task:
        _quickstart_data(config)
    _check(config)
    r, s, d = config.rejection, config.sampling, config.data
    mesh, rules = mesh_and_rules(config)
    _check_batch(r.prompts_per_batch, mesh, rules)
    tokenizer = load_tokenizer(config.tokenizer)
    prompts, stats = load_prompts(d.path, tokenizer, template=config.chat_template,
                                  max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                                  on_bad_row=d.on_bad_row)
    log.info(stats.report(d.path))
    _sft_ready(prompts)
    if isinstance(config.rewards, (str, dict)) or not config.rewards:
        raise ValueError(f"rewards={config.rewards!r} must be a non-empty list of reward specs")
    # A reward model is sharded over this process's devices: each process scores its own completions.
    rewards = build_rewards([dict(r) for r in config.rewards], mesh=local_mesh())
    require_correct = list(r.require_correct)
    _check_rewards(rewards, require_correct)
    output = r.output or os.path.join(config.output_dir, "rejection_sampled.jsonl")
    index, count = jax.process_index(), jax.process_count()
    shard = shard_path(output, index, count)
    progress_file = shard + ".progress"
    fingerprint = fingerprint_of(config, num_prompts=len(prompts), process_count=count)
    if resume:
        read_progress(progress_file, fingerprint)  # changed settings fail now, not after loading the model
    model = build_model(config.model, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size,
                        merge_adapters=False)  # an adapter run samples with its adapters
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                            top_p=s.top_p, stop_tokens=stop_tokens_for(tokenizer, config.chat_template, s.stop_tokens),
                            pad_token=pad, num_samples=r.num_samples)
    graphdef, state = nnx.split(model)  # with adapters (and a quantized base): the whole adapted model
    sampler = Sampler(graphdef, model.config, mesh=mesh, rules=rules)
    del model  # `state` holds the params

    os.makedirs(os.path.dirname(os.path.abspath(shard)), exist_ok=True)
    tally = Tally(rewards.names, list(rewards.verifiable))
    num_batches = -(-len(prompts) // r.prompts_per_batch)
    history = _start(resume, progress_file, shard, fingerprint, tally)
    start = history[-1]["batches"] if history else 0

    from tqdm.auto import tqdm
    bar = tqdm(total=len(prompts), initial=min(start * r.prompts_per_batch, len(prompts)), desc="rejection-sample",
               unit="prompt", dynamic_ncols=True, disable=index != 0)
    base_key = jax.random.key(config.seed)
    sampled_tokens, t_loop = 0, time.time()
    # No `jax.set_mesh` here: the sampler enters its mesh itself, and the reward functions run outside it.
    with open(shard, "ab") as out:
        for batch in range(start, num_batches):
            local, real = batch_share(prompts, batch, r.prompts_per_batch, index, count)
            rollout = sample_and_score(sampler, state, local, params, jax.random.fold_in(base_key, batch),
                                       tokenizer=tokenizer, rewards=rewards, max_prompt_length=d.max_prompt_length)
            k = r.num_samples
            shape = (len(local), k)
            totals = rollout.rewards.total.reshape(shape)[:real]
            stopped = np.asarray(rollout.stopped, bool).reshape(shape)[:real]
            scores = {n: v.reshape(shape)[:real] for n, v in rollout.rewards.scores.items()}
            correct = {n: v.reshape(shape)[:real] for n, v in rollout.rewards.correct.items()}
            lengths = np.asarray(rollout.lengths).reshape(shape)[:real]
            eligible = stopped.copy() if r.drop_truncated else np.ones_like(stopped)
            for name in require_correct:
                eligible &= correct[name]
            choice = select_best(totals, eligible, r.threshold)
            # the lowest-scoring finished candidate: the rejected half of an on-policy preference pair
            worst = np.argmin(np.where(stopped | (not r.drop_truncated), totals, np.inf), axis=1)
            lines = []
            for i in np.flatnonzero(choice.keep):
                j, w = int(choice.index[i]), int(worst[i])
                rejected = None if w == j else {
                    "content": rollout.texts[i * k + w], "score": float(totals[i, w]), "sample_index": w,
                    "correct": {n: bool(v[i, w]) for n, v in correct.items()}}
                lines.append(sft_row(local[i], rollout.texts[i * k + j], sample_index=j, num_candidates=k,
                                     total=totals[i, j], scores={n: v[i, j] for n, v in scores.items()},
                                     correct={n: v[i, j] for n, v in correct.items()}, num_tokens=lengths[i, j],
                                     stopped=stopped[i, j], rejected=rejected))
            out.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
            tally.add(choice, totals, scores, correct, stopped, lengths)
            entry = {"batches": batch + 1, "bytes": out.tell(), "tally": tally.dump()}
            history = (history + [entry])[-2:]  # this batch and the one before (see `_start`)
            write_progress(progress_file, fingerprint, history)
            sampled_tokens += int(lengths.sum())
            bar.update(min((batch + 1) * r.prompts_per_batch, len(prompts)) - bar.n)
            # Every process holds an equal share of the rows: this process's rate x the count.
            bar.set_postfix(tokens_per_s=f"{sampled_tokens * count / max(time.time() - t_loop, 1e-9):.0f}",
                            kept=f"{tally.values['kept'] / max(tally.values['prompts'], 1):.0%}")
    bar.close()
    summary = tally.summary(global_sum(tally.vector()), num_samples=r.num_samples)
    elapsed = time.time() - t_loop
    generated = float(global_sum(np.asarray([float(sampled_tokens)]))[0])
    summary.update(
        output=output, shards=[shard_path(output, i, count) for i in range(count)], summary=summary_path(output),
        prompt_file=d.path, prompt_stats=stats.__dict__, threshold=r.threshold, require_correct=require_correct,
        drop_truncated=bool(r.drop_truncated), rewards_config=[dict(x) for x in config.rewards],
        batches=num_batches, resumed_at_batch=start, wall_time_s=time.time() - started,
        prompts_per_s=(len(prompts) - min(start * r.prompts_per_batch, len(prompts))) / max(elapsed, 1e-9),
        tokens_per_s=generated / max(elapsed, 1e-9), compilations={"sampler": sampler.compilations()})
    if index == 0:
        path = summary_path(output)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
        print(_report(summary))
    return summary
