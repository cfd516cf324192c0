"""Attention over the paged KV cache for a flat batch: decode tokens first, then prefill chunks.

The batch's first `nd` rows are decode tokens (one per sequence); prompt chunks of prefilling
sequences follow back to back from row `nd`, then padding. Each layer first writes the new
tokens' K/V into their slots, then runs the decode kernel on the first Bd rows (Bd ≥ nd static,
rows past nd have length 0 and cost nothing) and the prefill kernel on the chunks; both read
every key, old and new, from the pages. Only T is a compiled shape: nd varies freely.

`impl` picks the code: "pallas" (the GPU kernels), "interpret" (the same kernels in Pallas'
interpreter, for CPU tests) or "reference" (pure jnp; what the CPU runs by default).

A sliding `window` (the layer's `ModelConfig.layer_window`) limits every query to the last
`window` positions up to its own, and the kernels read only those keys' pages. Pages wholly
below every running sequence's window stay allocated until the sequence ends: freeing them
(and so holding a long sequence in window-many pages) is what comes next.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from nanoflow_jax.kv_cache import write_kv
from pallas_kernels._compat import num_sms
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.decode_attention_mgpu import decode_attention_mgpu, few_cta_tuning, supports
from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_reference


@flax.struct.dataclass
class PagedMetadata:
    slots: jax.Array  # [T] int32 KV slot of each token; -1 for padding
    decode_page_tables: jax.Array  # [Bd, max_pages] int32
    decode_lengths: jax.Array  # [Bd] int32 tokens in cache incl. this one; 0 = padding row
    prefill_page_tables: jax.Array  # [Sp, max_pages] int32
    prefill_query_start: jax.Array  # [Sp + 1] int32 first row of each chunk; [0] = nd
    prefill_seq_lens: jax.Array  # [Sp] int32 tokens in cache incl. this chunk; 0 = unused


def paged_attention(q, k, v, layer_cache, meta: PagedMetadata, *, impl: str,
                    write: bool = True, sm_share: float = 1.0, window: int | None = None):
    """q [T, Hq, D], k/v [T, Hkv, D], layer_cache (k_pages, v_pages) -> ([T, Hq, D], cache).

    `write=False`: the rows' K/V are in the cache already (the pipeline writes them outside a
    side-stream call, which then only reads the cache). `sm_share` < 1 runs the decode kernel
    persistent on that share of the SMs, leaving the rest to the GEMMs beside it: the Mosaic
    GPU kernel (a TMA page ring, fast from few SMs; its `few_cta_tuning`) where it supports
    the shapes, dtype and page-table length, else the Triton kernel's persistent variant.
    """
    k_pages, v_pages = write_kv(*layer_cache, k, v, meta.slots) if write else layer_cache
    out = prefill_rows(q, k_pages, v_pages, meta, impl=impl, window=window)
    t, bd = q.shape[0], meta.decode_lengths.shape[0]
    if bd:  # static: a nano-batch past the decode rows has none
        decoded = decode_rows(q[:bd], k_pages, v_pages, meta.decode_page_tables,
                              meta.decode_lengths, impl=impl, sm_share=sm_share, window=window)
        out = jnp.where(is_decode_row(meta, t)[:, None, None],
                        jnp.pad(decoded, ((0, t - bd), (0, 0), (0, 0))), out)
    return out, (k_pages, v_pages)


def prefill_rows(q, k_pages, v_pages, meta: PagedMetadata, *, impl: str,
                 window: int | None = None) -> jax.Array:
    """The prompt chunks' attention, q [T, Hq, D] -> [T, Hq, D]; rows before
    prefill_query_start[0] belong to no chunk: their values are unspecified."""
    prefill = prefill_attention_reference if impl == "reference" else prefill_attention
    return prefill(q, k_pages, v_pages, meta.prefill_page_tables, meta.prefill_query_start,
                   meta.prefill_seq_lens, sm_scale=q.shape[-1] ** -0.5,
                   interpret=impl == "interpret", window=window)


def decode_rows(q, k_pages, v_pages, page_tables, lengths, *, impl: str, sm_share: float = 1.0,
                window: int | None = None) -> jax.Array:
    """Decode attention of q [B, Hq, D] (one token per sequence; a row of length 0 costs
    nothing) -> [B, Hq, D]. `sm_share`: `paged_attention`'s."""
    interpret = impl == "interpret"
    decode = decode_attention_reference if impl == "reference" else decode_attention
    if sm_share < 1 and impl != "reference":
        if supports(q.shape[1], k_pages.shape, q.dtype, page_tables.shape[1]):
            if window is not None:
                raise ValueError(f"sliding_window={window}: the Mosaic GPU decode kernel (a "
                                 f"schedule's attention on a share of the SMs) has none; "
                                 f"choose a --schedule without an attention SM share")
            decode = functools.partial(decode_attention_mgpu, **few_cta_tuning())
        decode = functools.partial(decode, num_programs=max(1, round(sm_share * num_sms())))
    return decode(q, k_pages, v_pages, page_tables, lengths, sm_scale=q.shape[-1] ** -0.5,
                  interpret=interpret, **({} if window is None else {"window": window}))


def is_decode_row(meta: PagedMetadata, num_rows: int) -> jax.Array:
    """[num_rows] bool: the row is a decode token (the decode rows come first)."""
    return jnp.arange(num_rows) < meta.prefill_query_start[0]


def slice_metadata(meta: PagedMetadata, start: int, end: int) -> PagedMetadata:
    """The metadata of the rows [start, end) alone (a nano-batch), for `paged_attention`.

    A prompt chunk cut by the boundary keeps, on each side, the positions of its own rows: the
    part before `end` sees the sequence as if it ended there (its later tokens are not in the
    cache yet), the part after sees everything before it (written by the earlier nano-batch).
    """
    bd = meta.decode_lengths.shape[0]
    dec_end = max(start, min(end, bd))
    query_start = jnp.clip(meta.prefill_query_start, start, end)
    # Each chunk's rows after `end` (chunks wholly before `start` get 0: they have no rows here).
    later = jnp.maximum(meta.prefill_query_start[1:] - query_start[1:], 0)
    return PagedMetadata(
        slots=meta.slots[start:end],
        decode_page_tables=meta.decode_page_tables[start:dec_end],
        decode_lengths=meta.decode_lengths[start:dec_end],
        prefill_page_tables=meta.prefill_page_tables,
        prefill_query_start=query_start - start,
        prefill_seq_lens=meta.prefill_seq_lens - later,
    )


IMPLS = ("pallas", "interpret", "reference")


@functools.cache
def attention_fn(impl: str = "auto"):
    """The attention function for `llama.forward`; "auto" = kernels on GPU, jnp elsewhere."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS} or 'auto', got {impl!r}")
    return functools.partial(paged_attention, impl=impl)
