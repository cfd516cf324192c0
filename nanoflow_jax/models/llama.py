"""The LLaMA-family decoder (LLaMA-2/3, Mistral, Qwen2, and with mixture-of-experts MLPs Mixtral
and Qwen2-MoE) as pure functions of a params pytree.

The model runs over a *flat token batch*: token ids `[T]` and positions `[T]` of any mix of
decode tokens and prefill chunks of many sequences, so a nano-batch is a slice of the token
axis. Which tokens may attend to which is the attention function's business (it gets its own
metadata pytree), which keeps attention pluggable: a dense jnp reference, paged kernels, ...

Params pytree (weights stored `[in, out]` so every projection is `x @ w`):
    embed       [V, D]
    layers      list of L dicts:
        attn_norm   [D]
        wqkv        [D, (Hq + 2·Hkv)·Dh]   q, k and v fused: one GEMM (NanoFlow's "qkv" op)
        bqkv        [(Hq + 2·Hkv)·Dh]       only when config.attention_bias (Qwen2)
        wo          [Hq·Dh, D]
        mlp_norm    [D]
        w_gate_up   [D, 2·F]                gate and up fused: one GEMM ("up_gate")
        w_down      [F, D]
        (an MoE layer has a router and experts instead of w_gate_up / w_down: models/moe.py)
    final_norm  [D]
    lm_head     [D, V]                      absent when config.tie_word_embeddings

Tensor parallelism (`nanoflow_jax.parallel`) runs these same functions inside `shard_map` with
a per-shard config (`config.tp_axis` set, head / FFN sizes divided): the residual stream `x` is
then a *partial sum* over the shards (each holds its share of the embedding and of every o_proj
and down output), and the ops that normalise it (`qkv_proj`, `up_gate_proj`, `compute_logits`)
all-reduce it first. That is Megatron's two all-reduces per layer, each fused with the norm
that follows it, and the code runs unchanged at tp_axis None.

Layers are a Python list, unrolled at trace time, rather than a `lax.scan` over stacked
weights: each layer's weights and KV cache are then separate buffers (no dynamic slices of a
stacked cache, which XLA would copy before a custom call), and the nano-batch pipeline can
interleave ops across layer boundaries.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models import moe

Params = dict[str, Any]

# attention(q [T,Hq,Dh], k [T,Hkv,Dh], v [T,Hkv,Dh], layer_cache, metadata, window=None)
#   -> (out [T,Hq,Dh], layer_cache).  q and k already carry RoPE; `window` (static): the
#   layer's sliding window, each query sees the last `window` positions up to its own.
AttentionFn = Callable[..., tuple[jax.Array, Any]]


def layer_attention(attention: AttentionFn, config: ModelConfig, layer: int) -> AttentionFn:
    """`attention` with layer `layer`'s sliding window bound (itself when the layer has none)."""
    window = config.layer_window(layer)
    return attention if window is None else functools.partial(attention, window=window)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """[T, D] -> [T, D]. Statistics in fp32; scaled in the input dtype, as HF does."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] (float64 on the host), with llama3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    old_ctx = s.original_max_position_embeddings
    low_freq_wavelen = old_ctx / s.low_freq_factor
    high_freq_wavelen = old_ctx / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF's rotate-half convention. x [T, H, Dh], positions [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(freqs)[:, None, :].astype(x.dtype)  # [T, 1, Dh/2]
    sin = jnp.sin(freqs)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reduce_residual(x: jax.Array, config: ModelConfig) -> jax.Array:
    """The residual stream summed over the tensor-parallel shards ([T, D]; a no-op without)."""
    return x if config.tp_axis is None else jax.lax.psum(x, config.tp_axis)


def embed_tokens(embed: jax.Array, token_ids: jax.Array, config: ModelConfig) -> jax.Array:
    """token ids [T] -> [T, D]. Under tensor parallelism `embed` is this shard's vocab rows
    [V/tp, D] and tokens outside them give zeros (the partial residual); an embedding kept
    whole ([V, D], vocab not divisible by tp) counts on shard 0 only."""
    if config.tp_axis is None:
        return embed[token_ids]
    shard = jax.lax.axis_index(config.tp_axis)
    rows = embed.shape[0]
    if rows == config.vocab_size:
        return jnp.where(shard == 0, embed[token_ids], jnp.zeros((), embed.dtype))
    local = token_ids - shard * rows
    mine = (local >= 0) & (local < rows)
    return jnp.where(mine[:, None], embed[jnp.clip(local, 0, rows - 1)],
                     jnp.zeros((), embed.dtype))


# ---- the ops of one layer (the pipeline executor schedules these on token slices) ----------


# `matmul` computes every projection's GEMM: jnp.matmul, or a pipeline schedule's persistent
# GEMM on a share of the SMs (pallas_kernels/persistent_matmul.py).


def qkv_proj(layer: Params, x: jax.Array, config: ModelConfig, matmul=jnp.matmul) -> jax.Array:
    """Pre-attention norm + fused q/k/v GEMM: x [T, D] -> qkv [T, (Hq + 2·Hkv)·Dh]."""
    h = rms_norm(reduce_residual(x, config), layer["attn_norm"], config.rms_norm_eps)
    qkv = matmul(h, layer["wqkv"])
    if "bqkv" in layer:
        qkv = qkv + layer["bqkv"]
    return qkv


def split_rope(
    qkv: jax.Array, positions: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv [T, ·] -> q [T, Hq, Dh], k [T, Hkv, Dh] (both rotated), v [T, Hkv, Dh]."""
    t, dh = qkv.shape[0], config.head_dim
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    inv_freq = rope_inv_freq(config)
    q = apply_rope(q.reshape(t, config.num_heads, dh), positions, inv_freq)
    k = apply_rope(k.reshape(t, config.num_kv_heads, dh), positions, inv_freq)
    return q, k, v.reshape(t, config.num_kv_heads, dh)


def o_proj(layer: Params, attn: jax.Array, residual: jax.Array, matmul=jnp.matmul) -> jax.Array:
    """attn [T, Hq, Dh] -> residual + attn·Wo, [T, D]."""
    return residual + matmul(attn.reshape(attn.shape[0], -1), layer["wo"])


def up_gate_proj(layer: Params, x: jax.Array, config: ModelConfig,
                 matmul=jnp.matmul) -> jax.Array:
    """Pre-MLP norm + fused gate/up GEMM: x [T, D] -> [T, 2·F].

    A mixture-of-experts layer (one with a "router") runs its whole expert block here
    instead, -> [T, D] (`moe.moe_block`), and `down_proj` only adds it to the residual."""
    h = rms_norm(reduce_residual(x, config), layer["mlp_norm"], config.rms_norm_eps)
    if "router" in layer:
        return moe.moe_block(layer, h, config, matmul)
    return matmul(h, layer["w_gate_up"])


def down_proj(layer: Params, gate_up: jax.Array, residual: jax.Array,
              matmul=jnp.matmul) -> jax.Array:
    """SwiGLU then the down GEMM: gate_up [T, 2·F] -> residual + (silu(g)·u)·Wdown, [T, D]."""
    if "router" in layer:  # gate_up is the expert block's output [T, D]
        return residual + gate_up
    return residual + matmul(swiglu(gate_up), layer["w_down"])


def swiglu(gate_up: jax.Array) -> jax.Array:
    """[T, 2·F] -> silu(gate)·up, [T, F]."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def decoder_layer(
    layer: Params,
    x: jax.Array,
    positions: jax.Array,
    layer_cache: Any,
    attn_metadata: Any,
    config: ModelConfig,
    attention: AttentionFn,
) -> tuple[jax.Array, Any]:
    """One layer, the plain sequential schedule: x [T, D] -> [T, D]."""
    q, k, v = split_rope(qkv_proj(layer, x, config), positions, config)
    attn, layer_cache = attention(q, k, v, layer_cache, attn_metadata)
    x = o_proj(layer, attn, x)
    x = down_proj(layer, up_gate_proj(layer, x, config), x)
    return x, layer_cache


def run_layers(
    layers: list[Params],
    x: jax.Array,
    positions: jax.Array,
    kv_cache: list | None,
    attn_metadata: Any,
    config: ModelConfig,
    attention: AttentionFn,
) -> tuple[jax.Array, list | None]:
    """Every layer in turn, each the sequential `decoder_layer`: x [T, D] -> [T, D]."""
    new_cache = []
    for i, layer in enumerate(layers):
        layer_cache = None if kv_cache is None else kv_cache[i]
        x, layer_cache = decoder_layer(layer, x, positions, layer_cache, attn_metadata, config,
                                       layer_attention(attention, config, i))
        new_cache.append(layer_cache)
    return x, None if kv_cache is None else new_cache


def compute_logits(
    params: Params, x: jax.Array, config: ModelConfig
) -> jax.Array:
    """Final norm + LM head over the selected hidden states: x [N, D] -> fp32 logits [N, V]
    (under tensor parallelism [N, V/tp], this shard's vocab columns, when the head is split)."""
    h = rms_norm(reduce_residual(x, config), params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.dot(h, head, preferred_element_type=jnp.float32)


def forward(
    params: Params,
    config: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    kv_cache: list | None,
    attn_metadata: Any,
    logits_indices: jax.Array | None,
    attention: AttentionFn,
    layers_fn: Callable = run_layers,
    head: bool = True,
) -> tuple[jax.Array, list | None]:
    """The whole model over a flat token batch.

    token_ids, positions: [T] int32. kv_cache: a list with one entry per layer, handed to the
    attention function (or None when attention needs no cache). logits_indices: [N] token
    indices whose logits are wanted (None: all T). `layers_fn` runs the layers (`run_layers`, the
    sequential schedule, or a nano-batch schedule from `nanoflow_jax.pipeline`). Returns
    (fp32 logits [N, V], kv_cache); with `head` False the hidden states instead, [N, D] summed
    over the tensor-parallel shards, for `compute_logits` to finish in another program.

    `layers_fn` binds each layer's sliding window to `attention` (`layer_attention`).
    """
    x = embed_tokens(params["embed"], token_ids, config)  # [T, D]
    x, kv_cache = layers_fn(params["layers"], x, positions, kv_cache, attn_metadata, config,
                            attention)
    if logits_indices is not None:
        x = x[logits_indices]
    if not head:
        return reduce_residual(x, config), kv_cache
    return compute_logits(params, x, config), kv_cache
