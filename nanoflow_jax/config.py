"""Model configuration: read from an HF `config.json` or from a named preset.

`ModelConfig` holds exactly what the forward pass needs. Presets carry the real shapes of the
public checkpoints so benchmarks can run them with random weights (nothing downloaded).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")


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
    # Attention to the last `sliding_window` keys only (Mistral v0.1); None: the whole context.
    sliding_window: int | None = None
    # Layers of a sliding-window model that attend to the whole context anyway (HF's
    # `layer_types`; Qwen2: the first max_window_layers). `layer_window` gives each layer's.
    full_attention_layers: tuple[int, ...] = ()
    # Mixture of experts (Mixtral, Qwen2-MoE; `nanoflow_jax.models.moe`). 0 experts: dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # k: routed experts per token
    moe_intermediate_size: int = 0  # F of one routed expert
    shared_expert_intermediate_size: int = 0  # F of the sigmoid-gated shared expert; 0: none
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum 1 (Mixtral: always)
    mlp_only_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP
    # Set only on the per-shard config that `nanoflow_jax.parallel` hands the model inside
    # shard_map: the mesh axis the residual stream is summed over (the sizes are then per shard).
    tp_axis: str | None = None

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if (self.architecture in MOE_ARCHITECTURES) != (self.num_experts > 0):
            raise ValueError(f"{self.architecture} needs num_experts "
                             f"{'> 0' if self.architecture in MOE_ARCHITECTURES else '== 0'}, "
                             f"got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}]"
                             f", got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got "
                             f"{self.moe_intermediate_size}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if not all(0 <= i < self.num_layers for i in self.full_attention_layers):
            raise ValueError(f"full_attention_layers must be in [0, {self.num_layers}), got "
                             f"{self.full_attention_layers}")
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

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to the whole context)."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers

    def _count_params(self, experts_per_layer: int) -> int:
        d, f = self.hidden_size, self.intermediate_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        moe = (d * self.num_experts  # router
               + experts_per_layer * 3 * d * self.moe_intermediate_size
               + 3 * d * self.shared_expert_intermediate_size
               + (d if self.shared_expert_intermediate_size else 0))  # shared expert's gate
        layers = sum(attn + 2 * d + (moe if self.is_moe_layer(i) else 3 * d * f)
                     for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + layers + d + head

    @property
    def param_count(self) -> int:
        """Number of parameters (embeddings and LM head included), as in the paper's 2·P."""
        return self._count_params(self.num_experts)

    @property
    def active_param_count(self) -> int:
        """Parameters one token computes with: `param_count` with only the k routed experts of
        each MoE layer counted (the same for a dense model). A token costs
        2 × active_param_count FLOPs, so optimal throughput = peak / (2 × active_param_count)."""
        return self._count_params(self.num_experts_per_tok)

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
            # Qwen2 always has q/k/v biases (Qwen2-MoE unless qkv_bias says otherwise); LLaMA
            # may declare them with attention_bias.
            attention_bias=(arch == "Qwen2ForCausalLM"
                            or (arch == "Qwen2MoeForCausalLM" and hf.get("qkv_bias", True))
                            or bool(hf.get("attention_bias", False))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **_hf_window_and_experts(arch, hf, need),
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
        if self.architecture.startswith("Qwen2"):
            out["use_sliding_window"] = self.sliding_window is not None
        out["sliding_window"] = self.sliding_window
        if self.sliding_window is not None:  # exact per layer, whatever HF's default rule
            out["layer_types"] = ["full_attention" if self.layer_window(i) is None
                                  else "sliding_attention" for i in range(self.num_layers)]
        if self.architecture == "MixtralForCausalLM":
            out.update(num_local_experts=self.num_experts,
                       num_experts_per_tok=self.num_experts_per_tok)
        elif self.architecture == "Qwen2MoeForCausalLM":
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       moe_intermediate_size=self.moe_intermediate_size,
                       shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                       norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                       mlp_only_layers=list(self.mlp_only_layers), qkv_bias=self.attention_bias)
        return out


def _hf_window_and_experts(arch: str, hf: Mapping[str, Any], need) -> dict[str, Any]:
    """The sliding window and mixture-of-experts fields of an HF config.json, as our fields."""
    out: dict[str, Any] = _hf_window(arch, hf, need("num_hidden_layers"))
    if arch == "MixtralForCausalLM":
        out.update(num_experts=need("num_local_experts"),
                   num_experts_per_tok=need("num_experts_per_tok"),
                   moe_intermediate_size=need("intermediate_size"), norm_topk_prob=True)
    elif arch == "Qwen2MoeForCausalLM":
        num_layers, step = need("num_hidden_layers"), hf.get("decoder_sparse_step") or 1
        only = set(hf.get("mlp_only_layers") or ())
        # HF: a layer is sparse when it is not in mlp_only_layers and (i + 1) % step == 0.
        out.update(num_experts=need("num_experts"),
                   num_experts_per_tok=need("num_experts_per_tok"),
                   moe_intermediate_size=need("moe_intermediate_size"),
                   shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   mlp_only_layers=tuple(i for i in range(num_layers)
                                         if i in only or (i + 1) % step))
    return out


def _hf_window(arch: str, hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """sliding_window and full_attention_layers as transformers (5.x) applies them: Mistral and
    Mixtral window every layer when sliding_window is set; Qwen2 and Qwen2-MoE only with
    use_sliding_window, on the layers `layer_types` names (written by transformers >= 4.53),
    else by their rules: Qwen2 the layers from max_window_layers on, Qwen2-MoE the even layers
    below max_window_layers."""
    window = hf.get("sliding_window") or None
    if arch.startswith("Qwen2") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return {"sliding_window": None}
    max_window_layers = hf.get("max_window_layers", 28)  # transformers' default
    if hf.get("layer_types"):
        if len(hf["layer_types"]) != num_layers:
            raise ValueError(f"config.json's layer_types has {len(hf['layer_types'])} entries "
                             f"for num_hidden_layers={num_layers}")
        windowed = [t == "sliding_attention" for t in hf["layer_types"]]
    elif arch == "Qwen2ForCausalLM":
        windowed = [i >= max_window_layers for i in range(num_layers)]
    elif arch == "Qwen2MoeForCausalLM":
        windowed = [i % 2 == 0 and i < max_window_layers for i in range(num_layers)]
    else:
        windowed = [True] * num_layers
    if not any(windowed):
        return {"sliding_window": None}
    return {"sliding_window": int(window),
            "full_attention_layers": tuple(i for i, w in enumerate(windowed) if not w)}


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


_LLAMA, _MISTRAL, _QWEN2, _MIXTRAL, _QWEN2_MOE = SUPPORTED_ARCHITECTURES
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
    "mistral-7b": _preset(_MISTRAL, 32000, 4096, 14336, 32, 32, 8, 1e-5, 1e4, 32768,
                          sliding_window=4096),  # Mistral-7B-v0.1
    "qwen2-7b": _preset(
        _QWEN2, 152064, 3584, 18944, 28, 28, 4, 1e-6, 1e6, 32768, attention_bias=True
    ),
    "qwen2-72b": _preset(
        _QWEN2, 152064, 8192, 29568, 80, 64, 8, 1e-6, 1e6, 32768, attention_bias=True
    ),
    # Mixtral: intermediate_size is one expert's F. Qwen MoE: 60/64 small routed experts plus
    # a shared expert behind a sigmoid gate, top-k weights not renormalised.
    "mixtral-8x7b": _preset(
        _MIXTRAL, 32000, 4096, 14336, 32, 32, 8, 1e-5, 1e6, 32768,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
    ),
    "qwen1.5-moe-a2.7b": _preset(
        _QWEN2_MOE, 151936, 2048, 5632, 24, 16, 16, 1e-6, 1e6, 8192, attention_bias=True,
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, norm_topk_prob=False,
    ),
    "qwen2-57b-a14b": _preset(
        _QWEN2_MOE, 151936, 3584, 18944, 28, 28, 4, 1e-6, 1e6, 32768, attention_bias=True,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, norm_topk_prob=False,
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
    "tiny-mixtral": _preset(
        _MIXTRAL, 512, 64, 96, 2, 4, 2, 1e-5, 1e6, 1024,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
    ),
    "tiny-qwen2-moe": _preset(
        _QWEN2_MOE, 512, 64, 128, 3, 4, 2, 1e-6, 1e6, 1024, attention_bias=True,
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=(1,),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def _knob(default, help_text: str):
    """An EngineConfig field whose help text is the one every script's flag shows."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Knobs of the serving engine (vLLM's names where they exist).

    Each field is also a command-line flag of every script (`nanoflow_jax.cli`), with the help
    text given here. `None` and "auto" mean "chosen at start-up" (from the model, the backend or
    the free device memory); the engine logs what it chose.
    """

    model: str = _knob("tiny-llama", "checkpoint directory or preset name (presets get random "
                       "weights)")
    dtype: str = _knob("auto", "weights and KV cache: float32 | bfloat16 | float16 | auto "
                       "(bfloat16 on a GPU, float32 on the CPU)")
    seed: int = _knob(0, "random seed: weights of presets, requests that give none, and the "
                      "benchmarks' workloads")
    max_num_batched_tokens: int | None = _knob(None, "the dense batch: most tokens per "
                                               "iteration (default: 1024 on a GPU, 128 on "
                                               "the CPU)")
    max_num_seqs: int | None = _knob(None, "most running sequences (= decode rows of the "
                                     "compiled step, at most the dense batch; default: what "
                                     "the KV cache holds). Either way a request is admitted "
                                     "only while the projected KV use of every running "
                                     "sequence (prompt + max_tokens) fits the cache")
    max_prefill_seqs: int = _knob(16, "most prompt chunks per iteration")
    page_size: int = _knob(16, "tokens per KV page (a power of two)")
    gpu_memory_utilization: float = _knob(0.9, "fraction of the device's total memory the "
                                          "engine takes for weights, KV cache and workspace "
                                          "(XLA's pool must hold it: scripts call nanoflow_jax."
                                          "device_memory.reserve_device_memory before JAX "
                                          "starts)")
    max_model_len: int | None = _knob(None, "most prompt + output tokens per sequence "
                                      "(default: the model's context)")
    num_pages: int | None = _knob(None, "KV cache pages (default: as many as fit in "
                                  "gpu_memory_utilization)")
    attention_impl: str = _knob("auto", "attention kernels: pallas | reference | interpret | "
                                "auto (pallas on a GPU, reference elsewhere)")
    min_bucket: int | None = _knob(None, "smallest compiled token count; buckets are powers of "
                                   "two up to the dense batch (default: 16 on a GPU, a quarter "
                                   "of the dense batch on the CPU, where compiling is slow)")
    schedule: str = _knob("sequential", "nano-batch schedule: an alias (sequential, nano2, "
                          "nano2-pipe-nostreams-min1024, insm, ...), a Schedule or "
                          "ScheduleSpec JSON file, or auto (searched from a cached op profile); "
                          "nanoflow_jax/pipeline/spec.py's docstring lists every form")
    tensor_parallel_size: int = _knob(1, "devices one model is split over (Megatron tensor "
                                      "parallelism on a mesh axis 'tp': attention heads, KV "
                                      "cache, FFN and vocab sharded; 1 runs the unsharded "
                                      "single-device program)")
    schedule_guard: str = _knob("auto", "schedule auto: time the searched schedule and "
                                "sequential at start-up (a few steps of a few layers at the "
                                "dense batch) and keep the searched one only if it measures "
                                "faster by the search's min_gain: on | off | auto (on a GPU)")

    def __post_init__(self):
        checks = [
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             "max_num_batched_tokens must be >= 1"),
            (self.max_num_seqs is None or self.max_num_seqs >= 1,
             "max_num_seqs must be >= 1 (or None: what the KV cache holds)"),
            (self.max_prefill_seqs >= 1, "max_prefill_seqs must be >= 1"),
            (self.page_size >= 1 and not self.page_size & (self.page_size - 1),
             "page_size must be a power of two"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"),
            (self.num_pages is None or self.num_pages >= 1, "num_pages must be >= 1"),
            (self.min_bucket is None or self.min_bucket >= 1, "min_bucket must be >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             "dtype must be auto, float32, bfloat16 or float16"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (self.schedule_guard in ("auto", "on", "off"),
             "schedule_guard must be on, off or auto (on a GPU)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from nanoflow_jax.pipeline.spec import check_schedule_name

        try:
            check_schedule_name(self.schedule, self.max_num_batched_tokens or 1024)
        except ValueError as e:
            raise ValueError(f"schedule: {e}") from None

    def for_backend(self, backend: str) -> "EngineConfig":
        """The knobs left to start-up ("auto", None) resolved for `backend` ("cpu", "gpu")."""
        on_cpu = backend == "cpu"
        dense = self.max_num_batched_tokens or (128 if on_cpu else 1024)
        return dataclasses.replace(
            self,
            dtype=self.dtype if self.dtype != "auto" else "float32" if on_cpu else "bfloat16",
            max_num_batched_tokens=dense,
            min_bucket=self.min_bucket or (max(16, dense // 4) if on_cpu else 16),
        )

    def token_buckets(self) -> tuple[int, ...]:
        """Compiled token counts: powers of two from min_bucket up to the dense batch."""
        if self.min_bucket is None or self.max_num_batched_tokens is None:
            raise ValueError("for_backend() chooses the buckets' knobs before buckets are known")
        buckets, t = [], self.min_bucket
        while t < self.max_num_batched_tokens:
            buckets.append(t)
            t *= 2
        return tuple(buckets) + (self.max_num_batched_tokens,)
