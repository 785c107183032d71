"""Jitted generation: prefill + `lax.while_loop` decode with a donated KV cache."""

from posttrain_jax.sampling.sampler import Sampler, SampleOutput, left_align, make_generate
from posttrain_jax.sampling.strategies import SamplingParams, choose_tokens, truncate_logits

__all__ = ["SampleOutput", "Sampler", "SamplingParams", "choose_tokens", "left_align", "make_generate",
           "truncate_logits"]
