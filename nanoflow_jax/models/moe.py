"""The mixture-of-experts MLP block (Mixtral, Qwen2-MoE) over a flat token batch.

Routing is per token, so the block runs on any slice of the token axis (a nano-batch) and
gives each token the same result as in the whole batch. For tokens h [T, D] (already
normalised by the layer's mlp_norm):

    router logits  h · Wr                              [T, E]   in h's dtype, as HF
    probabilities  softmax over all E experts, fp32    [T, E]
    top k          weights [T, k], experts [T, k]      renormalised to sum 1 if norm_topk_prob
    experts        each (token, slot) pair through its expert's SwiGLU MLP
    output         Σ_k weight · expert output           [T, D]
                   + sigmoid(h · Wg) · shared SwiGLU MLP(h), when the model has a shared expert

Mixtral always renormalises its top-2 weights; Qwen2-MoE does when `norm_topk_prob` (false in
the released checkpoints) and adds the gated shared expert.

The experts run as two grouped GEMMs over all T·k pairs at once: pairs are sorted by expert
(a stable argsort), so expert e's rows are one contiguous block of `group_sizes[e]` rows, and
`grouped_matmul` multiplies each block by its own expert's weights, the FLOPs of the routed
rows only. No loop over experts, and the shapes are static: only the group sizes vary.

Layer params of an MoE layer (the attention keys are llama.py's):
    router            [D, E]
    experts_gate_up   [E, D, 2F]    gate and up fused per expert (F = moe_intermediate_size)
    experts_down      [E, F, D]
    shared_gate_up    [D, 2Fs]      only with a shared expert (Fs = shared_expert_intermediate_size)
    shared_down       [Fs, D]
    shared_gate       [D, 1]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig

Params = dict[str, Any]

GEMM_IMPLS = ("xla", "mosaic")
# The Mosaic GPU grouped GEMM's tiling (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu).
MOSAIC_BLOCK_M, MOSAIC_BLOCK_N, MOSAIC_BLOCK_K = 128, 128, 64
MOSAIC_STEPS = 4  # K blocks in flight (the TMA pipeline's depth)


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] fp32, experts [T, k] int32).

    Softmax over all E experts in fp32, then the k largest; renormalised to sum 1 when
    `normalize` (Mixtral; Qwen2-MoE with norm_topk_prob), as HF's routers do.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """experts [T, k] -> (order [T·k], group_sizes [E]).

    order[i] is the (token·k + slot) index of the i-th pair when pairs are sorted by expert
    (stable: by token within an expert); group_sizes[e] counts the pairs routed to expert e.
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return order, group_sizes


def default_gemm_impl(dtype, k_dim: int, n_dim: int) -> str:
    """"mosaic" (JAX's Hopper grouped GEMM) on an sm_90 GPU for 16-bit operands whose shapes
    its tiling divides; "xla" (`lax.ragged_dot`) elsewhere.

    Why not `lax.ragged_dot` on the GPU: XLA's RaggedDotRewriter turns it into a dense dot over
    all E groups (E times the FLOPs) unless the cuDNN ragged-dot fusion is available
    (`--xla_gpu_experimental_use_ragged_dot_fusion`, cuDNN >= 9.22).
    """
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    if getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        return "xla"
    if k_dim % MOSAIC_BLOCK_K or n_dim % MOSAIC_BLOCK_N:
        return "xla"
    return "mosaic"


def mosaic_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                          block_m: int = MOSAIC_BLOCK_M, block_n: int = MOSAIC_BLOCK_N,
                          block_k: int = MOSAIC_BLOCK_K,
                          steps: int = MOSAIC_STEPS) -> jax.Array:
    """`grouped_matmul` by JAX's persistent Hopper kernel (TMA + WGMMA, one CTA per SM,
    `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, the same in JAX 0.10.2 and 0.11).
    K must be a multiple of block_k and N of block_n. Shared memory at the default tiles:
    `steps` (4) pipeline steps × (128×64 + 64×128) × 2 B + a 32 KiB epilogue = 160 KiB of 227."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    m, n = x.shape[0], w.shape[2]
    if x.shape[1] % block_k or n % block_n:
        raise ValueError(f"mosaic grouped GEMM needs K % {block_k} == 0 and N % {block_n} == 0,"
                         f" got K={x.shape[1]}, N={n}")
    # Rows padded to whole row blocks: the pad rows belong to no group, their output is
    # never written, and they are sliced off.
    padded = -(-m // block_m) * block_m
    x = jnp.pad(x, ((0, padded - m), (0, 0)))
    grid_n = n // block_n
    grid_block_n = next(b for b in (8, 4, 2, 1) if grid_n % b == 0)  # L2 tile grouping
    out = ragged_dot_mgpu.ragged_dot(
        x, w.astype(x.dtype), group_sizes=group_sizes, block_m=block_m, block_n=block_n,
        block_k=block_k, max_concurrent_steps=steps, grid_block_n=grid_block_n)
    return out[:m]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   impl: str | None = None) -> jax.Array:
    """x [M, K] with rows grouped by expert, w [E, K, N], group_sizes [E] (sum <= M) ->
    [M, N]: row block e times w[e]. Rows past sum(group_sizes) are unspecified.

    impl: "xla" (`jax.lax.ragged_dot`), "mosaic" (JAX's Mosaic GPU kernel
    `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, Hopper only), None: `default_gemm_impl`.
    """
    impl = impl or default_gemm_impl(x.dtype, w.shape[1], w.shape[2])
    if impl == "xla":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    if impl == "mosaic":
        return mosaic_grouped_matmul(x, w, group_sizes)
    raise ValueError(f"grouped GEMM impl must be one of {GEMM_IMPLS}, got {impl!r}")


def swiglu(gate_up: jax.Array) -> jax.Array:
    """[N, 2F] (gate then up) -> silu(gate) · up, [N, F]."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def routed_experts(h: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array, impl: str | None = None) -> jax.Array:
    """Σ_k weights[t, k] · expert_{experts[t, k]}(h[t]): h [T, D] -> [T, D].

    Expert e is SwiGLU with w_gate_up[e] [D, 2F] and w_down[e] [F, D].
    """
    t, k = experts.shape
    order, group_sizes = sort_by_expert(experts, w_gate_up.shape[0])
    rows = h[order // k]  # [T·k, D]: each pair's token, grouped by expert
    act = swiglu(grouped_matmul(rows, w_gate_up, group_sizes, impl))  # [T·k, F]
    out = grouped_matmul(act, w_down, group_sizes, impl)  # [T·k, D]
    # Back to (token, slot) order: pair p sits at sorted position inverse[p].
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))
    out = out[inverse].reshape(t, k, -1)
    combined = jnp.einsum("tk,tkd->td", weights, out, preferred_element_type=jnp.float32)
    return combined.astype(h.dtype)


def moe_block(layer: Params, h: jax.Array, config: ModelConfig, matmul=jnp.matmul,
              impl: str | None = None) -> jax.Array:
    """The expert block of one layer: normalised h [T, D] -> [T, D] (no residual).

    `matmul` computes the shared expert's GEMMs: jnp.matmul, or a pipeline schedule's GEMM on
    a share of the SMs (the router's and the shared gate's few columns stay jnp.matmul).
    `impl` picks the grouped GEMM (`grouped_matmul`).
    """
    logits = h @ layer["router"]  # [T, E] in h's dtype, as HF's router
    weights, experts = route(logits, config.num_experts_per_tok, config.norm_topk_prob)
    out = routed_experts(h, weights, experts, layer["experts_gate_up"], layer["experts_down"],
                         impl)
    if "shared_gate_up" in layer:
        shared = matmul(swiglu(matmul(h, layer["shared_gate_up"])), layer["shared_down"])
        gate = jax.nn.sigmoid(h @ layer["shared_gate"])  # [T, 1]
        out = out + gate * shared
    return out


def moe_block_reference(layer: Params, h: jax.Array, config: ModelConfig) -> jax.Array:
    """`moe_block` the obvious way, for tests: every expert on every token, fp32, weights of
    the unrouted experts 0. Costs E times the FLOPs; not for the engine."""
    h32 = h.astype(jnp.float32)
    logits = (h @ layer["router"]).astype(jnp.float32)
    weights, experts = route(logits, config.num_experts_per_tok, config.norm_topk_prob)
    num_experts = layer["router"].shape[1]
    dense_weights = jnp.sum(jax.nn.one_hot(experts, num_experts) * weights[..., None], axis=1)
    gate_up = jnp.einsum("td,edf->etf", h32, layer["experts_gate_up"].astype(jnp.float32))
    every = jnp.einsum("etf,efd->etd", swiglu(gate_up), layer["experts_down"].astype(jnp.float32))
    out = jnp.einsum("te,etd->td", dense_weights, every)
    if "shared_gate_up" in layer:
        f32 = {k: v.astype(jnp.float32) for k, v in layer.items() if k.startswith("shared")}
        shared = swiglu(h32 @ f32["shared_gate_up"]) @ f32["shared_down"]
        out = out + jax.nn.sigmoid(h32 @ f32["shared_gate"]) * shared
    return out
