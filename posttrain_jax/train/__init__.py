"""Train state, optimizer builders and the jitted train step."""

from posttrain_jax.train.abstract import (abstract_lora_split, abstract_lora_train_state, abstract_params,
                                          abstract_train_state)
from posttrain_jax.train.optim import make_optimizer, make_schedule, optimizer_config, optimizer_from_config
from posttrain_jax.train.step import (TrainState, frozen_state, init_train_state, jit_train_step, make_grad_fn,
                                      make_train_step, split_microbatches, trainable_split)

__all__ = ["TrainState", "abstract_lora_split", "abstract_lora_train_state", "abstract_params",
           "abstract_train_state", "frozen_state", "init_train_state", "jit_train_step", "make_grad_fn",
           "make_optimizer", "make_schedule", "make_train_step", "optimizer_config", "optimizer_from_config",
           "split_microbatches", "trainable_split"]
