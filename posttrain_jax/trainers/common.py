"""The config sections every trainer (and command) has; the pieces they configure live in their layers.

The model is built by `models.from_config.build_model`, the mesh by `mesh.mesh_and_rules`,
the optimizer by `train.optim.optimizer_from_config`, checkpoint metadata by
`checkpointing.metadata.run_metadata`.
"""

from __future__ import annotations

import ml_collections

from posttrain_jax.models.from_config import model_config
from posttrain_jax.models.lora_runs import lora_section


def base_config(output_dir: str) -> ml_collections.ConfigDict:
    """The sections every trainer has: output, seed, mesh, sharding rules, model, tokenizer, template."""
    c = ml_collections.ConfigDict()
    c.output_dir = output_dir
    c.seed = 0
    # -1 fills the devices; dcn_* split an axis across TPU slices (multi-slice), 1 = one slice.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1,
                                        "dcn_tensor": 1, "num_devices": 0})
    c.sharding_rules = []  # (logical_name, mesh_axes) pairs that take precedence over the defaults
    c.model = model_config()
    c.tokenizer = ""  # a SentencePiece .model or HF tokenizer.json / directory
    # "auto": the tokenizer's own template, else the built-in of its model type; or a built-in name / .jinja file.
    c.chat_template = "auto"
    c.lora = lora_section()
    return c
