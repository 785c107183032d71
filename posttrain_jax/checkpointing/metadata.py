"""What a run's checkpoints record as metadata: the model config, the run config, and a LoRA run's adapters.

Not imported by `posttrain_jax.checkpointing` itself: it reads the model layer
(`models.config`, `models.lora_runs`), which in turn restores checkpoints.
"""

from __future__ import annotations

import json

import jax

from posttrain_jax.checkpointing.averaging import MODEL_CONFIG_KEY
from posttrain_jax.models.config import model_config_to_dict
from posttrain_jax.models.lora_runs import LORA_KEY, lora_spec


def run_metadata(config, model) -> dict:
    """The JSON metadata saved with every checkpoint of a run of `config` training `model`.

    {MODEL_CONFIG_KEY: the model's ModelConfig as a dict, "config": the whole run config,
    "process_count": ..., and for a LoRA run LORA_KEY: `lora_spec(config)`} — what `export`,
    `sample` and a later run's `model.checkpoint` rebuild the model from.
    """
    meta = {MODEL_CONFIG_KEY: model_config_to_dict(model.config), "config": json.loads(config.to_json()),
            "process_count": jax.process_count()}
    spec = lora_spec(config)
    if spec is not None:  # the checkpoints hold adapters only: say what they adapt
        meta[LORA_KEY] = spec
    return meta
