"""Train state, optimizer builders and the jitted train step."""

from posttrain_jax.train.optim import make_optimizer, make_schedule
from posttrain_jax.train.step import (TrainState, frozen_state, init_train_state, jit_train_step, make_grad_fn,
                                      make_train_step, split_microbatches)

__all__ = ["TrainState", "frozen_state", "init_train_state", "jit_train_step", "make_grad_fn", "make_optimizer", "make_schedule",
           "make_train_step", "split_microbatches"]
