"""`posttrain-jax export`: a run checkpoint (or an averaged one) -> Hugging Face directory or PEFT adapter."""

from __future__ import annotations

from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata
from posttrain_jax.checkpointing import resolve_step_dir
from posttrain_jax.models import abstract_model, export_hf, model_shardings
from posttrain_jax.sharding import DEFAULT_RULES
from posttrain_jax.trainers.adapters import LORA_KEY, load_adapter_run
from posttrain_jax.trainers.common import build_model, model_config_from_dict


def load_checkpoint_model(path: str, *, mesh=None, ema: bool = False, step: int | None = None):
    """The model saved in a run checkpoint: config from its metadata, params restored into shardings.

    A LoRA run's checkpoint comes back as its base (rebuilt from the recorded reference)
    with the saved adapters on it (not merged).
    """
    step_dir = resolve_step_dir(path, step)
    meta = read_metadata(step_dir) or {}
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"checkpoint {step_dir} has no '{MODEL_CONFIG_KEY}' in its metadata; "
                         f"was it written by a posttrain-jax trainer or `average`?")
    config = model_config_from_dict(meta[MODEL_CONFIG_KEY])
    params_key = "ema_params" if ema else "params"
    if LORA_KEY in meta:
        numerics = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                        attention=config.attention, scan_layers=config.scan_layers)
        return load_adapter_run(step_dir, meta, mesh, DEFAULT_RULES, head=config.head, numerics=numerics,
                                params_key=params_key,
                                build_base=lambda section, seed, head: build_model(section, mesh, DEFAULT_RULES,
                                                                                   seed=seed, head=head))
    graphdef, abstract = abstract_model(config)
    target = abstract_target(abstract, model_shardings(config, mesh))
    params = load_params(step_dir, target=target, params_key=params_key)
    return nnx.merge(graphdef, params)


def export_checkpoint(path: str, out: str, *, dtype: str | None = None, ema: bool = False,
                      peft: bool = False) -> None:
    """Write a Hugging Face directory (adapters merged into the weights) or, with `peft`, a LoRA run's
    adapters as a PEFT adapter directory for its base."""
    from posttrain_jax.models.lora import LoraConfig, has_adapters
    from posttrain_jax.models.lora_io import export_merged, write_peft_adapter
    model = load_checkpoint_model(path, ema=ema)
    if peft:
        meta = read_metadata(resolve_step_dir(path)) or {}
        if LORA_KEY not in meta:
            raise ValueError(f"{path} is not a LoRA run: --peft exports adapters; export it without --peft")
        spec = meta[LORA_KEY]
        base = spec["base"]["hf_path"] or spec["base"]["checkpoint"] or spec["base"]["preset"]
        write_peft_adapter(model, LoraConfig(**spec["config"]), out, base_model=base, dtype=dtype or "float32")
    elif has_adapters(model):
        export_merged(model, out, dtype=dtype)
    else:
        export_hf(model, out, dtype=dtype)
