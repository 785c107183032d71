"""The PPO critic: a scalar-head model on the policy's mesh with its own optimizer and train step.

With an enabled `lora` section the critic is a LoRA model too (TRL's PPO with PEFT does the same):
its own frozen base (the critic's initial weights, quantized for QLoRA) with fresh adapters, and
only the adapters and the scalar head in its optimizer state and checkpoints.
"""

from __future__ import annotations

import logging

import ml_collections

from posttrain_jax.models.from_config import build_model
from posttrain_jax.rl.objectives import critic_denominator, make_critic_objective
from posttrain_jax.train import init_train_state, jit_train_step, make_optimizer, make_train_step, trainable_split

log = logging.getLogger(__name__)


def critic_model_section(model_section: ml_collections.ConfigDict,
                         critic: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `model` section the critic is built from: a reward-model / LM run checkpoint, an HF directory
    (`*ForSequenceClassification` keeps its `score` head; a causal LM gets a fresh one), or the policy's."""
    section = ml_collections.ConfigDict(model_section.to_dict())
    if critic.checkpoint and critic.hf_path:
        raise ValueError("critic.checkpoint and critic.hf_path are both set; give one (or neither: the policy)")
    if critic.checkpoint:
        section.checkpoint, section.hf_path = critic.checkpoint, ""
    elif critic.hf_path:
        section.hf_path, section.checkpoint = critic.hf_path, ""
    return section


def build_critic(config, mesh, rules, *, total_updates: int, data_shards: int, batch_shardings: dict):
    """(graphdef, train state, jitted step(state, batch) -> (state, metrics), params -> whole critic state).

    The last maps the train state's params to what `nnx.merge(graphdef, ...)` needs: themselves for a
    full critic, adapters + head joined with the frozen base (no copy) for a LoRA one.
    """
    c = config.critic
    model = build_model(critic_model_section(config.model, c), mesh, rules, seed=config.seed + 1, head="scalar",
                        lora=_fresh_adapters(config.get("lora")))
    source = c.checkpoint or c.hf_path or "the policy's weights"
    log.info("critic: %s, a scalar head on the policy's mesh", source)
    tx, schedule = make_optimizer(learning_rate=c.learning_rate, total_steps=total_updates, schedule=c.schedule,
                                  warmup_ratio=c.warmup_ratio, min_lr_ratio=c.min_lr_ratio,
                                  weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm, b1=c.b1, b2=c.b2,
                                  eps=c.eps)
    trainable, base, full = trainable_split(model)
    graphdef, state = init_train_state(model, tx, seed=config.seed + 1, mesh=mesh, trainable=trainable)
    step = make_train_step(graphdef, tx, make_critic_objective(value_clip=c.value_clip or None, vf_coef=c.vf_coef),
                           critic_denominator, accum_steps=config.train.accum_steps, data_shards=data_shards,
                           schedule=schedule, dropout=False)  # as the policy (rl/loop.py)
    return graphdef, state, jit_train_step(step, state, batch_shardings, base=base), full


def _fresh_adapters(section):
    """The policy's `lora` section for the critic, without `lora.adapter`: a PEFT adapter given to continue
    the policy's training is the policy's, never loaded into the value model (whose adapters start fresh)."""
    if section is None or not section.get("adapter"):
        return section
    section = ml_collections.ConfigDict(section.to_dict())
    section.adapter = ""
    return section
