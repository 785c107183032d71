"""Decoder models (Llama 3, Qwen 2.5/3, Gemma 3), presets and Hugging Face import/export."""

from posttrain_jax.models.build import abstract_model, create_model, model_shardings
from posttrain_jax.models.config import PRESETS, ModelConfig, RopeConfig, preset
from posttrain_jax.models.hf import export_hf, load_hf
from posttrain_jax.models.hf_config import from_hf_config, to_hf_config
from posttrain_jax.models.transformer import Decoder, KVCache

__all__ = ["PRESETS", "Decoder", "KVCache", "ModelConfig", "RopeConfig", "abstract_model", "create_model",
           "export_hf", "from_hf_config", "load_hf", "model_shardings", "preset", "to_hf_config"]
