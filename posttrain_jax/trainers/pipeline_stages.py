"""The stages of `posttrain-jax pipeline`, each a normal run of a trainer under its own directory.

A stage is `fn(directory) -> result` (a JSON-able dict); `StageRunner.run` skips a
stage whose `stage_done.json` exists (its result is read back) and otherwise runs
it with the trainer's own resume (from its latest checkpoint, progress file or
records), then writes the marker atomically. The trainers' configs are their
`default_config()` with the pipeline's keys set and the config's per-stage
`overrides` merged in; each stage writes the config it ran to `config.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time

import jax
import ml_collections
from flax import nnx

from posttrain_jax.checkpointing import average_checkpoints
from posttrain_jax.eval import command as eval_command
from posttrain_jax.eval.from_config import make_evaluator
from posttrain_jax.mesh import local_mesh, mesh_and_rules
from posttrain_jax.models.from_config import build_model
from posttrain_jax.rewards import build_rewards
from posttrain_jax.tokenizer import load_tokenizer
from posttrain_jax.trainers import dpo, rejection, rm, sft

log = logging.getLogger(__name__)
MARKER = "stage_done.json"
# Fault injection for the kill/resume test: SIGKILL right after this stage's marker is written.
_KILL_AFTER_STAGE = os.environ.get("POSTTRAIN_JAX_TEST_PIPELINE_KILL_AFTER", "")


def _atomic_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


class StageRunner:
    """Runs named stages under `root`; a finished stage is never run again."""

    def __init__(self, root: str):
        self.root = root
        self.ran: list[str] = []  # stages this process ran (not read back)

    def done(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.root, name, MARKER))

    def run(self, name: str, fn) -> dict:
        directory = os.path.join(self.root, name)
        marker = os.path.join(directory, MARKER)
        if os.path.exists(marker):
            with open(marker) as f:
                return json.load(f)["result"]
        resumed = os.path.isdir(directory) and bool(os.listdir(directory))
        os.makedirs(directory, exist_ok=True)
        log.info("stage %s: %s", name, "resuming" if resumed else "starting")
        if jax.process_index() == 0:
            print(f"\n=== {name} ({'resuming' if resumed else 'starting'}) ===", flush=True)
        started = time.time()
        result = fn(directory)
        if jax.process_index() == 0:
            _atomic_json(marker, {"stage": name, "result": result, "wall_time_s": time.time() - started,
                                  "resumed": resumed})
        self.ran.append(name)
        if _KILL_AFTER_STAGE == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return result


def merge(config: ml_collections.ConfigDict, overrides, where: str) -> None:
    """Set nested `overrides` ({"train": {"steps": 20}}) on a trainer config; unknown keys fail by name."""
    if hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(f"{where}.{key}: not a key of the trainer config; valid keys: {sorted(config.keys())}")
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            merge(config[key], value, f"{where}.{key}")
        else:
            with config.unlocked():
                config[key] = value


def model_section(template: ml_collections.ConfigDict, spec: dict) -> ml_collections.ConfigDict:
    """A trainer's `model` section pointing at `spec` (a checkpoint, HF directory or preset)."""
    out = ml_collections.ConfigDict(template.to_dict())
    out.preset, out.hf_path, out.checkpoint = "", "", ""
    for key, value in spec.items():
        out[key] = value
    return out


def trainer_config(module, config, directory: str, model: dict, overrides, where: str):
    """`module.default_config()` with the pipeline's shared keys, `model` and `overrides`."""
    c = module.default_config()
    c.output_dir = directory
    c.seed = config.seed
    c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    c.sharding_rules = list(config.sharding_rules)
    c.tokenizer = config.tokenizer
    c.chat_template = config.chat_template
    c.model = model_section(c.model, model)
    for key in ("quickstart_task",):
        if key in c.data:
            c.data[key] = False
    merge(c, overrides, where)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(c.to_json(indent=2))
    return c


def run_rm(config, directory: str, preferences: list[str]) -> dict:
    c = trainer_config(rm, config, directory, config.base.to_dict(), config.rm.overrides, "rm.overrides")
    c.data.sources = [{"path": p} for p in preferences]
    c.data.eval_path = ""
    rm.main(c, resume=True)
    return {"checkpoint": os.path.join(directory, "checkpoints"), "preference_files": preferences}


def run_rejection(config, directory: str, policy: dict, prompts: str, reward_model: str | None) -> dict:
    c = trainer_config(rejection, config, directory, policy, config.rejection.overrides, "rejection.overrides")
    rewards = [dict(r) for r in config.rejection.rewards]
    if reward_model:
        rewards.append({"name": "reward_model", "checkpoint": reward_model, "tokenizer": config.tokenizer,
                        "template": config.chat_template, **dict(config.rejection.reward_model_options)})
    c.rewards = rewards
    c.data.path = prompts
    c.rejection.output = os.path.join(directory, "rejection_sampled.jsonl")
    summary = rejection.main(c, resume=True)
    keep = ("prompts", "kept", "mean_score", "mean_best_score", "accuracy")
    return {"output": c.rejection.output, **{k: summary[k] for k in keep}}


def run_sft(config, directory: str, init: dict, sources: list[dict]) -> dict:
    c = trainer_config(sft, config, directory, init, config.sft.overrides, "sft.overrides")
    c.data.sources = sources
    c.data.eval_path = ""
    sft.main(c, resume=True)
    return {"checkpoint": os.path.join(directory, "checkpoints")}


def build_pairs(directory: str, samples: str, *, mode: str, verifier: str, min_margin: float) -> dict:
    """On-policy preference pairs from rejection sampling's output (kept best vs lowest-scoring candidate).

    mode "reward": chosen scored at least `min_margin` above rejected (Llama 3: by the reward model);
    mode "verifier": chosen passes `verifier` and rejected fails it (Qwen 2.5: execution feedback / answer
    matching).
    """
    pairs, seen = [], 0
    with open(samples, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            seen += 1
            worst = row.get("rejected")
            if worst is None:
                continue
            if mode == "reward":
                ok = row["score"] - worst["score"] >= min_margin and row["score"] > worst["score"]
            else:
                if verifier not in row.get("correct", {}):
                    raise ValueError(f"{samples}: rows have no verdict of {verifier!r} (correct: "
                                     f"{sorted(row.get('correct', {}))}); set pairs.verifier to a verifiable reward")
                ok = row["correct"][verifier] and not worst["correct"][verifier]
            if ok:
                messages = row["messages"]
                pairs.append({"prompt": messages[:-1], "chosen": messages[-1]["content"], "rejected": worst["content"],
                              "score_chosen": row["score"], "score_rejected": worst["score"], "source": row["source"]})
    path = os.path.join(directory, "pairs.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    os.replace(path + ".tmp", path)
    return {"path": path if pairs else "", "pairs": len(pairs), "prompts": seen}


def run_dpo(config, directory: str, init: str, preferences: list[str], overrides) -> dict:
    c = trainer_config(dpo, config, directory, {"checkpoint": init}, config.dpo.overrides, "dpo.overrides")
    merge(c, overrides, "dpo.candidates[]")
    c.data.sources = [{"path": p} for p in preferences]
    c.data.eval_path = c.data.sft_eval_path = ""
    dpo.main(c, resume=True)
    return {"checkpoint": os.path.join(directory, "checkpoints")}


def run_average(directory: str, checkpoints: list[str]) -> dict:
    out = os.path.join(directory, "checkpoints")
    shutil.rmtree(out, ignore_errors=True)  # an average killed half-way is simply redone
    average_checkpoints(checkpoints, out)
    return {"checkpoint": out, "averaged_from": checkpoints}


def run_eval(config, directory: str, candidates: dict[str, dict]) -> dict:
    """Held-out metrics of every candidate with one sampler (same architecture), records per candidate."""
    c = eval_command.default_config()
    c.output_dir = directory
    c.seed, c.tokenizer, c.chat_template = config.seed, config.tokenizer, config.chat_template
    c.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    c.sharding_rules = list(config.sharding_rules)
    c.data.quickstart_task = False
    c.data.path = config.data.eval_path
    c.rewards = [dict(r) for r in config.eval.rewards]
    merge(c, config.eval.overrides, "eval.overrides")
    mesh, rules = mesh_and_rules(c)
    tokenizer = load_tokenizer(c.tokenizer)
    rewards = build_rewards([dict(r) for r in c.rewards], mesh=local_mesh())
    evaluator, results = None, {}
    for name, spec in candidates.items():
        model = build_model(model_section(c.model, spec), mesh, rules, seed=c.seed, vocab_size=tokenizer.vocab_size)
        graphdef, params = nnx.split(model, nnx.Param)
        if evaluator is None:
            evaluator = make_evaluator(c, c.data.path, graphdef, model.config, mesh=mesh, rules=rules,
                                                    tokenizer=tokenizer, rewards=rewards)
        del model
        results[name] = evaluator(params, records=os.path.join(directory, name, "records.jsonl"), resume=True,
                                  desc=f"eval {name}", fingerprint={"model": spec})
    metric = config.eval.metric
    missing = [n for n, m in results.items() if metric not in m]
    if missing:
        raise ValueError(f"eval.metric={metric!r} is not among the metrics {sorted(results[missing[0]])}")
    best = max(results, key=lambda n: (results[n][metric], list(results).index(n)))  # ties: the later candidate
    if jax.process_index() == 0:
        _atomic_json(os.path.join(directory, "results.json"), results)
        with open(os.path.join(directory, "results.md"), "w") as f:
            f.write(eval_command.markdown_table(results) + "\n")
    return {"metrics": results, "best": best, "best_model": candidates[best], "metric": metric}
