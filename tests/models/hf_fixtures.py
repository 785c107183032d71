"""Random-weight transformers models of every supported family, written with save_pretrained."""

import numpy as np
import torch
import transformers

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
VOCAB = 256


def hf_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":  # llama3 RoPE scaling with a short original context so every band is used
        kw = dict(common, rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        return transformers.LlamaConfig(**{**kw, **overrides})
    if family == "qwen2":
        return transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    if family == "qwen3":
        return transformers.Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": False, **overrides})
    if family == "gemma3":  # window 5 < test lengths, so sliding layers really slide
        kw = dict(common, num_hidden_layers=3, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
        return transformers.Gemma3TextConfig(**{**kw, **overrides})
    raise ValueError(family)


_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}


def make_hf_model(family: str, path, *, head: str = "lm", seed: int = 0, **overrides):
    """Build, perturb (so norms and biases are not trivial), save; return the torch model."""
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    if head == "scalar":
        config.num_labels = 1
        config.pad_token_id = 0
        name = "Gemma3Text" if family == "gemma3" else _CLASSES[family]
        cls = getattr(transformers, f"{name}ForSequenceClassification")
    else:
        cls = getattr(transformers, f"{_CLASSES[family]}ForCausalLM")
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def hf_logits(model, tokens, **kw) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw).logits.float().numpy()
