"""config.json import: the attention layout (full / sliding layers, window) transformers builds, per config style."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from posttrain_jax.models import from_hf_config, load_hf
from posttrain_jax.models.config import FULL, SLIDING
from tests.models.hf_fixtures import VOCAB, hf_logits, make_hf_model

TOL = 1e-4
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _hf_layout(raw: dict) -> tuple[tuple[str, ...], int | None]:
    """What transformers makes of the same dict: per-layer types and the window its sliding layers use."""
    raw = dict(raw)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    types = tuple(config.layer_types) if getattr(config, "layer_types", None) else (FULL,) * config.num_hidden_layers
    return types, (config.sliding_window if SLIDING in types else None)


def _ours(raw: dict) -> tuple[tuple[str, ...], int | None]:
    c = from_hf_config(raw)
    return c.layer_types, c.sliding_window


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_issue_input_qwen_use_sliding_window_max_window_layers(model_type):
    """The issue's config: no layer_types; transformers builds (full, sliding) with window 4."""
    raw = dict(_BASE, model_type=model_type, use_sliding_window=True, max_window_layers=1, sliding_window=4)
    assert _ours(raw) == ((FULL, SLIDING), 4) == _hf_layout(raw)


_QWEN_STYLES = {
    "sliding off (default)": dict(),
    "sliding off, window given": dict(sliding_window=4, max_window_layers=0),
    "sliding on, max_window_layers 0": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
    "sliding on, max_window_layers 2 (none slide)": dict(use_sliding_window=True, sliding_window=4,
                                                         max_window_layers=2),
    "sliding on, default max_window_layers 28": dict(use_sliding_window=True, sliding_window=4,
                                                     num_hidden_layers=30),
    "sliding on, window key absent (4096)": dict(use_sliding_window=True, max_window_layers=1),
    "layer_types given, sliding on": dict(use_sliding_window=True, sliding_window=3, max_window_layers=5,
                                          layer_types=[SLIDING, FULL]),
    "sliding on, window null (none slide)": dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),
    "layer_types all full, sliding off": dict(layer_types=[FULL, FULL], sliding_window=3),
}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("style", list(_QWEN_STYLES))
def test_qwen_config_styles_match_transformers(model_type, style):
    raw = dict(_BASE, model_type=model_type, **_QWEN_STYLES[style])
    assert _ours(raw) == _hf_layout(raw)


_GEMMA_STYLES = {
    "layer_types": dict(sliding_window=5, layer_types=[SLIDING, FULL, SLIDING]),
    "sliding_window_pattern 2": dict(sliding_window=5, sliding_window_pattern=2),
    "default pattern 6, default window": dict(num_hidden_layers=7),
}


@pytest.mark.parametrize("style", list(_GEMMA_STYLES))
def test_gemma3_config_styles_match_transformers(style):
    raw = {**_BASE, "model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 16, **_GEMMA_STYLES[style]}
    assert _ours(raw) == _hf_layout(raw)


def test_llama_has_no_sliding_layers():
    raw = dict(_BASE, model_type="llama", sliding_window=4)
    assert _ours(raw) == ((FULL, FULL), None)


@pytest.mark.parametrize("raw, message", [
    (dict(_BASE, model_type="qwen2", layer_types=[SLIDING, FULL]), "use_sliding_window is false"),
    (dict(_BASE, model_type="qwen3", layer_types=[FULL]), "must list 2 entries"),
    (dict(_BASE, model_type="qwen2", layer_types=[FULL, "chunked_attention"]), "must list 2 entries"),
    (dict(_BASE, model_type="llama", layer_types=[SLIDING, FULL]), "no sliding-window attention"),
    (dict(_BASE, model_type="gemma3_text", use_bidirectional_attention=True), "bidirectional"),
    (dict(_BASE, model_type="qwen2", use_sliding_window=True, sliding_window=0, max_window_layers=0),
     "positive integer sliding_window"),
])
def test_unsupported_layouts_fail_loudly(raw, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config(raw)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_checkpoint_logits_match(family, tmp_path):
    """A real (random-weight) Qwen checkpoint saved with the issue's config: logits equal transformers'
    on sequences longer than the window, so the second layer really slides."""
    model = make_hf_model(family, tmp_path, use_sliding_window=True, max_window_layers=1, sliding_window=4)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert tuple(model.config.layer_types) == (FULL, SLIDING)
    ours = load_hf(str(tmp_path))
    assert ours.config.layer_types == (FULL, SLIDING) and ours.config.sliding_window == 4, saved
    tokens = np.random.RandomState(0).randint(1, VOCAB, size=(2, 16))
    err = float(np.abs(np.asarray(ours(jnp.asarray(tokens)), np.float32) - hf_logits(model, tokens)).max())
    print(f"{family} sliding import: max abs err {err:.2e}")
    assert err < TOL
    # And the all-full import of the same weights differs: the window is really in effect.
    full = np.asarray(load_hf(str(tmp_path), layer_types=(FULL, FULL), sliding_window=None)(jnp.asarray(tokens)))
    assert np.abs(full - hf_logits(model, tokens)).max() > 1e-3
