"""Model configuration: one frozen dataclass for every supported decoder family.

`ModelConfig` is hashable so it can be a static argument of `jax.jit`. It covers
Llama 3 / 3.1 / 3.2, Qwen 2.5, Qwen 3 and Gemma 3 (text) exactly as Hugging Face
transformers defines them; `from_hf_config` / `to_hf_config` translate to and
from a transformers `config.json` (both the v4 `rope_theta`/`rope_scaling` and the
v5 `rope_parameters` styles are read; v4 style is written because both major
versions of transformers read it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"

LAYER_LOOPS = ("auto", "scan", "unrolled")  # ModelConfig.layer_loop

# `model.remat`: what a transformer block saves for the backward pass (the rest is recomputed there).
# Each maps to a `jax.checkpoint_policies` policy in `transformer.remat_policy`.
REMAT_POLICIES = {
    # Save everything: fastest step, activation memory grows with layers x tokens. Small models, short rows.
    "none": "no rematerialisation",
    # Save only each block's input, recompute the whole block: least memory (about one [batch, length,
    # hidden] per layer) for ~1/3 more FLOPs. The default choice when activations do not fit.
    "full": "jax.checkpoint with nothing saveable",
    # Save every matmul output (projections and attention einsums), recompute the elementwise ops (norms,
    # activations, softmax). Cheap recompute; still keeps the [T, T] attention scores, so long rows suffer.
    "dots": "jax.checkpoint_policies.checkpoint_dots",
    # Save the weight matmuls (q/k/v/o, gate/up/down: no batch dimension in the dot), recompute attention
    # scores and elementwise ops. Most of the speed of "none" without the per-layer [T, T] scores; the
    # usual choice for long sequences when "none" does not fit.
    "dots_no_batch": "jax.checkpoint_policies.dots_with_no_batch_dims_saveable",
    # As dots_no_batch, but the saved matmul outputs go to pinned host memory and come back for the
    # backward pass: accelerator memory of "full" at the cost of host<->device traffic (TPU/GPU).
    "offload": "jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host')",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies: `default`, `linear` or `llama3` scaling."""

    theta: float = 10_000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer."""

    family: str  # llama | qwen2 | qwen3 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    # RoPE of sliding-window layers (Gemma 3 uses a different base); None = `rope`.
    local_rope: RopeConfig | None = None
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = all FULL
    sliding_window: int | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen 3, Gemma 3)
    norm_plus_one: bool = False  # Gemma: x * (1 + w)
    sandwich_norm: bool = False  # Gemma 3: norms before and after attention and MLP
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    activation: str = "silu"  # silu | gelu_tanh
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    max_position_embeddings: int = 8192
    head: str = "lm"  # lm: logits over the vocabulary; scalar: one value per token
    dtype: str = "float32"  # compute dtype (bfloat16 is the TPU default)
    param_dtype: str = "float32"  # master weights
    # What each block keeps for the backward pass: a name of REMAT_POLICIES (True = "full", False = "none").
    remat: str = "none"
    # Stack the parameters of repeating layers and run them with one `lax.scan` (compile time independent
    # of depth); False keeps one module per layer (`blocks.<i>`), the unrolled oracle.
    scan_layers: bool = True
    # How a full-row forward (training, scoring; not a KV-cache decode) runs stacked layers: "scan" (one
    # lax.scan: compile time flat in depth; what TPU and GPU want), "unrolled" (one slice per layer, made
    # once per step: XLA:CPU copies a stacked weight before every dot inside a loop, ~10% of a CPU train
    # step) or "auto" (unrolled on CPU unless `remat` is on, which only the scan makes effective there; scan
    # elsewhere). Parameters and checkpoints are the same either way.
    layer_loop: str = "auto"
    # Attention kernel: auto | xla | blocked | splash | cudnn (posttrain_jax/models/attention.py).
    attention: str = "auto"
    attention_block: int = 512  # query/key block length of the blocked and splash kernels
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        # Configs written before remat policies existed say True / False (or "True" from a CLI override).
        legacy = {True: "full", False: "none", None: "none", "true": "full", "false": "none"}
        remat = self.remat.lower() if isinstance(self.remat, str) else self.remat
        object.__setattr__(self, "remat", legacy.get(remat, remat))
        problems = []
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} is not one of {', '.join(REMAT_POLICIES)} (or True/False)")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if any(t not in (FULL, SLIDING) for t in self.layer_types):
            problems.append(f"layer_types must be {FULL!r} or {SLIDING!r}, got {set(self.layer_types)}")
        if SLIDING in self.layer_types and not self.sliding_window:
            problems.append("sliding layers need sliding_window > 0")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation {self.activation!r} is not silu or gelu_tanh")
        if self.attention not in ("auto", "xla", "blocked", "splash", "cudnn"):
            problems.append(f"attention {self.attention!r} is not auto, xla, blocked, splash or cudnn")
        if self.layer_loop not in LAYER_LOOPS:
            problems.append(f"layer_loop {self.layer_loop!r} is not one of {', '.join(LAYER_LOOPS)}")
        if self.attention_block < 1:
            problems.append(f"attention_block must be >= 1, got {self.attention_block}")
        if self.head not in ("lm", "scalar"):
            problems.append(f"head {self.head!r} is not 'lm' or 'scalar'")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name} {getattr(self, name)!r} is not float32, bfloat16 or float16")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * hd * (2 * h + 2 * kv) + (hd * (h + 2 * kv) if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        norms = (4 if self.sandwich_norm else 2) * d
        head = 0 if self.tie_embeddings and self.head == "lm" else (d * self.vocab_size if self.head == "lm" else d)
        return self.vocab_size * d + self.num_layers * (attn + mlp + norms) + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), with attention."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size
        if self.tie_embeddings and self.head == "lm":
            matmul_params += self.vocab_size * self.hidden_size
        attention = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2  # causal: half
        return 3 * (2 * matmul_params + attention)


# ---------------------------------------------------------------- presets

def _llama(**kw) -> ModelConfig:
    base = dict(family="llama", rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
    return ModelConfig(**{**base, **kw})


_LLAMA31_ROPE = RopeConfig(theta=500_000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = dataclasses.replace(_LLAMA31_ROPE, factor=32.0)
_GEMMA3_LAYERS = lambda n: tuple(SLIDING if (i + 1) % 6 else FULL for i in range(n))  # noqa: E731


def _qwen(family: str, **kw) -> ModelConfig:
    base = dict(family=family, rms_norm_eps=1e-6, rope=RopeConfig(theta=1_000_000.0),
                qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                bos_token_id=151643, eos_token_id=151645, max_position_embeddings=32768)
    return ModelConfig(**{**base, **kw})


def _gemma3(**kw) -> ModelConfig:
    n = kw["num_layers"]
    base = dict(family="gemma3", rms_norm_eps=1e-6, rope=RopeConfig(theta=1_000_000.0),
                local_rope=RopeConfig(theta=10_000.0), layer_types=_GEMMA3_LAYERS(n),
                sliding_window=512, tie_embeddings=True, qk_norm=True, norm_plus_one=True,
                sandwich_norm=True, embed_scale=True, activation="gelu_tanh",
                query_pre_attn_scalar=256.0, head_dim=256, max_position_embeddings=32768,
                bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, Any] = {
    "llama3.2-1b": lambda: _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                  num_heads=32, num_kv_heads=8, head_dim=64, rope=_LLAMA32_ROPE,
                                  tie_embeddings=True, max_position_embeddings=131072),
    "llama3.2-3b": lambda: _llama(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
                                  num_heads=24, num_kv_heads=8, head_dim=128, rope=_LLAMA32_ROPE,
                                  tie_embeddings=True, max_position_embeddings=131072),
    "llama3.1-8b": lambda: _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                  num_heads=32, num_kv_heads=8, head_dim=128, rope=_LLAMA31_ROPE,
                                  max_position_embeddings=131072),
    "llama3.1-70b": lambda: _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                   num_heads=64, num_kv_heads=8, head_dim=128, rope=_LLAMA31_ROPE,
                                   max_position_embeddings=131072),
    "qwen2.5-0.5b": lambda: _qwen("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                  num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, tie_embeddings=True),
    "qwen2.5-1.5b": lambda: _qwen("qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                  num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, tie_embeddings=True),
    "qwen2.5-7b": lambda: _qwen("qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128),
    "qwen3-0.6b": lambda: _qwen("qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, tie_embeddings=True,
                                max_position_embeddings=40960),
    "qwen3-8b": lambda: _qwen("qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                              num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=40960),
    "gemma3-270m": lambda: _gemma3(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
                                   num_heads=4, num_kv_heads=1),
    "gemma3-1b": lambda: _gemma3(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26,
                                 num_heads=4, num_kv_heads=1),
    # The benchmark spec of the SFT and sampler issues.
    "bench-small": lambda: _llama(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_layers=8,
                                  num_heads=8, num_kv_heads=4, head_dim=64, rope=RopeConfig(theta=500_000.0),
                                  bos_token_id=1, eos_token_id=2, max_position_embeddings=4096),
    # The CPU quickstart: a small Llama-architecture model over the synthetic task's 512-token vocabulary.
    "quickstart": lambda: _llama(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                                 num_kv_heads=2, head_dim=32, rope=RopeConfig(theta=10_000.0), bos_token_id=1,
                                 eos_token_id=2, pad_token_id=3, max_position_embeddings=256),
    # Tiny models for tests: every family feature, few parameters.
    "tiny-llama": lambda: _llama(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, rope=dataclasses.replace(_LLAMA31_ROPE,
                                 original_max_position_embeddings=64), bos_token_id=1, eos_token_id=2,
                                 max_position_embeddings=512),
    "tiny-qwen2": lambda: _qwen("qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True,
                                bos_token_id=1, eos_token_id=2, max_position_embeddings=512),
    "tiny-qwen3": lambda: _qwen("qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
                                max_position_embeddings=512),
    "tiny-gemma3": lambda: _gemma3(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
                                   num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16.0,
                                   sliding_window=4, layer_types=(SLIDING, SLIDING, FULL),
                                   max_position_embeddings=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, e.g. `preset("llama3.1-8b", dtype="bfloat16")`."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]().replace(**overrides)


def model_config_to_dict(config: ModelConfig) -> dict:
    """`config` as plain JSON types (what a checkpoint's metadata records under MODEL_CONFIG_KEY)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def model_config_from_dict(d: dict) -> ModelConfig:
    """The inverse of `model_config_to_dict` (JSON lists back to the tuples the dataclass holds)."""
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    d["local_rope"] = RopeConfig(**d["local_rope"]) if d.get("local_rope") else None
    for key in ("layer_types", "eos_token_id"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return ModelConfig(**d)
