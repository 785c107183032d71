"""Presets against transformers' own architectures, and config.json translation."""

import jax
import numpy as np
import pytest
import torch
import transformers

from posttrain_jax.models import ModelConfig, abstract_model, from_hf_config, preset, to_hf_config
from posttrain_jax.models.hf import _expected_hf_shape, _flat_paths, _layout_names

# Published parameter counts (model cards), to catch a wrong preset number.
PUBLISHED = {"llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.6e9,
             "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9, "qwen3-0.6b": 0.596e9,
             "qwen3-8b": 8.19e9, "gemma3-270m": 0.268e9, "gemma3-1b": 1.0e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["bench-small", "tiny-gemma3", "tiny-qwen2"])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_preset_matches_transformers_architecture(name, scan_layers):
    config = preset(name, scan_layers=scan_layers)
    hf = to_hf_config(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    _, abstract = abstract_model(config)
    ours = _flat_paths(abstract)
    names = _layout_names(config)
    for path, var in ours.items():
        hf_names, kind = names[path]
        stacked = path.startswith("layers.")
        assert len(hf_names) == (var.shape[0] if stacked else 1), path
        for hf_name in hf_names:  # a stack's leading axis is the layer
            assert hf_shapes[hf_name] == _expected_hf_shape(kind, var.shape[1:] if stacked else var.shape), path
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    assert set(hf_shapes) - tied == {hf_name for hf_names, _ in names.values() for hf_name in hf_names}
    count = sum(int(np.prod(v.shape)) for v in ours.values())
    assert count == config.num_params() == sum(p.numel() for p in hf_model.parameters())
    if name in PUBLISHED:
        assert abs(count / PUBLISHED[name] - 1) < 0.02, (name, count)


LLAMA_V4 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}


def test_v4_and_v5_llama_configs_agree():
    v5 = {k: v for k, v in LLAMA_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA_V4["rope_scaling"], "rope_theta": 500000.0}
    a, b = from_hf_config(LLAMA_V4), from_hf_config(v5)
    assert a == b
    assert a.rope == preset("llama3.2-1b").rope and a.eos_token_id == (128001, 128008, 128009)
    # And what transformers itself makes of the v4 file, written back by us, reads the same.
    hf = transformers.LlamaConfig(**{k: v for k, v in LLAMA_V4.items() if k != "model_type"})
    assert from_hf_config(hf.to_dict()) == a


def test_v4_and_v5_gemma3_configs_agree():
    base = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "query_pre_attn_scalar": 256, "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh"}
    v4 = {**base, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6}
    v5 = {**base, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                         "rope_theta": 1_000_000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
          "layer_types": ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(18)]}
    a, b = from_hf_config(v4), from_hf_config(v5)
    assert a == b and a.rope.type == "linear" and a.local_rope.theta == 10_000.0
    assert a.replace(rope=preset("gemma3-270m").rope) == preset("gemma3-270m").replace(
        bos_token_id=None, eos_token_id=None, pad_token_id=None, max_position_embeddings=8192)
    # The multimodal Gemma 3 config wraps the text tower.
    assert from_hf_config({"model_type": "gemma3", "text_config": v5}) == b


def test_transformers_reads_our_config_as_we_do():
    for name in ("llama3.1-8b", "qwen2.5-7b", "qwen3-8b", "gemma3-1b"):
        config = preset(name)
        hf = to_hf_config(config)
        hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        assert from_hf_config(hf_config.to_dict()) == config, name


def test_bad_configs_are_explained():
    with pytest.raises(ValueError, match=r"RoPE type 'yarn' is not supported"):
        from_hf_config({**LLAMA_V4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"activation 'relu' is not supported"):
        from_hf_config({**LLAMA_V4, "hidden_act": "relu"})
    with pytest.raises(ValueError, match=r"num_heads 6 is not a multiple of num_kv_heads 4"):
        preset("tiny-llama", num_heads=6, num_kv_heads=4)
    with pytest.raises(KeyError, match=r"unknown model preset 'llama9'.*llama3.1-8b"):
        preset("llama9")
    with pytest.raises(ValueError, match=r"sliding layers need sliding_window"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=8, layer_types=("sliding_attention",))


def test_flops_per_token_counts_matmuls():
    config = preset("bench-small")
    dense = 2 * (config.num_params() - config.vocab_size * config.hidden_size)  # embedding lookup is free
    assert config.flops_per_token(512) == pytest.approx(3 * (dense + 2 * 2 * 8 * 8 * 64 * 512 / 2))
    assert jax.devices()  # keeps conftest's device setup in this module's import path
