"""The in-SM schedule (`--schedule=insm`): each layer's decode attention runs inside the up/gate
GEMM of the batch's prompt rows, one Mosaic GPU kernel whose CTAs hold warpgroups of both
(`pallas_kernels/experimental/gemm_attention_mgpu.py`), so the GEMM keeps every SM's tensor
cores while the attention streams the KV cache (docs/overlap.md, section 3, measures the pair).

The bucket's rows split at a static row `split` (`Schedule.in_sm_rows`): nano-batch A is
rows [0, split), which holds the decode rows when there are at most `split` of them, and
nano-batch B rows [split, T), prompt rows then. A layer runs

    qkv, RoPE, K/V write             all T rows
    prompt attention                 all T rows (decode rows take theirs below)
    decode attention of B's rows     only when the bucket has more decode rows than `split`
    o_proj(B), the MLP norm of B
    [ up_gate(B) | decode attention of A ]      one kernel
    o_proj(A), up_gate(A)
    SwiGLU, down                     all T rows

B's up/gate reads nothing A's attention writes, so the two run together; the rest is the
sequential layer's work, cut in two where A waits for its attention. The split is static and the
decode count is not: a bucket with more decode rows than `split` attends the rest before B's
o_proj (correct, not overlapped), one with fewer runs some prompt rows in A.

On the CPU (attention impl "reference") the kernel is its reference, the GEMM and the decode
attention one after the other, which is how the tests compare the schedule with the sequential
one. Bounds: one device, no sliding windows, no mixture-of-experts layers, page tables of at
most 256 pages (the kernel's one TMA copy per row); each fails when the step is traced, naming
the schedule. On an H200 the step measures 0.97–1.00× of sequential: the GPU runs both at its
power limit, and the overlap lowers the clock (docs/overlap.md, section 3).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.kv_cache import write_kv
from nanoflow_jax.models import llama
from nanoflow_jax.models import paged_attention as pa

# A "beside" op: (a [M, K], b [K, N], q [B, Hq, D], k_pages, v_pages, page_tables [B, ·],
# lengths [B]) -> (a @ b [M, N], decode attention [B, Hq, D]), the two run together.


def separate_beside(a, b, q, k_pages, v_pages, page_tables, lengths, *, impl: str):
    """The GEMM, then the decode attention of the attention impl `impl` (two kernels, or the
    fused kernel's reference)."""
    return jnp.matmul(a, b), pa.decode_rows(q, k_pages, v_pages, page_tables, lengths,
                                            impl=impl)


def kernel_beside(a, b, q, k_pages, v_pages, page_tables, lengths, *, interpret: bool = False):
    """`gemm_beside_attention` on every SM, in its default tuning (the fastest measured; its
    shared memory holds page-table rows of `decode_attention_mgpu.MAX_TABLE_PAGES` pages at
    head_dim 128)."""
    from pallas_kernels.decode_attention_mgpu import MAX_TABLE_PAGES, supports
    from pallas_kernels.experimental.gemm_attention_mgpu import Tuning, gemm_beside_attention

    if not supports(q.shape[1], k_pages.shape, q.dtype):
        raise ValueError(f"schedule insm: the in-SM kernel does not take {q.shape[1]} query "
                         f"heads over a {k_pages.shape} {q.dtype} cache; choose another "
                         f"--schedule")
    if page_tables.shape[1] > MAX_TABLE_PAGES:
        raise ValueError(f"schedule insm: the in-SM kernel copies page-table rows of at most "
                         f"{MAX_TABLE_PAGES} pages (one TMA copy), got {page_tables.shape[1]}; "
                         f"lower --max_model_len to {MAX_TABLE_PAGES * k_pages.shape[2]} or "
                         f"less")
    tuning = Tuning()
    if b.shape[1] % tuning.tile_n or b.shape[0] % tuning.tile_k:
        raise ValueError(f"schedule insm: the up/gate GEMM {b.shape} is not a multiple of the "
                         f"kernel's {tuning.tile_k} x {tuning.tile_n} tiles; choose another "
                         f"--schedule")
    return gemm_beside_attention(a, b, q, k_pages, v_pages, page_tables, lengths,
                                 sm_scale=q.shape[2] ** -0.5, tuning=tuning,
                                 interpret=interpret)


def beside_for(impl: str, fused: bool = True):
    """The GEMM-beside-attention op of an attention impl (`fused` False: two kernels)."""
    if impl == "reference" or not fused:
        return functools.partial(separate_beside, impl=impl)
    return functools.partial(kernel_beside, interpret=impl == "interpret")


def attention_impl(attention) -> str:
    """The impl `attention` (a `paged_attention.attention_fn`) runs."""
    if not (isinstance(attention, functools.partial) and attention.func is pa.paged_attention):
        raise ValueError("schedule insm needs the paged KV cache's attention (attention_fn)")
    return attention.keywords["impl"]


def in_sm_layer(layer, x, positions, layer_cache, meta: pa.PagedMetadata, config: ModelConfig,
                split: int, impl: str, beside) -> tuple[jax.Array, tuple]:
    """One layer in the module doc's order: x [T, D] -> [T, D], the layer's cache."""
    t, bd = x.shape[0], meta.decode_lengths.shape[0]
    q, k, v = llama.split_rope(llama.qkv_proj(layer, x, config), positions, config)
    k_pages, v_pages = write_kv(*layer_cache, k, v, meta.slots)
    prompt = pa.prefill_rows(q, k_pages, v_pages, meta, impl=impl)  # [T, Hq, Dh]
    is_decode = pa.is_decode_row(meta, t)[:, None, None]

    def attend(rows: slice):  # the decode attention of q[rows], rows inside [0, bd)
        return pa.decode_rows(q[rows], k_pages, v_pages, meta.decode_page_tables[rows],
                              meta.decode_lengths[rows], impl=impl)

    def with_decodes(start: int, end: int, decoded):  # decoded: rows start.. of [start, end)
        pad = ((0, end - start - decoded.shape[0]), (0, 0), (0, 0))
        return jnp.where(is_decode[start:end], jnp.pad(decoded, pad), prompt[start:end])

    attn_b = with_decodes(split, t, attend(slice(split, bd))) if bd > split else prompt[split:]
    x_b = llama.o_proj(layer, attn_b, x[split:])  # [T - split, D]
    h_b = llama.rms_norm(x_b, layer["mlp_norm"], config.rms_norm_eps)
    a_decodes = min(split, bd)
    if a_decodes:
        gate_up_b, decoded = beside(h_b, layer["w_gate_up"], q[:a_decodes], k_pages, v_pages,
                                    meta.decode_page_tables[:a_decodes],
                                    meta.decode_lengths[:a_decodes])
        attn_a = with_decodes(0, split, decoded)
    else:
        gate_up_b, attn_a = jnp.matmul(h_b, layer["w_gate_up"]), prompt[:split]
    x_a = llama.o_proj(layer, attn_a, x[:split])  # [split, D]
    gate_up_a = llama.up_gate_proj(layer, x_a, config)
    act = jnp.concatenate([llama.swiglu(gate_up_a), llama.swiglu(gate_up_b)])  # [T, F]
    return jnp.concatenate([x_a, x_b]) + act @ layer["w_down"], (k_pages, v_pages)


def run_layers(split: int, layers, x, positions, kv_cache, meta, config: ModelConfig, attention,
               beside=None, fused: bool = True):
    """`llama.run_layers` with every layer the in-SM layer, its decode nano-batch rows
    [0, split). `beside`: the GEMM-beside-attention op (None: `beside_for` the attention's
    impl and `fused`)."""
    if config.tp_axis is not None:
        raise ValueError("schedule insm runs on one device; choose another --schedule for "
                         "--tensor_parallel_size > 1")
    if any(config.layer_window(i) is not None for i in range(len(layers))):
        raise ValueError("schedule insm has no sliding windows (the in-SM kernel attends the "
                         "whole context); choose another --schedule for this model")
    if any("router" in layer for layer in layers):
        raise ValueError("schedule insm has no mixture-of-experts layers; choose another "
                         "--schedule for this model")
    if kv_cache is None:
        raise ValueError("schedule insm needs the paged KV cache")
    impl = attention_impl(attention)
    beside = beside or beside_for(impl, fused)
    new_cache = []
    for layer, layer_cache in zip(layers, kv_cache):
        x, layer_cache = in_sm_layer(layer, x, positions, layer_cache, meta, config, split,
                                     impl, beside)
        new_cache.append(layer_cache)
    return x, new_cache
