"""`posttrain-jax export`: a run checkpoint (or an averaged one) -> Hugging Face directory."""

from __future__ import annotations

from flax import nnx

from posttrain_jax.checkpointing import MODEL_CONFIG_KEY, abstract_target, load_params, read_metadata
from posttrain_jax.checkpointing import resolve_step_dir
from posttrain_jax.models import abstract_model, export_hf, model_shardings
from posttrain_jax.trainers.common import model_config_from_dict


def load_checkpoint_model(path: str, *, mesh=None, ema: bool = False, step: int | None = None):
    """The model saved in a run checkpoint: config from its metadata, params restored into shardings."""
    step_dir = resolve_step_dir(path, step)
    meta = read_metadata(step_dir) or {}
    if MODEL_CONFIG_KEY not in meta:
        raise ValueError(f"checkpoint {step_dir} has no '{MODEL_CONFIG_KEY}' in its metadata; "
                         f"was it written by a posttrain-jax trainer or `average`?")
    config = model_config_from_dict(meta[MODEL_CONFIG_KEY])
    graphdef, abstract = abstract_model(config)
    target = abstract_target(abstract, model_shardings(config, mesh))
    params = load_params(step_dir, target=target, params_key="ema_params" if ema else "params")
    return nnx.merge(graphdef, params)


def export_checkpoint(path: str, out: str, *, dtype: str | None = None, ema: bool = False) -> None:
    export_hf(load_checkpoint_model(path, ema=ema), out, dtype=dtype)
