"""Translate between transformers' `config.json` and `ModelConfig`."""

from __future__ import annotations

from typing import Any

from posttrain_jax.models.config import FULL, SLIDING, ModelConfig, RopeConfig

_CAUSAL = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_FAMILY_OF_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                   "gemma3": "gemma3"}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope_from(params: dict | None, theta: float, where: str) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", theta))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeConfig(theta=theta, type="llama3", factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    raise ValueError(f"config.json: {where}: RoPE type {rope_type!r} is not supported "
                     f"(supported: default, linear, llama3)")


# transformers' config defaults, used when config.json leaves the key out.
_HF_SLIDING_WINDOW_DEFAULT = 4096
_HF_MAX_WINDOW_LAYERS_DEFAULT = 28


def _attention_layout(d: dict[str, Any], family: str, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """(layer_types, sliding_window) exactly as transformers derives them for `family`.

    - Qwen 2 / 3 (`Qwen2Config.__post_init__`): the window is ``sliding_window``
      (default 4096) only when ``use_sliding_window``; without ``layer_types``,
      layer ``i`` slides iff the window is set and ``i >= max_window_layers``
      (default 28). ``layer_types`` naming sliding layers with
      ``use_sliding_window`` off cannot run in transformers (its mask needs a
      window), so it is refused here too.
    - Gemma 3: ``layer_types``, else every ``sliding_window_pattern``-th layer
      (default 6) is full; window default 4096. Bidirectional attention
      (EmbeddingGemma) is refused.
    - Llama: transformers' Llama has no sliding attention and ignores
      ``layer_types``/``sliding_window``; a config asking for sliding layers is
      refused rather than silently run without them.
    """
    given = d.get("layer_types")
    if given is not None:
        if len(given) != num_layers or any(t not in (FULL, SLIDING) for t in given):
            raise ValueError(f"config.json: layer_types must list {num_layers} entries of {FULL!r} / {SLIDING!r}, "
                             f"got {given}")
    if family in ("qwen2", "qwen3"):
        window = d.get("sliding_window", _HF_SLIDING_WINDOW_DEFAULT) if d.get("use_sliding_window", False) else None
        if given is None:
            first = d.get("max_window_layers", _HF_MAX_WINDOW_LAYERS_DEFAULT)
            types = [SLIDING if window is not None and i >= first else FULL for i in range(num_layers)]
        elif SLIDING in given and window is None:
            raise ValueError("config.json: layer_types has sliding_attention layers but use_sliding_window is false "
                             "or sliding_window is null (transformers cannot build this model either); set "
                             "use_sliding_window: true and sliding_window, or make those layers full_attention")
        else:
            types = list(given)
    elif family == "gemma3":
        if d.get("use_bidirectional_attention"):
            raise ValueError("config.json: use_bidirectional_attention (EmbeddingGemma) is not supported: "
                             "posttrain-jax trains causal decoders")
        window = d.get("sliding_window", _HF_SLIDING_WINDOW_DEFAULT)
        pattern = d.get("sliding_window_pattern", 6)
        types = list(given) if given is not None else [SLIDING if (i + 1) % pattern else FULL
                                                       for i in range(num_layers)]
    else:
        if given is not None and SLIDING in given:
            raise ValueError(f"config.json: model_type {d.get('model_type')!r} has no sliding-window attention in "
                             "transformers, but layer_types lists sliding_attention layers")
        types, window = [FULL] * num_layers, None
    if SLIDING not in types:
        return tuple(types), None
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"config.json: sliding layers need a positive integer sliding_window, got {window!r}")
    return tuple(types), window


def from_hf_config(raw: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a transformers config dict (v4 or v5 style)."""
    d = dict(raw)
    if "text_config" in d and d.get("model_type") == "gemma3":  # multimodal Gemma 3: use its text tower
        d = {**d["text_config"], "model_type": "gemma3_text"}
    model_type = d.get("model_type")
    if model_type not in _FAMILY_OF_TYPE:
        arch = d.get("architectures")
        raise ValueError(f"config.json: model_type {model_type!r} (architectures {arch}) is not supported; "
                         f"supported model types: {sorted(_FAMILY_OF_TYPE)}")
    family = _FAMILY_OF_TYPE[model_type]
    archs = d.get("architectures") or []
    head = "scalar" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"
    if head == "scalar" and d.get("num_labels", len(d.get("id2label", {0: 0}))) != 1:
        raise ValueError("config.json: only single-output sequence classifiers (reward models) are supported")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: activation {act!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    rope_params = d.get("rope_parameters")
    kw: dict[str, Any] = dict(
        family=family, vocab_size=d["vocab_size"], hidden_size=hidden, intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads", heads),
        head_dim=d.get("head_dim") or hidden // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_embeddings=d.get("tie_word_embeddings", family in ("gemma3",)),
        max_position_embeddings=d.get("max_position_embeddings", 8192), activation=_ACTIVATIONS[act], head=head,
        bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"),
        eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"))
    bias = bool(d.get("attention_bias", False))
    if family == "llama":
        kw.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)))
    elif family == "qwen2":
        kw.update(qkv_bias=True)
    elif family == "qwen3":
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True)
    if family == "gemma3":
        per_type = rope_params if isinstance(rope_params, dict) and FULL in rope_params else {}
        global_params = per_type.get(FULL) if per_type else d.get("rope_scaling")
        local_params = per_type.get(SLIDING) if per_type else None
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm=True, norm_plus_one=True, sandwich_norm=True,
                  embed_scale=True, query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                  attn_logit_softcap=d.get("attn_logit_softcapping"),
                  final_logit_softcap=d.get("final_logit_softcapping"),
                  rope=_rope_from(global_params, d.get("rope_theta", 1_000_000.0), "rope (global layers)"),
                  local_rope=_rope_from(local_params, d.get("rope_local_base_freq", 10_000.0),
                                        "rope (sliding layers)"))
    else:
        kw["rope"] = _rope_from(rope_params if rope_params else d.get("rope_scaling"),
                                d.get("rope_theta", 10_000.0), "rope_parameters/rope_scaling")
    kw["layer_types"], kw["sliding_window"] = _attention_layout(d, family, kw["num_layers"])
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_dict(rope: RopeConfig) -> dict | None:
    if rope.type == "default":
        return None
    out = {"rope_type": rope.type, "factor": rope.factor}
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    return out


def to_hf_config(c: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers config dict (v4 key style, which v5 also reads)."""
    family = c.family
    if family == "llama" and c.qkv_bias != c.o_bias:
        raise ValueError("Llama's attention_bias covers q, k, v and o together; qkv_bias and o_bias must match")
    if family == "qwen2" and (not c.qkv_bias or c.o_bias):
        raise ValueError("Qwen2 has q/k/v biases and no o bias")
    arch = _CAUSAL[family]
    if c.head == "scalar":
        arch = "Gemma3TextForSequenceClassification" if family == "gemma3" else \
            arch.replace("ForCausalLM", "ForSequenceClassification")
    d: dict[str, Any] = {
        "architectures": [arch], "model_type": _MODEL_TYPE[family], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_embeddings,
        "rope_theta": c.rope.theta, "rope_scaling": _rope_dict(c.rope), "layer_types": list(c.layer_types),
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "torch_dtype": torch_dtype, "attention_dropout": 0.0, "initializer_range": 0.02,
    }
    if c.head == "scalar":
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if family == "gemma3":
        qpas = c.query_pre_attn_scalar  # transformers' strict config wants an int when it is one
        d.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(qpas) if qpas.is_integer() else qpas,
                 sliding_window=c.sliding_window, rope_local_base_freq=(c.local_rope or c.rope).theta,
                 attn_logit_softcapping=c.attn_logit_softcap, final_logit_softcapping=c.final_logit_softcap,
                 attention_bias=c.qkv_bias)
    else:
        d["hidden_act"] = c.activation
        sliding = SLIDING in c.layer_types
        d.update(sliding_window=c.sliding_window if sliding else None)
        if family == "llama":
            d.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
        elif family == "qwen3":
            d.update(attention_bias=c.qkv_bias)
        if family in ("qwen2", "qwen3"):
            first = c.layer_types.index(SLIDING) if sliding else c.num_layers
            d.update(use_sliding_window=sliding, max_window_layers=first)
    return d
