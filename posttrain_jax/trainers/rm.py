"""`posttrain-jax rm`: a Bradley-Terry reward model on a scalar head; `posttrain-jax score`.

The reward of a response is the head's score at the last token of its
rendered conversation: the last non-pad token, where transformers'
``*ForSequenceClassification`` (and so TRL and vLLM) read it (``<|eot_id|>``
with Llama 3, the ``\n`` after ``<|im_end|>`` with chatml / Qwen, after
``<end_of_turn>`` with Gemma). Training, `score` and the reward-model reward
read it at the same place, so a reward model trained here scores like it in
transformers, and one imported from the Hub scores here like it does there.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from posttrain_jax.losses.dpo import batch_sequence_ids
from posttrain_jax.losses.rm import bradley_terry_loss, reward_metric_means, sequence_rewards
from posttrain_jax.mesh import mesh_and_rules
from posttrain_jax.models.from_config import build_model
from posttrain_jax.sharding import data_shards
from posttrain_jax.tokenizer import load_tokenizer, render_chat
from posttrain_jax.train import optimizer_config
from posttrain_jax.train.loop import print_paths
from posttrain_jax.trainers import preference, runner
from posttrain_jax.trainers.common import base_config

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """The RM quickstart: synthetic right-vs-wrong arithmetic preferences on CPU in a minute or two."""
    c = base_config("runs/rm-quickstart")
    c.data = preference.data_config()
    c.train = runner.loop_config(global_pairs=16, use_margin=False, center_coef=0.0, log_every=10)
    c.optim = optimizer_config(learning_rate=1e-3)
    return c


def make_rm_objective(*, pairs_per_row: int, use_margin: bool, center_coef: float):
    def pair_terms(model, mb):
        scores = model(mb["tokens"], mb["positions"], mb["segment_ids"])
        ids, num_pairs = batch_sequence_ids(mb["segment_ids"], pairs_per_row)
        chosen, rejected, _ = sequence_rewards(scores, ids, num_pairs)
        margin = mb["margin"].reshape(-1) if use_margin else None
        return bradley_terry_loss(chosen, rejected, pair_mask=mb["pair_mask"].reshape(-1), margin=margin,
                                  center_coef=center_coef)

    def objective(model, mb, context=None):
        return pair_terms(model, mb)

    return objective, pair_terms


def pair_denominator(batch):
    """Real pairs in the global batch: the one divisor."""
    return jnp.maximum(jnp.sum(batch["pair_mask"]).astype(jnp.float32), 1.0)


def main(config: ml_collections.ConfigDict, *, resume: bool = False) -> dict:
    if config.data.quickstart_task:
        preference.quickstart_data(config)
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config.tokenizer)
    train_iter, stats, eval_iter = preference.pipelines(
        config, tokenizer, rows_multiple=data_shards(mesh) * config.train.accum_steps, reward_inputs=True)
    model = build_model(config.model, mesh, rules, seed=config.seed, head="scalar", vocab_size=tokenizer.vocab_size,
                        lora=config.lora)
    t = config.train
    objective, pair_terms = make_rm_objective(pairs_per_row=train_iter.pairs_per_row, use_margin=t.use_margin,
                                              center_coef=t.center_coef)
    graphdef = nnx.graphdef(model)
    evaluate = None
    if eval_iter is not None:
        _, eval_terms = make_rm_objective(pairs_per_row=eval_iter.pairs_per_row, use_margin=t.use_margin,
                                          center_coef=t.center_coef)
        evaluate = preference.make_pair_evaluator(
            lambda p, b: eval_terms(nnx.merge(graphdef, p), b)[1], mesh, rules, eval_iter,
            lambda s: {"loss": s["bt_loss"] / jnp.maximum(s["num_pairs"], 1.0), **reward_metric_means(s)})
    summary = runner.run(config, mesh=mesh, rules=rules, model=model, train_iter=train_iter, resume=resume,
                         total_steps=runner.total_steps_of(config, train_iter), seq_len=config.data.seq_len,
                         objective=objective, denominator=pair_denominator, evaluate=evaluate,
                         derived=lambda m: {k: float(v) for k, v in reward_metric_means(m).items()})
    summary["data"] = stats.to_dict()
    if jax.process_index() == 0:
        print("\n" + stats.report())
        if evaluate is not None:
            b, a = summary["eval_before"], summary["eval_after"]
            print(f"held-out preference accuracy: {b['accuracy']:.1%} before -> {a['accuracy']:.1%} after; "
                  f"margin {b['margin']:.3f} -> {a['margin']:.3f}")
    print_paths(summary)
    return summary


def score(model, tokenizer, rows, *, template: str = "auto", batch_size: int = 8) -> list[float]:
    """Rewards of `rows` ({"prompt": str or messages, "response": str}) under a scalar-head model.

    The score is read at the rendered conversation's last token (see the
    module docstring), as training reads it. Returns one float per row.
    """
    if model.config.head != "scalar":
        raise ValueError("score needs a reward model (scalar head); this checkpoint has an LM head")
    encoded = []
    for i, row in enumerate(rows):
        if "prompt" not in row or "response" not in row:
            raise ValueError(f"row {i + 1}: needs 'prompt' and 'response', has {sorted(row)}")
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        enc = render_chat(tokenizer, messages + [{"role": "assistant", "content": row["response"]}],
                          template=template)
        encoded.append(enc.ids)
    forward = jax.jit(lambda m, t, s: m(t, None, s))
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(x) for x in chunk)
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros_like(tokens)
        for r, ids in enumerate(chunk):
            tokens[r, :len(ids)], segments[r, :len(ids)] = ids, 1
        out = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(segments)))
        scores += [float(out[r, len(ids) - 1]) for r, ids in enumerate(chunk)]
    return scores


def score_main(checkpoint: str, tokenizer_path: str, input_path: str, output_path: str, template: str) -> None:
    from posttrain_jax.models.from_config import load_checkpoint_model
    model = load_checkpoint_model(checkpoint)
    rows = []
    with open(input_path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{input_path}:{line_no}: not valid JSON ({e.msg})") from None
    rewards = score(model, load_tokenizer(tokenizer_path), rows, template=template)
    with open(output_path, "w") as f:
        for row, reward in zip(rows, rewards):
            f.write(json.dumps({**row, "reward": reward}) + "\n")
