"""`posttrain-jax pipeline`: Llama 3's iterative post-training loop, rounds of normal runs.

Each round r (Llama 3 §4.1, Fig. 7; Qwen 2.5 §4 for verifier-built pairs) runs, each
stage under `<output_dir>/round_<r>/<stage>` as an ordinary run of its trainer:

1. `rm`: a reward model trained from the base checkpoint (every round, as Llama 3
   does) on all preference data so far: the seed data plus every earlier round's
   on-policy pairs;
2. `rejection`: K samples per prompt (a fresh slice of `data.prompts` each round)
   from the current best model, scored by the verifiers and/or this round's RM,
   the best kept (`posttrain-jax rejection-sample`);
3. `sft`: SFT from the base (`sft.init="base"`, Llama 3) or the current best on the
   configured mix plus the rejection-sampled data (of every round so far with
   `sft.accumulate`);
4. `pairs`: on-policy DPO pairs from the round's samples: the kept best vs the
   lowest-scoring candidate, by reward margin (`pairs.mode="reward"`) or verifier
   pass vs fail (`"verifier"`); appended to the preference data;
5. `dpo_<i>`: one DPO run per entry of `dpo.candidates` (overrides such as
   another seed or beta) from this round's SFT model;
6. `average`: the mean of the DPO candidates' params (model averaging, Llama 3 §4.1.5);
7. `eval`: every candidate (sft, dpo_i, average) on the held-out prompts
   (`posttrain-jax eval`); the best by `eval.metric` starts the next round, unless an
   earlier round's model scored higher (`eval.keep_best`, on by default: a bad round
   never hands a worse policy on; the table marks which model is handed on).

`round_0/eval` evaluates the starting policy. A stage that finished has a
`stage_done.json` and is never run again; an unfinished one is resumed by its
trainer (checkpoints, progress files, eval records), so the pipeline continues
after a kill at any point by running the same command again. At the end (and
after every round) it prints the per-round table and writes
`<output_dir>/pipeline.json`, `pipeline.md` and `pipeline.png` (the metric per
round and stage).

The quickstart (no config) runs two rounds on the synthetic arithmetic task from
the SFT quickstart model (run `posttrain-jax sft` first), with operands up to 29
where that model (trained up to 19) has room to improve.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from posttrain_jax.data import synthetic
from posttrain_jax.data.preference import write_arithmetic_preferences
from posttrain_jax.eval.from_config import eval_section
from posttrain_jax.eval import command as eval_command
from posttrain_jax.models.from_config import model_config
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers import dpo, rejection, rm, sft
from posttrain_jax.trainers.pipeline_stages import (StageRunner, _atomic_json, build_pairs, merge, run_average,
                                                    run_dpo, run_eval, run_rejection, run_rm, run_sft)
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR

log = logging.getLogger(__name__)
MATH = {"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}


def default_config() -> ml_collections.ConfigDict:
    """The quickstart: two rounds from the SFT quickstart model on arithmetic with operands up to 29."""
    c = base_config("runs/iterative-quickstart")
    del c.model
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.rounds = 2
    c.base = model_config()  # the pre-trained model: every round's RM (and SFT with sft.init="base") starts here
    c.base.preset = ""
    c.base.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")
    c.policy = model_config()  # round 1's policy; nothing set: the base
    c.policy.preset = ""
    c.data = ml_collections.ConfigDict(dict(
        # the quickstart's files are written once per output_dir (<output_dir>/data): changing these later needs
        # a new output_dir
        quickstart_task=True, quickstart_max_operand=29, quickstart_sft_epochs=6.0, quickstart_eval_rows=200,
        sft_mix=[],  # [{"path": ..., "weight": ..., "epochs": ...}]: the SFT data of every round
        preferences=[],  # JSONL paths of the seed preference data (prompt/chosen/rejected)
        prompts="",  # JSONL prompts (+ ground truth) for rejection sampling; round r takes its own slice
        prompts_per_round=64,
        eval_path="",  # held-out prompts with references
    ))
    c.rm = ml_collections.ConfigDict(dict(overrides={"train": {"steps": 25, "global_pairs": 16}}))
    c.rejection = ml_collections.ConfigDict(dict(
        rewards=[MATH],  # verifiers; the round's RM is added with use_reward_model
        use_reward_model=True, reward_model_options={"batch_size": 32, "max_length": 128},
        overrides={"rejection": {"num_samples": 4, "prompts_per_batch": 64, "require_correct": ["math"]},
                   "sampling": {"temperature": 1.0, "max_new_tokens": 16}}))
    # steps 0: one pass over the mix (6 epochs of the 2,000 gold rows, packed 3-4 to a row of 64 tokens: ~300
    # steps of 32 rows) plus the samples. Fewer steps
    # do not teach the operands 20-29 and cost the old range (30 steps: 0.52 -> 0.28 held-out; 150 at lr 2e-3:
    # 0.66; 300 at lr 1e-3: 0.81, each from the same round-1 inputs).
    c.sft = ml_collections.ConfigDict(dict(init="best", accumulate=True, samples_epochs=1.0,
                                           overrides={"train": {"steps": 0, "global_batch": 32},
                                                      "optim": {"learning_rate": 1e-3}}))
    c.pairs = ml_collections.ConfigDict(dict(mode="verifier", verifier="math", min_margin=0.0))
    c.dpo = ml_collections.ConfigDict(dict(
        data="all",  # all: every preference file so far; latest: this round's pairs only
        candidates=[{"seed": 0}, {"seed": 1, "train": {"beta": 0.2}}],
        # one pass over the pairs; lr 3e-5: at 1e-4 (15 steps) DPO cost the round-1 SFT model 5-9 points of
        # held-out accuracy, at 3e-5 it keeps it (the seed pairs are easy: chosen already ~10 nats above rejected)
        overrides={"train": {"steps": 0, "global_pairs": 16}, "optim": {"learning_rate": 3e-5}}))
    c.average = ml_collections.ConfigDict(dict(enabled=True))
    c.eval = ml_collections.ConfigDict(dict(
        metric="accuracy", rewards=[MATH],
        # the next round starts from the best model so far: a round whose candidates all score below the
        # previous best hands that one on (ties go to the newer model); False: the round's best, whatever it scores
        keep_best=True,
        overrides={"eval": eval_section(num_samples=4, ks=[1, 4], prompts_per_batch=64).to_dict(),
                   "data": {"max_prompt_length": 64}, "sampling": {"max_new_tokens": 16}}))
    return c


def _quickstart_data(config) -> None:
    d = config.data
    directory = os.path.join(config.output_dir, "data")
    paths = {name: os.path.join(directory, name + ".jsonl") for name in ("sft_mix", "preferences", "prompts", "eval")}
    if jax.process_index() == 0 and not os.path.exists(paths["eval"]):
        os.makedirs(directory, exist_ok=True)
        synthetic.write_arithmetic_jsonl(paths["sft_mix"], 2000, seed=41, show_work=True,
                                         max_operand=d.quickstart_max_operand)
        write_arithmetic_preferences(paths["preferences"], 400, seed=43, max_operand=d.quickstart_max_operand)
        for name, n, seed in (("prompts", d.prompts_per_round * config.rounds, 47),
                              ("eval", d.quickstart_eval_rows, 53)):
            problems = synthetic.generate_problems(n, seed=seed, max_operand=d.quickstart_max_operand)
            with open(paths[name] + ".tmp", "w") as f:
                f.writelines(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in problems)
            os.replace(paths[name] + ".tmp", paths[name])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("pipeline quickstart data")
    d.sft_mix = [{"path": paths["sft_mix"], "epochs": d.quickstart_sft_epochs}]
    d.preferences = [paths["preferences"]]
    d.prompts, d.eval_path = paths["prompts"], paths["eval"]


def validate_overrides(config) -> None:
    """Every stage's overrides name keys its trainer has: a typo fails before round 1, not hours into it."""
    for module, section, extra in ((rm, config.rm, ()), (rejection, config.rejection, ()), (sft, config.sft, ()),
                                   (dpo, config.dpo, tuple(config.dpo.candidates)),
                                   (eval_command, config.eval, ())):
        where = f"{section is config.eval and 'eval' or module.__name__.rsplit('.', 1)[-1]}.overrides"
        merge(module.default_config(), section.overrides, where)
        for i, candidate in enumerate(extra):
            merge(module.default_config(), candidate, f"dpo.candidates[{i}]")


def _check(config) -> None:
    validate_overrides(config)
    d = config.data
    if config.rounds < 1:
        raise ValueError(f"rounds={config.rounds} must be >= 1")
    for key in ("prompts", "eval_path"):
        if not d[key] or not os.path.exists(d[key]):
            raise FileNotFoundError(f"data.{key}={d[key]!r} does not exist")
    if not d.sft_mix or not d.preferences:
        raise ValueError("data.sft_mix and data.preferences must each list at least one file")
    if config.sft.init not in ("base", "best"):
        raise ValueError(f"sft.init={config.sft.init!r}: 'base' (Llama 3) or 'best'")
    if config.pairs.mode not in ("reward", "verifier"):
        raise ValueError(f"pairs.mode={config.pairs.mode!r}: 'reward' or 'verifier'")
    if config.dpo.data not in ("all", "latest"):
        raise ValueError(f"dpo.data={config.dpo.data!r}: 'all' or 'latest'")
    if not config.dpo.candidates:
        raise ValueError("dpo.candidates is empty: give at least one (e.g. [{}])")
    if config.base.checkpoint and not os.path.exists(config.base.checkpoint):
        raise FileNotFoundError(f"base.checkpoint {config.base.checkpoint} does not exist (the quickstart starts from "
                                f"the SFT quickstart: run `posttrain-jax sft` first)")


def _spec(section) -> dict:
    return {k: section[k] for k in ("preset", "hf_path", "checkpoint") if section[k]}


def _round_prompts(config, directory: str, r: int) -> str:
    """Round r's slice of the prompt file (Llama 3 samples new prompts every round), wrapping around."""
    with open(config.data.prompts, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    n = config.data.prompts_per_round
    start = ((r - 1) * n) % len(rows)
    chosen = (rows + rows)[start:start + min(n, len(rows))]
    path = os.path.join(directory, "prompts.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(chosen)
    os.replace(path + ".tmp", path)
    return path


def run_round(config, stages: StageRunner, r: int, best: dict, history: dict) -> dict:
    """One round; `history` holds the files earlier rounds produced. Returns this round's eval result."""
    name = f"round_{r}"
    preferences = list(config.data.preferences) + history["pairs"]
    rm = stages.run(f"{name}/rm", lambda d: run_rm(config, d, preferences))
    reward_model = rm["checkpoint"] if config.rejection.use_reward_model else None
    rs = stages.run(f"{name}/rejection", lambda d: run_rejection(config, d, best, _round_prompts(config, d, r),
                                                                  reward_model))
    samples = history["samples"] + [rs["output"]] if config.sft.accumulate else [rs["output"]]
    sources = [dict(s) for s in config.data.sft_mix] + [{"path": p, "epochs": config.sft.samples_epochs}
                                                         for p in samples]
    init = _spec(config.base) if config.sft.init == "base" else best
    sft_run = stages.run(f"{name}/sft", lambda d: run_sft(config, d, init, sources))
    p = config.pairs
    pairs = stages.run(f"{name}/pairs", lambda d: build_pairs(d, rs["output"], mode=p.mode, verifier=p.verifier,
                                                              min_margin=p.min_margin))
    new_pairs = [pairs["path"]] if pairs["path"] else []
    dpo_data = preferences + new_pairs if config.dpo.data == "all" else (new_pairs or preferences)
    candidates = {"sft": {"checkpoint": sft_run["checkpoint"]}}
    for i, overrides in enumerate(config.dpo.candidates):
        run = stages.run(f"{name}/dpo_{i}", lambda d, o=overrides: run_dpo(config, d, sft_run["checkpoint"],
                                                                             dpo_data, o))
        candidates[f"dpo_{i}"] = {"checkpoint": run["checkpoint"]}
    dpo_runs = [c["checkpoint"] for k, c in candidates.items() if k.startswith("dpo_")]
    if config.average.enabled and len(dpo_runs) > 1:
        avg = stages.run(f"{name}/average", lambda d: run_average(d, dpo_runs))
        candidates["average"] = {"checkpoint": avg["checkpoint"]}
    result = stages.run(f"{name}/eval", lambda d: run_eval(config, d, candidates))
    history["pairs"] += new_pairs
    history["samples"].append(rs["output"])
    result["rejection"] = {k: rs[k] for k in ("prompts", "kept", "mean_best_score")}
    result["pairs"] = pairs["pairs"]
    return result


def hand_on(leader: dict, r: int, result: dict, metric: str, *, keep_best: bool) -> dict:
    """The model the next round starts from: round r's best unless `keep_best` and `leader` (the model handed on
    so far: round, candidate, model spec, metric value) scored higher. Ties go to round r's model."""
    value = result["metrics"][result["best"]][metric]
    if keep_best and value < leader["value"]:
        return leader
    return {"round": r, "candidate": result["best"], "model": result["best_model"], "value": value}


def table(rounds: dict[int, dict], metric: str) -> str:
    """| round | candidate | metric | accuracy ... | best | for every evaluated candidate.

    `best`: `*` marks the round's best candidate, `next` the model the next round starts from (a row
    `kept: round k <name>` when an earlier round's model is handed on, see `eval.keep_best`).
    """
    columns = [metric] + [k for k in ("accuracy", "pass@1", "maj@4", "pass@4", "greedy_reward", "greedy_length")
                          if k != metric]
    lines = ["| round | candidate | " + " | ".join(columns) + " | best |", "|---|---|" + "---|" * (len(columns) + 1)]
    for r, result in sorted(rounds.items()):
        nxt = result.get("next", {"round": r, "candidate": result["best"]})
        for name, m in result["metrics"].items():
            values = " | ".join(f"{m[c]:.4g}" if c in m else "" for c in columns)
            mark = ("* " if name == result["best"] else "") + ("next" if nxt == {"round": r, "candidate": name} else "")
            lines.append(f"| {r} | {name} | {values} | {mark.strip()} |")
        if nxt["round"] != r:
            m = rounds[nxt["round"]]["metrics"][nxt["candidate"]]
            values = " | ".join(f"{m[c]:.4g}" if c in m else "" for c in columns)
            lines.append(f"| {r} | kept: round {nxt['round']} {nxt['candidate']} | {values} | next |")
    return "\n".join(lines)


def plot(rounds: dict[int, dict], metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, values, best_x, best_y, kept = [], [], [], [], []
    for r, result in sorted(rounds.items()):
        first = len(values)
        for name, m in result["metrics"].items():
            labels.append(f"r{r} {name}")
            values.append(m[metric])
            if name == result["best"]:
                best_x.append(len(values) - 1)
                best_y.append(m[metric])
        nxt = result.get("next", {"round": r, "candidate": result["best"]})
        if nxt["round"] != r:  # an earlier round's model is handed on: a dashed line at its value
            kept.append(((first - 0.3, len(values) - 0.7), rounds[nxt["round"]]["metrics"][nxt["candidate"]][metric]))
    ax.plot(range(len(values)), values, "o", color="tab:blue", label="candidate")
    ax.plot(best_x, best_y, "-*", color="tab:red", markersize=12, label="best of round")
    for i, (xs, y) in enumerate(kept):
        ax.plot(xs, (y, y), "--", color="tab:gray", label="earlier best handed on" if i == 0 else None)
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title("iterative post-training: metric per round and stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _report(config, rounds: dict[int, dict]) -> str:
    text = table(rounds, config.eval.metric)
    if jax.process_index() == 0:
        out = config.output_dir
        _atomic_json(os.path.join(out, "pipeline.json"), {str(r): v for r, v in rounds.items()})
        with open(os.path.join(out, "pipeline.md"), "w") as f:
            f.write(text + "\n")
        plot(rounds, config.eval.metric, os.path.join(out, "pipeline.png"))
    return text


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Run (or continue: finished stages are read back, never re-run) every round; returns the results.

    `resume` is accepted for the CLI's sake: the pipeline always continues from its stage markers.
    """
    if config.data.quickstart_task:
        _quickstart_data(config)
    _check(config)
    os.makedirs(config.output_dir, exist_ok=True)
    stages = StageRunner(config.output_dir)
    best = _spec(config.policy) or _spec(config.base)
    rounds = {0: stages.run("round_0/eval", lambda d: run_eval(config, d, {"initial": best}))}
    history = {"pairs": [], "samples": []}
    metric = config.eval.metric
    leader = {"round": 0, "candidate": "initial", "model": best, "value": rounds[0]["metrics"]["initial"][metric]}
    rounds[0]["next"] = {"round": 0, "candidate": "initial"}
    for r in range(1, config.rounds + 1):
        result = rounds[r] = run_round(config, stages, r, best, history)
        value = result["metrics"][result["best"]][metric]
        # A stage of its own, so a resumed run (even with eval.keep_best changed) keeps the decision it made.
        leader = stages.run(f"round_{r}/hand_on", lambda d, prev=leader, res=result: hand_on(
            prev, r, res, metric, keep_best=config.eval.keep_best))
        result["next"] = {"round": leader["round"], "candidate": leader["candidate"]}
        best = leader["model"]
        text = _report(config, rounds)
        if jax.process_index() == 0:
            print(f"\nafter round {r} (best: {result['best']}, {metric} {value:.4g}; the next round starts from "
                  f"round {leader['round']} {leader['candidate']}, {metric} {leader['value']:.4g}):\n{text}")
    if jax.process_index() == 0:
        print(f"\nresults: {config.output_dir}/pipeline.json, pipeline.md, pipeline.png")
    return {"rounds": rounds, "best_model": best, "stages_ran": stages.ran}
