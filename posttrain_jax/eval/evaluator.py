"""Held-out evaluation with the jitted sampler: greedy accuracy, pass@k, maj@k, rewards, lengths.

`Evaluator(prompts, ...)` scores a model's params on a fixed prompt set:

- greedy: one argmax completion per prompt -> each verifier's accuracy, every
  reward's mean, the response length and the truncated fraction;
- sampled: `num_samples` (n) completions per prompt at the sampling temperature
  -> pass@k for each k in `ks` (unbiased estimator from the n samples, Chen et
  al. 2021), maj@k (majority vote over the first k samples' answers), mean
  reward and length.

Every metric is a mean over prompts of a per-prompt value (see `prompt_values`),
so each process sums its own prompts and one all-reduce makes the result.

Prompts go through in file order, `prompts_per_batch` (global) at a time, each
process sampling its contiguous share (`eval.progress.batch_share`); the
last batch is padded to the same shape, so there is one compilation per
SamplingParams (greedy, sampled) for the whole set. Batch b's RNG is
`fold_in(key(seed), b)`: the result does not depend on where a run was resumed.

With `records` (a JSONL path), one record per prompt is appended after every
batch with a `.progress` file next to it (byte offset + settings fingerprint,
replaced atomically); `resume=True` truncates a half-written batch and
continues, so a killed evaluation finishes with the numbers of an
uninterrupted one. Several processes write `records-0000i-of-0000N.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from posttrain_jax.eval.metrics import maj_at_k, pass_at_k, vote_key
from posttrain_jax.rewards import Rewards
from posttrain_jax.sampling import Sampler, SamplingParams
from posttrain_jax.eval.progress import batch_share, global_sum, read_progress, shard_path, write_progress
from posttrain_jax.data.prompts import PromptRow
from posttrain_jax.rl.rollout import sample_and_score

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. num_samples 0 skips sampling (greedy only); ks must be <= num_samples."""

    num_samples: int = 8
    ks: tuple[int, ...] = (1, 8)
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    prompts_per_batch: int = 64
    max_prompt_length: int = 256
    answer_extract: str = "auto"  # how maj@k finds each sample's answer (posttrain_jax.rewards.extract_answer)
    keep_texts: bool = False  # store every sample's text in the records (greedy texts are always kept)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        if not self.greedy and not self.num_samples:
            raise ValueError("eval: greedy is off and num_samples is 0: nothing to evaluate")
        bad = [k for k in self.ks if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(f"eval.ks={list(self.ks)}: every k must be in 1..num_samples={self.num_samples}")
        if self.prompts_per_batch < 1:
            raise ValueError(f"eval.prompts_per_batch={self.prompts_per_batch} must be >= 1")


def prompt_values(record: dict, *, ks: Sequence[int], verifiable: Sequence[str]) -> dict[str, float]:
    """The per-prompt values every metric averages (the first verifier's also without a prefix)."""
    out: dict[str, float] = {"prompts": 1.0}
    greedy, samples = record.get("greedy"), record.get("samples")
    if greedy is not None:
        out.update(greedy_reward=greedy["total"], greedy_length=greedy["length"],
                   greedy_truncated=float(not greedy["stopped"]))
        out.update({f"{name}/greedy_mean": v for name, v in greedy["rewards"].items()})
    if samples is not None:
        out.update(sampled_reward=float(np.mean(samples["total"])), sampled_length=float(np.mean(samples["length"])),
                   sampled_truncated=float(1.0 - np.mean(samples["stopped"])))
        out.update({f"{name}/sampled_mean": float(np.mean(v)) for name, v in samples["rewards"].items()})
    for i, name in enumerate(verifiable):
        values = {}
        if greedy is not None:
            values["accuracy"] = float(greedy["correct"][name])
        if samples is not None:
            correct = samples["correct"][name]
            n, c = len(correct), int(sum(correct))
            for k in ks:
                values[f"pass@{k}"] = pass_at_k(n, c, k)
                values[f"maj@{k}"] = float(maj_at_k(samples["votes"], correct, k))
        out.update({f"{name}/{key}": v for key, v in values.items()})
        if i == 0:
            out.update(values)
    return out


def summarize(records: Sequence[dict], *, ks: Sequence[int], verifiable: Sequence[str]) -> dict[str, float]:
    """Means over prompts of `prompt_values`, summed over processes (every process passes its own records)."""
    keys: list[str] = []
    sums: dict[str, float] = {}
    for record in records:
        for key, value in prompt_values(record, ks=ks, verifiable=verifiable).items():
            if key not in sums:
                keys.append(key)
                sums[key] = 0.0
            sums[key] += float(value)
    if jax.process_count() > 1:  # every process has the same keys (the same settings and rewards)
        keys = sorted(_all_keys(keys))
    total = global_sum(np.asarray([sums.get(k, 0.0) for k in keys], np.float64))
    out = dict(zip(keys, (float(x) for x in total)))
    count = max(out.pop("prompts", 0.0), 1.0)
    return {"prompts": int(count), **{k: v / count for k, v in out.items()}}


def _all_keys(keys: list[str]) -> set[str]:
    encoded = np.frombuffer(json.dumps(sorted(keys)).encode().ljust(1 << 14), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(encoded))
    return {k for row in gathered for k in json.loads(bytes(row).decode().strip())}


class Evaluator:
    """Held-out metrics of params on `prompts` (see the module docstring). Params are an argument of every
    call, so a trainer evaluates its live params with no copy."""

    def __init__(self, prompts: Sequence[PromptRow], *, sampler: Sampler, tokenizer, rewards: Rewards,
                 settings: EvalSettings, stop_tokens: Sequence[int], pad_token: int = 0):
        if not prompts:
            raise ValueError("eval: no prompts")
        self.prompts, self.sampler, self.tokenizer, self.rewards = list(prompts), sampler, tokenizer, rewards
        self.settings = s = settings
        count, shards = jax.process_count(), sampler.data_shards
        # Each process hands its share to the sampler, which splits it over that process's own data shards.
        if s.prompts_per_batch % count or s.prompts_per_batch % shards:
            raise ValueError(f"eval.prompts_per_batch={s.prompts_per_batch} must be a multiple of the {count} "
                             f"processes and of the {shards} data shards of the sampler's mesh")
        longest = max(len(p.ids) for p in self.prompts)
        if longest > s.max_prompt_length:
            raise ValueError(f"a prompt has {longest} tokens, more than max_prompt_length={s.max_prompt_length}")
        stops = tuple(int(t) for t in stop_tokens)
        self.modes: dict[str, SamplingParams] = {}
        if s.greedy:
            self.modes["greedy"] = SamplingParams(max_new_tokens=s.max_new_tokens, greedy=True, stop_tokens=stops,
                                                  pad_token=pad_token)
        if s.num_samples:
            self.modes["samples"] = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                                   top_k=s.top_k, top_p=s.top_p, stop_tokens=stops,
                                                   pad_token=pad_token, num_samples=s.num_samples)
        self.num_batches = -(-len(self.prompts) // s.prompts_per_batch)

    @property
    def verifiable(self) -> list[str]:
        return list(self.rewards.verifiable)

    def batch_records(self, params, batch: int) -> list[dict]:
        """Records of this process's real prompts of global batch `batch`."""
        s = self.settings
        local, real = batch_share(self.prompts, batch, s.prompts_per_batch, jax.process_index(), jax.process_count())
        first = batch * s.prompts_per_batch + jax.process_index() * len(local)
        records = [{"index": first + i, "source": local[i].source} for i in range(real)]
        key = jax.random.fold_in(jax.random.key(s.seed), batch)
        for mode, sampling in self.modes.items():
            out = sample_and_score(self.sampler, params, local, sampling, jax.random.fold_in(key, len(mode)),
                                   tokenizer=self.tokenizer, rewards=self.rewards,
                                   max_prompt_length=s.max_prompt_length)
            n = sampling.num_samples
            for i in range(real):
                rows = slice(i * n, (i + 1) * n)
                entry = {"length": [int(x) for x in out.lengths[rows]], "stopped": [bool(x) for x in out.stopped[rows]],
                         "total": [float(x) for x in out.rewards.total[rows]],
                         "rewards": {k: [float(x) for x in v[rows]] for k, v in out.rewards.scores.items()},
                         "correct": {k: [bool(x) for x in v[rows]] for k, v in out.rewards.correct.items()}}
                texts = out.texts[rows]
                if mode == "greedy":
                    entry = {k: ({n_: v_[0] for n_, v_ in v.items()} if isinstance(v, dict) else v[0])
                             for k, v in entry.items()}
                    entry["text"] = texts[0]
                else:
                    entry["votes"] = [vote_key(t, s.answer_extract) for t in texts]
                    if s.keep_texts:
                        entry["texts"] = texts
                records[i][mode] = entry
        return records

    def __call__(self, params, *, records: str | None = None, resume: bool = False, fingerprint: dict | None = None,
                 desc: str = "eval", leave: bool = True) -> dict[str, float]:
        """Metrics of `params` (means over all prompts); see the module docstring for `records` / `resume`."""
        from tqdm.auto import tqdm
        s = self.settings
        done: list[dict] = []
        history: list[dict] = []
        start, out = 0, None
        fingerprint = {"settings": dataclasses.asdict(s), "prompts": len(self.prompts),
                       "rewards": list(self.rewards.names), **(fingerprint or {})}
        fingerprint = json.loads(json.dumps(fingerprint, default=str))
        if records is not None:
            shard = shard_path(records, jax.process_index(), jax.process_count())
            os.makedirs(os.path.dirname(os.path.abspath(shard)), exist_ok=True)
            start, done, history = self._start(shard, fingerprint, resume)
            out = open(shard, "ab")
        bar = tqdm(total=len(self.prompts), initial=min(start * s.prompts_per_batch, len(self.prompts)), desc=desc,
                   unit="prompt", dynamic_ncols=True, disable=jax.process_index() != 0, leave=leave)
        try:
            for batch in range(start, self.num_batches):
                new = self.batch_records(params, batch)
                done += new
                if out is not None:
                    out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new).encode("utf-8"))
                    out.flush()
                    os.fsync(out.fileno())
                    # this batch and the one before: another process may have stopped one batch earlier
                    history = (history + [{"batches": batch + 1, "bytes": out.tell()}])[-2:]
                    write_progress(shard + ".progress", fingerprint, history)
                bar.update(min((batch + 1) * s.prompts_per_batch, len(self.prompts)) - bar.n)
                if self.verifiable and done:
                    name = self.verifiable[0]
                    key = "greedy" if "greedy" in self.modes else "samples"
                    right = [float(np.mean(np.atleast_1d(r[key]["correct"][name]))) for r in done]
                    bar.set_postfix({f"{name}_acc": f"{np.mean(right):.1%}", "prompts": len(done)})
        finally:
            bar.close()
            if out is not None:
                out.close()
        return summarize(done, ks=s.ks if s.num_samples else (), verifiable=self.verifiable)

    def _start(self, shard: str, fingerprint: dict, resume: bool) -> tuple[int, list[dict], list[dict]]:
        entries = read_progress(shard + ".progress", fingerprint) if resume else []
        start = mine = entries[-1]["batches"] if entries else 0
        if jax.process_count() > 1:
            start = int(np.asarray(multihost_utils.process_allgather(np.asarray([mine]))).min())
        if start == 0:
            open(shard, "wb").close()
            return 0, [], []
        entry = next((e for e in entries if e["batches"] == start), None)
        if entry is None:
            raise ValueError(f"{shard}.progress: cannot resume at batch {start} (recorded: "
                             f"{[e['batches'] for e in entries]}); delete the records to start over")
        with open(shard, "r+b") as f:  # drop whatever a killed batch left after the last complete one
            f.truncate(entry["bytes"])
        with open(shard, encoding="utf-8") as f:
            done = [json.loads(line) for line in f if line.strip()]
        log.info("resuming %s after batch %d (%d prompts)", shard, start, len(done))
        return start, done, [entry]

    def compilations(self) -> int:
        return self.sampler.compilations()


def scores_by_index(records: Sequence[dict], reward: str) -> dict[int, float]:
    """Per prompt index: `reward`'s greedy score (or its mean over the samples when there is no greedy pass)."""
    out = {}
    for r in records:
        if "greedy" in r:
            out[r["index"]] = float(r["greedy"]["rewards"][reward])
        else:
            out[r["index"]] = float(np.mean(r["samples"]["rewards"][reward]))
    return out


def read_records(records: str) -> list[dict]:
    """This process's records of a finished evaluation."""
    shard = shard_path(records, jax.process_index(), jax.process_count())
    with open(shard, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
