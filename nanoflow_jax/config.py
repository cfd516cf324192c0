"""Model configuration: read from an HF `config.json` or from a named preset.

`ModelConfig` holds exactly what the forward pass needs. Presets carry the real shapes of the
public checkpoints so benchmarks can run them with random weights (nothing downloaded).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style ("llama3") frequency scaling of RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def param_count(self) -> int:
        """Number of parameters (embeddings and LM head included), as in the paper's 2·P."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    # ---- HF config.json -------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (config 'architectures' = {archs!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key):
            if hf.get(key) is None:
                raise ValueError(f"config.json for {arch} is missing the field {key!r}")
            return hf[key]

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # transformers < 5 writes rope_scaling + rope_theta; >= 5 nests both in rope_parameters.
        rope_params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope_params
        rope_scaling = None
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        elif kind not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(need("rms_norm_eps")),
            rope_theta=float(rope_theta),
            max_position_embeddings=need("max_position_embeddings"),
            rope_scaling=rope_scaling,
            # Qwen2 always has q/k/v biases; LLaMA may declare them with attention_bias.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style config.json dict (used when we save our own checkpoints)."""
        out = {
            "architectures": [self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return out


def _preset(arch, vocab, hidden, inter, layers, heads, kv_heads, eps, theta, max_pos, **kw):
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=kw.pop("head_dim", hidden // heads),
        rms_norm_eps=eps,
        rope_theta=theta,
        max_position_embeddings=max_pos,
        **kw,
    )


_LLAMA, _MISTRAL, _QWEN2 = SUPPORTED_ARCHITECTURES
_TINY_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)

# Real shapes of the public checkpoints (their config.json), for random-weight benchmarks.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset(_LLAMA, 32000, 4096, 11008, 32, 32, 32, 1e-5, 1e4, 4096),
    "llama-2-13b": _preset(_LLAMA, 32000, 5120, 13824, 40, 40, 40, 1e-5, 1e4, 4096),
    "llama-2-70b": _preset(_LLAMA, 32000, 8192, 28672, 80, 64, 8, 1e-5, 1e4, 4096),
    "llama-3-8b": _preset(_LLAMA, 128256, 4096, 14336, 32, 32, 8, 1e-5, 5e5, 8192),
    "llama-3-70b": _preset(_LLAMA, 128256, 8192, 28672, 80, 64, 8, 1e-5, 5e5, 8192),
    "mistral-7b": _preset(_MISTRAL, 32000, 4096, 14336, 32, 32, 8, 1e-5, 1e4, 32768),
    "qwen2-7b": _preset(
        _QWEN2, 152064, 3584, 18944, 28, 28, 4, 1e-6, 1e6, 32768, attention_bias=True
    ),
    "qwen2-72b": _preset(
        _QWEN2, 152064, 8192, 29568, 80, 64, 8, 1e-6, 1e6, 32768, attention_bias=True
    ),
    # Tiny shapes for tests and the CPU default; vocab 512 fits the built-in byte tokenizer.
    "tiny-llama": _preset(
        _LLAMA, 512, 64, 128, 2, 4, 2, 1e-5, 1e4, 1024, rope_scaling=_TINY_SCALING
    ),
    "tiny-mistral": _preset(_MISTRAL, 512, 64, 160, 2, 4, 1, 1e-5, 1e4, 1024),
    "tiny-qwen2": _preset(
        _QWEN2, 512, 64, 128, 2, 4, 2, 1e-6, 1e6, 1024,
        attention_bias=True, tie_word_embeddings=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Knobs of the serving engine (vLLM's names where they exist)."""

    model: str = "tiny-llama"  # checkpoint directory or preset name
    dtype: str = "bfloat16"
    seed: int = 0  # random weights of presets, and requests that give no seed
    max_num_batched_tokens: int = 1024  # the dense batch: tokens per iteration
    max_num_seqs: int | None = dataclasses.field(default=None, metadata={"help": (
        "most running sequences (= decode rows of the compiled step, never more than "
        "max_num_batched_tokens); None: what the KV cache holds. Either way a request is "
        "admitted only while the projected KV use of every running sequence (prompt + "
        "max_tokens) fits the cache")})
    max_prefill_seqs: int = 16  # prompt chunks per iteration
    page_size: int = 16
    gpu_memory_utilization: float = dataclasses.field(default=0.9, metadata={"help": (
        "fraction of the device's total memory for weights + KV cache + workspace; XLA's "
        "pool must hold it (nanoflow_jax.device_memory.reserve_device_memory before JAX "
        "starts)")})
    max_model_len: int | None = None  # prompt + output tokens; None: the model's context
    num_pages: int | None = None  # KV pages; None: sized from free device memory
    attention_impl: str = "auto"  # "pallas" | "reference" | "interpret" | "auto"
    min_bucket: int = 16  # smallest compiled token count
    schedule: str = "sequential"  # nano-batch schedule (pipeline.schedule.named_schedule)

    def __post_init__(self):
        checks = [
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1,
             "max_num_seqs must be >= 1 (or None: what the KV cache holds)"),
            (self.max_prefill_seqs >= 1, "max_prefill_seqs must be >= 1"),
            (self.page_size >= 1 and not self.page_size & (self.page_size - 1),
             "page_size must be a power of two"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"),
            (self.num_pages is None or self.num_pages >= 1, "num_pages must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def token_buckets(self) -> tuple[int, ...]:
        """Compiled token counts: powers of two from min_bucket up to the dense batch."""
        buckets, t = [], self.min_bucket
        while t < self.max_num_batched_tokens:
            buckets.append(t)
            t *= 2
        return tuple(buckets) + (self.max_num_batched_tokens,)
