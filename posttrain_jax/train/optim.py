"""Optax AdamW with the schedules post-training recipes use."""

from __future__ import annotations

import jax
import ml_collections
import optax


def make_schedule(*, learning_rate: float, total_steps: int, schedule: str = "linear", warmup_ratio: float = 0.0,
                  warmup_steps: int | None = None, min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0, then `linear` decay to min_lr_ratio*lr, `cosine`, or `constant`.

    `linear` is transformers' `get_linear_schedule_with_warmup` (Tülu 3, open-instruct).
    """
    if warmup_steps is None:
        warmup_steps = int(round(warmup_ratio * total_steps))
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    end = learning_rate * min_lr_ratio
    if schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=min_lr_ratio)
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose linear, cosine or constant")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def _decay_mask(params):
    # Decay matrices (kernels, embeddings); not norms' scales or biases, as in transformers' Trainer.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, learning_rate: float, total_steps: int, schedule: str = "linear", warmup_ratio: float = 0.0,
                   warmup_steps: int | None = None, min_lr_ratio: float = 0.0, weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping when max_grad_norm > 0) and its schedule.

    Tülu 3's SFT sum loss ran with clipping at 1.0: with a sum loss the raw
    gradient grows with the tokens in the batch, and clipping bounds the step.
    """
    lr = make_schedule(learning_rate=learning_rate, total_steps=total_steps, schedule=schedule,
                       warmup_ratio=warmup_ratio, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*parts), lr


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    """The `optim` section (AdamW + schedule; `optimizer_from_config` reads it), with `overrides` applied."""
    base = dict(learning_rate=3e-3, schedule="linear", warmup_ratio=0.05, min_lr_ratio=0.0, weight_decay=0.0,
                max_grad_norm=1.0, b1=0.9, b2=0.98, eps=1e-8)
    return ml_collections.ConfigDict({**base, **overrides})


def optimizer_from_config(o: ml_collections.ConfigDict, total_steps: int):
    """(optax transformation, lr schedule) from an `optim` section."""
    return make_optimizer(learning_rate=o.learning_rate, total_steps=total_steps, schedule=o.schedule,
                          warmup_ratio=o.warmup_ratio, min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay,
                          max_grad_norm=o.max_grad_norm, b1=o.b1, b2=o.b2, eps=o.eps)
