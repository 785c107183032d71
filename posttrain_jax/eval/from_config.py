"""Evaluators from config sections: what the trainers and `posttrain-jax eval` build from
`eval` + `sampling` (`make_evaluator`) or a trainer's `generation_eval` section
(`make_generation_evaluator`), on top of `eval.evaluator.Evaluator` and the jitted sampler.
"""

from __future__ import annotations

import logging

import ml_collections

from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.eval.evaluator import EvalSettings, Evaluator
from posttrain_jax.mesh import local_mesh
from posttrain_jax.rewards import build_rewards
from posttrain_jax.sampling import Sampler
from posttrain_jax.sampling.text import stop_tokens_for

log = logging.getLogger(__name__)


def eval_section(**overrides) -> ml_collections.ConfigDict:
    """The `eval` section (shared by the trainers that evaluate by sampling)."""
    base = dict(num_samples=8, ks=[1, 4, 8], greedy=True, prompts_per_batch=64, answer_extract="auto",
                keep_texts=False, win_rate_reward="", output="")
    return ml_collections.ConfigDict({**base, **overrides})


def settings_from_config(config, max_prompt_length: int) -> EvalSettings:
    e, s = config.eval, config.sampling
    return EvalSettings(num_samples=e.num_samples, ks=tuple(e.ks), greedy=e.greedy, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                        prompts_per_batch=e.prompts_per_batch, max_prompt_length=max_prompt_length,
                        answer_extract=e.answer_extract, keep_texts=e.keep_texts, seed=config.seed)


def make_evaluator(config, path: str, graphdef, model_config_, *, mesh, rules, tokenizer, rewards,
                   prompt_options=None) -> Evaluator:
    """An `Evaluator` on the prompts of `path` for a model of this structure, from the config's `sampling`
    and `eval` sections; prompt_options (default: the `data` section) gives max_prompt_length,
    length_policy and on_bad_row (used by `eval`, `distill` and `pipeline`)."""
    d = prompt_options if prompt_options is not None else config.data
    prompts, stats = load_prompts(path, tokenizer, template=config.chat_template,
                                  max_prompt_length=d.max_prompt_length, length_policy=d.length_policy,
                                  on_bad_row=d.on_bad_row)
    log.info(stats.report(path))
    pad = model_config_.pad_token_id if model_config_.pad_token_id is not None else 0
    sampler = Sampler(graphdef, model_config_, mesh=mesh, rules=rules)
    return Evaluator(prompts, sampler=sampler, tokenizer=tokenizer, rewards=rewards,
                     settings=settings_from_config(config, d.max_prompt_length), pad_token=pad,
                     stop_tokens=stop_tokens_for(tokenizer, config.chat_template, config.sampling.stop_tokens))


def generation_eval_section(**overrides) -> ml_collections.ConfigDict:
    """The `generation_eval` section of a trainer: held-out evaluation by sampling before/after training
    (off while `path` is empty). Prompt rows as for `posttrain-jax eval`; SFT rows' reply is "reference"."""
    base = dict(path="", rewards=[{"name": "math", "extract": "last_number", "answer_key": "reference",
                                   "correct": 1.0, "incorrect": 0.0}],
                max_prompt_length=64, length_policy="drop", on_bad_row="error", max_new_tokens=32,
                temperature=1.0, top_k=0, top_p=1.0, stop_tokens=[], greedy=True, num_samples=0, ks=[],
                prompts_per_batch=64, answer_extract="auto")
    return ml_collections.ConfigDict({**base, **overrides})


def make_generation_evaluator(section, *, chat_template: str, seed: int, graphdef, model_config_, mesh, rules,
                              tokenizer):
    """evaluate(params) -> {"generation/<metric>": ...} from a `generation_eval` section, or None if it is off."""
    if not section.path:
        return None
    c = ml_collections.ConfigDict(dict(
        chat_template=chat_template, seed=seed,
        sampling=dict(max_new_tokens=section.max_new_tokens, temperature=section.temperature, top_k=section.top_k,
                      top_p=section.top_p, stop_tokens=list(section.stop_tokens)),
        eval=dict(num_samples=section.num_samples, ks=list(section.ks), greedy=section.greedy,
                  prompts_per_batch=section.prompts_per_batch, answer_extract=section.answer_extract,
                  keep_texts=False)))
    rewards = build_rewards([dict(r) for r in section.rewards], mesh=local_mesh())
    evaluator = make_evaluator(c, section.path, graphdef, model_config_, mesh=mesh, rules=rules, tokenizer=tokenizer,
                               rewards=rewards, prompt_options=section)
    return lambda params: {f"generation/{k}": v for k, v in evaluator(params, desc="generation eval").items()}


def combine_evaluators(*fns):
    """One evaluate(params) returning the union of the metrics of every non-None function (None if all are)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    return lambda params: {k: v for f in fns for k, v in f(params).items()}
