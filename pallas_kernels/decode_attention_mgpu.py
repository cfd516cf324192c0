"""Paged GQA decode attention on a fixed number of CTAs (Mosaic GPU, Hopper).

Why a second decode kernel: to overlap the decode attention with GEMMs, NanoFlow gives it a
third of the SMs, and from a third of the SMs it must still read the KV cache near HBM speed.
The Triton kernel (`decode_attention.py`) cannot: its cp.async pipeline keeps too few bytes in
flight per SM (0.78 TB/s from 33 SMs at best, BENCHMARKS.md "Session 4"). Here a producer
warpgroup streams whole pages with TMA bulk copies into a ring of `stages` KV blocks, so
`stages` x 2 x block_kv x D x 2 B are in flight per CTA (4 x 32 KiB by default).

Layout and work split (the same KV cache layout as the Triton kernel):
  * k_pages, v_pages: [Hkv, P, page_size, D]; one (KV head, page) is a contiguous
    [page_size, D] tile, one TMA copy.
  * A work item is one (sequence, KV head): the GQA group of `Hq / Hkv` query heads, padded
    to 8 rows. CTA c of `num_programs` runs items c, c + num_programs, ...
  * Warpgroup 1 (producer) reads the item's page-table row into shared memory, then for each
    block of `pages_per_block` pages issues one TMA copy per page for K and for V into the
    ring slot, after the consumer has released it. Pages past the sequence's end re-read its
    last page (masked), so every block has the same number of copies.
  * Warpgroup 0 (consumer) computes S = Q K^T with WGMMA (Q padded to 64 rows in shared
    memory; only the first 8 are real), masks columns past the length, runs the online
    softmax in fp32 (base 2) and accumulates P V with WGMMA, releasing each slot's K and V
    as soon as their WGMMA is done.

Cache slots past `lengths` are masked out of the softmax but are read: they must hold finite
values (the engine's cache does: zero-initialised, written with finite K/V). A NaN there
would reach the output through 0 x NaN in P V, which the Triton kernel's masked loads avoid.

Runs on the CPU in Mosaic GPU's interpreter (`interpret=True`, tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import check_paged_inputs

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

_ROWS = 8  # query rows stored per work item (the GQA group, padded)
_WGMMA_M = 64  # WGMMA's row count: Q is padded to it in shared memory
_LOG2E = math.log2(math.e)


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem,
            table_smem, q_bar, table_bar, k_bar, v_bar, k_free, v_free, *, num_programs: int,
            num_kv_heads: int, page_size: int, pages_per_block: int, stages: int,
            scale_log2: float, interpret: bool):
    """q_ref/o_ref [items, 8, D]; k_ref/v_ref [Hkv, P, page_size, D]; tables_ref [B, P_max]."""
    num_items = q_ref.shape[0]
    block_kv = pages_per_block * page_size
    head_dim = q_ref.shape[2]
    wg = lax.axis_index("wg")
    cta = lax.axis_index("programs")
    my_items = (num_items - cta + num_programs - 1) // num_programs
    # Loop carries need the WGMMA register layout up front; the CPU interpreter has no layouts.
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast

    def matmul(a, b_ref, n, transpose_b=False):
        """a [64, K] (registers or shared memory) @ b_ref [K, n] (or b_ref.T: [n, K]) in
        shared memory, fp32. WGMMA into a fresh accumulator (the interpreter has no run_state
        to seed one); the interpreter has no transposed WGMMA operands either, so there it is
        a plain dot."""
        if interpret:
            a_val = a if isinstance(a, jax.Array) else a[...]
            b_val = b_ref[...].T if transpose_b else b_ref[...]
            return jnp.dot(a_val, b_val, preferred_element_type=jnp.float32)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref)
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC((_WGMMA_M, n), jnp.float32))

    def item_of(i):
        """(item, sequence, KV head, length, KV blocks) of this CTA's i-th work item."""
        item = cta + i * num_programs
        b = item // num_kv_heads
        length = lengths_ref[b]
        return item, b, item % num_kv_heads, length, (length + block_kv - 1) // block_kv

    @pl.when(wg == 0)
    def _consumer():
        def one_item(i, step):  # step: KV blocks consumed before this item (ring position)
            item, _, _, length, n_blocks = item_of(i)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left q_smem
            plgpu.copy_gmem_to_smem(q_ref.at[item], q_smem.at[pl.ds(0, _ROWS)], q_bar)
            plgpu.barrier_wait(q_bar)
            acc = cast(jnp.zeros((_WGMMA_M, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m_i = cast(jnp.full((_WGMMA_M,), -jnp.inf, jnp.float32),
                       plgpu.Layout.WGMMA.reduce(1))
            l_i = cast(jnp.zeros((_WGMMA_M,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

            def one_block(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(step + j, stages)
                plgpu.barrier_wait(k_bar.at[slot])

                s = matmul(q_smem, k_smem.at[slot], block_kv, transpose_b=True)
                plgpu.barrier_arrive(k_free.at[slot])
                col = (lax.broadcasted_iota(jnp.int32, (_WGMMA_M, block_kv), 1) if interpret
                       else plgpu.broadcasted_iota(jnp.int32, (_WGMMA_M, block_kv), 1,
                                                   layout=plgpu.Layout.WGMMA))
                s = jnp.where(j * block_kv + col < length, s * scale_log2, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_bar.at[slot])

                pv_block = matmul(p.astype(v_smem.dtype), v_smem.at[slot], head_dim)
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_block
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, n_blocks, one_block, (acc, m_i, l_i))
            # Rows of an empty sequence (length 0) have l = 0 and stay exact zeros.
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            q_smem[...] = acc.astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, _ROWS)], o_ref.at[item])
            return step + n_blocks

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        def one_item(i, step):
            _, b, h, length, n_blocks = item_of(i)
            last_page = jnp.maximum((length + page_size - 1) // page_size - 1, 0)
            plgpu.copy_gmem_to_smem(tables_ref.at[b], table_smem, table_bar)
            plgpu.barrier_wait(table_bar)

            def one_block(j, carry):
                g = step + j  # the ring's block count: slot g % stages, its use g // stages
                slot = lax.rem(g, stages)
                pages = [table_smem[jnp.minimum(j * pages_per_block + p, last_page)]
                         for p in range(pages_per_block)]
                for src, dst, ready, free in ((k_ref, k_smem, k_bar, k_free),
                                              (v_ref, v_smem, v_bar, v_free)):
                    @pl.when(g >= stages)  # the slot's previous block is consumed
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    for p, page in enumerate(pages):
                        plgpu.copy_gmem_to_smem(
                            src.at[h, page], dst.at[slot, pl.ds(p * page_size, page_size)],
                            ready.at[slot])
                return carry

            lax.fori_loop(0, n_blocks, one_block, 0)
            return step + n_blocks

        total = lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        for slot in range(stages):  # the consumer's last release of each slot used
            @pl.when(total > slot)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])


def supports(num_q_heads: int, cache_shape: tuple[int, ...], dtype) -> bool:
    """Whether `decode_attention_mgpu` takes these shapes: a GQA group of at most 8 heads,
    head_dim a multiple of 64, pages of a multiple of 8 tokens dividing 64, bf16 or fp16."""
    num_kv_heads, _, page_size, head_dim = cache_shape
    return (num_q_heads % num_kv_heads == 0 and num_q_heads // num_kv_heads <= _ROWS
            and head_dim % 64 == 0 and page_size % 8 == 0 and 64 % page_size == 0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def decode_attention_mgpu(
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,  # [Hkv, P, page_size, D]
    page_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    *,
    sm_scale: float,
    num_programs: int | None = None,
    pages_per_block: int | None = None,
    stages: int = 4,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D]
    """Paged GQA attention of one query token per sequence, on `num_programs` CTAs (None: one
    per SM). `pages_per_block` pages (default: 64 tokens) form one KV block; `stages` blocks
    are in flight per CTA. Sequence b attends to cache slots 0..lengths[b]-1."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Mosaic GPU Pallas backend")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    check_paged_inputs(q, k_pages, v_pages, sm_scale, pow2=False)
    if not supports(num_q_heads, k_pages.shape, q.dtype) or k_pages.dtype != q.dtype:
        raise ValueError(f"takes bf16 or fp16 q and cache of one dtype, a GQA group of at most "
                         f"{_ROWS} heads, head_dim a multiple of 64 and 8-64-token pages; got "
                         f"q {q.shape} {q.dtype}, cache {k_pages.shape} {k_pages.dtype}")
    group = num_q_heads // num_kv_heads
    pages_per_block = pages_per_block or max(1, 64 // page_size)
    block_kv = pages_per_block * page_size
    if block_kv % 64:
        raise ValueError(f"a KV block of {block_kv} tokens: WGMMA needs a multiple of 64")
    num_items = batch * num_kv_heads
    programs = min(num_programs or _compat.num_sms(), num_items)
    # [B, Hq, D] -> one [8, D] row block per (sequence, KV head), padded with zeros.
    q_items = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                      ((0, 0), (0, 0), (0, _ROWS - group), (0, 0)))
    q_items = q_items.reshape(num_items, _ROWS, head_dim)
    max_pages = page_tables.shape[1]
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, -max_pages % 4)))  # 16 B rows
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, num_programs=programs, num_kv_heads=num_kv_heads, page_size=page_size,
        pages_per_block=pages_per_block, stages=stages, scale_log2=sm_scale * _LOG2E,
        interpret=interpret)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        scratch_types=[
            plgpu.SMEM((_WGMMA_M, head_dim), q.dtype, transforms=swizzled),  # q, then out
            plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=swizzled),  # K ring
            plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=swizzled),  # V ring
            plgpu.SMEM((tables.shape[1],), jnp.int32),  # the item's page-table row
            plgpu.Barrier(),  # q arrived
            plgpu.Barrier(),  # table row arrived
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),  # K slot full
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),  # V slot full
            plgpu.Barrier(num_barriers=stages),  # K slot consumed
            plgpu.Barrier(num_barriers=stages),  # V slot consumed
        ],
        grid=(programs,),
        grid_names=("programs",),
        num_threads=2,  # warpgroup 0 computes, warpgroup 1 issues the TMA copies
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_compat.mosaic_gpu_interpret_params() if interpret else None,
    )
    out = call(lengths.astype(jnp.int32), tables, q_items, k_pages, v_pages)
    return out.reshape(batch, num_kv_heads, _ROWS, head_dim)[:, :, :group].reshape(
        batch, num_q_heads, head_dim)
