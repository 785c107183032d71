"""`posttrain-jax eval`: held-out metrics of a model (and optionally a second one) on one prompt set.

    posttrain-jax eval --config.model.checkpoint=runs/sft/checkpoints --config.data.path=heldout.jsonl \\
        --config.rewards="[{'name': 'math'}]" --config.eval.num_samples=16 --config.eval.ks=[1,4,16]

Prompts: JSONL rows `{"prompt": str | messages, <ground truth, e.g. "answer">}`
or SFT rows `{"messages": [..., {"role": "assistant", ...}]}` (the last reply is
the reference, under "reference"), as GRPO and rejection sampling read them.
Rewards: the same specs (`math`, `exact_match`, `format`, `reward_model`).

With `model_b` set (a preset, HF directory or checkpoint), B is evaluated on
the same prompts and the reward named by `eval.win_rate_reward` (default: the
first reward model) gives A's win rate over B on the greedy responses.

Writes `<output_dir>/results.json` (every metric, per model, and the win
rate), `results.md` (a markdown table) and per-model records (one JSON per
prompt). `--resume` continues a killed evaluation from its records.
The quickstart (no config) evaluates the SFT quickstart model on 200 new
arithmetic problems.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
from flax import nnx
from jax.experimental import multihost_utils

from posttrain_jax.data import synthetic
from posttrain_jax.eval.evaluator import read_records, scores_by_index
from posttrain_jax.eval.from_config import eval_section, make_evaluator
from posttrain_jax.eval.metrics import win_rate
from posttrain_jax.eval.progress import global_sum
from posttrain_jax.mesh import local_mesh, mesh_and_rules
from posttrain_jax.models.from_config import build_model, model_config
from posttrain_jax.rewards import build_rewards
from posttrain_jax.tokenizer import load_tokenizer
# `eval` is a command (a main(config) beside the trainers, not a library layer; the trainers build their
# evaluators from `eval.from_config`): it shares the trainers' config sections and quickstart paths.
from posttrain_jax.trainers.common import base_config
from posttrain_jax.trainers.preference import QUICKSTART_SFT_DIR

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The quickstart: the SFT quickstart model on 200 new arithmetic problems, greedy + 8 samples."""
    c = base_config("runs/eval-quickstart")
    c.model.checkpoint = os.path.join(QUICKSTART_SFT_DIR, "checkpoints")  # run `posttrain-jax sft` first
    c.model_b = model_config()
    c.model_b.preset = ""  # nothing: no comparison; else a preset / hf_path / checkpoint like `model`
    c.tokenizer = os.path.join(QUICKSTART_SFT_DIR, "data", "tokenizer.model")
    c.data = ml_collections.ConfigDict(dict(
        quickstart_task=True, quickstart_num_prompts=200, quickstart_max_operand=19,
        path="", max_prompt_length=64, length_policy="drop", on_bad_row="error"))
    c.rewards = [{"name": "math", "extract": "last_number", "correct": 1.0, "incorrect": 0.0}]
    c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                                                stop_tokens=[]))
    c.eval = eval_section()
    return c


def _quickstart_data(config) -> None:
    d = config.data
    d.path = os.path.join(config.output_dir, "data", "prompts.jsonl")
    if jax.process_index() == 0 and not os.path.exists(d.path):
        os.makedirs(os.path.dirname(d.path), exist_ok=True)
        # A seed of its own: none of these problems is another quickstart's.
        problems = synthetic.generate_problems(d.quickstart_num_prompts, seed=13, max_operand=d.quickstart_max_operand)
        with open(d.path + ".tmp", "w") as f:
            f.writelines(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n" for p in problems)
        os.replace(d.path + ".tmp", d.path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("eval quickstart data")


def _has_model(m) -> bool:
    return bool(m.preset or m.hf_path or m.checkpoint)


def markdown_table(columns: dict[str, dict], extra: dict[str, float] | None = None) -> str:
    """| metric | A | B | ... for every metric any column has (floats as 4 significant digits)."""
    names = list(columns)
    keys = list(dict.fromkeys(k for metrics in columns.values() for k in metrics))
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {k} | " + " | ".join(fmt(columns[n].get(k)) for n in names) + " |" for k in keys]
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {fmt(v)} |" + " |" * (len(names) - 1))
    return "\n".join(lines)


def evaluate_model(config, model_section, name: str, *, mesh, rules, tokenizer, rewards, resume: bool) -> dict:
    """Load one model, evaluate it with records under <output>/<name>/, free it; returns its metrics."""
    model = build_model(model_section, mesh, rules, seed=config.seed, vocab_size=tokenizer.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    evaluator = make_evaluator(config, config.data.path, graphdef, model.config, mesh=mesh, rules=rules,
                               tokenizer=tokenizer, rewards=rewards)
    del model
    records = os.path.join(_output(config), name, "records.jsonl")
    metrics = evaluator(params, records=records, resume=resume, desc=f"eval {name}",
                        fingerprint={"model": model_section.to_dict(), "data": os.path.abspath(config.data.path)})
    metrics["compilations"] = evaluator.compilations()
    return metrics


def _output(config) -> str:
    return config.eval.output or config.output_dir


def _win_rate_reward(config, rewards) -> str:
    name = config.eval.win_rate_reward
    if name:
        if name not in rewards.names:
            raise ValueError(f"eval.win_rate_reward={name!r} is not a configured reward; rewards: {rewards.names}")
        return name
    models = [dict(r).get("label", dict(r)["name"]) for r in config.rewards if dict(r)["name"] == "reward_model"]
    if not models:
        raise ValueError("a win rate of model A over model_b needs a reward to compare by: add a reward_model to "
                         "rewards or name one with eval.win_rate_reward")
    return models[0]


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    """Evaluate `model` (and `model_b`); write results.json / results.md; returns the results."""
    if config.data.quickstart_task:
        _quickstart_data(config)
    if not config.data.path or not os.path.exists(config.data.path):
        raise FileNotFoundError(f"data.path {config.data.path!r} does not exist: give a JSONL file of prompts")
    if not config.tokenizer:
        raise ValueError("config.tokenizer is empty: set it to a SentencePiece .model or a tokenizer.json")
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    rewards = build_rewards([dict(r) for r in config.rewards], mesh=local_mesh())
    compare = _has_model(config.model_b)
    reward_name = _win_rate_reward(config, rewards) if compare else None  # fail before any sampling
    results = {"model": evaluate_model(config, config.model, "model", mesh=mesh, rules=rules, tokenizer=tokenizer,
                                       rewards=rewards, resume=resume)}
    columns = {"model": results["model"]}
    extra = {}
    if compare:
        results["model_b"] = evaluate_model(config, config.model_b, "model_b", mesh=mesh, rules=rules,
                                            tokenizer=tokenizer, rewards=rewards, resume=resume)
        columns["model_b"] = results["model_b"]
        out = _output(config)
        a = scores_by_index(read_records(os.path.join(out, "model", "records.jsonl")), reward_name)
        b = scores_by_index(read_records(os.path.join(out, "model_b", "records.jsonl")), reward_name)
        local = win_rate([a[i] for i in sorted(a)], [b[i] for i in sorted(a)])
        counts = global_sum([local[k] * len(a) for k in ("wins", "ties", "losses")] + [len(a)])
        total = max(counts[3], 1.0)
        results["win_rate"] = {"reward": reward_name, "win_rate": (counts[0] + 0.5 * counts[1]) / total,
                               "wins": counts[0] / total, "ties": counts[1] / total, "losses": counts[2] / total}
        extra = {f"win rate of model over model_b ({reward_name})": results["win_rate"]["win_rate"]}
    results["config"] = json.loads(config.to_json())
    table = markdown_table(columns, extra)
    if jax.process_index() == 0:
        out = _output(config)
        os.makedirs(out, exist_ok=True)
        for name, text in (("results.json", json.dumps(results, indent=2)), ("results.md", table + "\n")):
            with open(os.path.join(out, name + ".tmp"), "w") as f:
                f.write(text)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        print(table)
        print(f"results: {os.path.join(out, 'results.json')} and results.md")
    return results
