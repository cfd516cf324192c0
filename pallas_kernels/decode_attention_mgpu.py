"""Paged GQA decode attention on a fixed number of CTAs (Mosaic GPU, Hopper).

Why a second decode kernel: to overlap the decode attention with GEMMs, NanoFlow gives it a
third of the SMs, and from a third of the SMs it must still read the KV cache near HBM speed.
The Triton kernel (`decode_attention.py`) cannot: its cp.async pipeline keeps too few bytes in
flight per SM (0.78 TB/s from 33 SMs at best on an H100, docs/overlap.md). Here a producer
warpgroup streams whole pages with TMA bulk copies into a ring of `stages` KV blocks, so
`stages` x 2 x block_kv x D x 2 B are in flight per CTA (4 x 32 KiB by default).

Layout and work split (the same KV cache layout as the Triton kernel):
  * k_pages, v_pages: [Hkv, P, page_size, D]; one (KV head, page) is a contiguous
    [page_size, D] tile, one TMA copy.
  * A work item is one (sequence, KV head): the GQA group of `Hq / Hkv` query heads, padded
    to 8 rows. CTA c of `num_programs` runs items c, c + num_programs, ...
  * The last warpgroup (producer) reads the item's page-table row into shared memory, then
    for each block of `pages_per_block` pages issues one TMA copy per page for K and for V
    into the ring slot, after its consumer has released it. Pages past the sequence's end
    re-read its last page (masked), so every block has the same number of copies.
  * The first `consumers` warpgroups (1 or 2) compute. Consumer c takes the ring's blocks
    g with g % consumers == c, so an item's blocks alternate between them: each computes
    S = Q K^T with WGMMA (Q padded to 64 rows in shared memory; only the first 8 are real),
    masks columns past the length, runs the online softmax in fp32 (base 2) and accumulates
    P V with WGMMA, releasing each slot's K and V as soon as their WGMMA is done. At the
    item's end consumer 1 hands (m, l, acc) to consumer 0 through shared memory, which
    merges the two softmaxes and writes the output. Why two: one consumer's chain (WGMMA,
    wait, softmax, WGMMA, wait) is latency-bound; a second one fills its gaps (1.2x from
    33-44 CTAs on an H100, docs/overlap.md).

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
            table_smem, acc_smem, m_smem, l_smem, q_bar, table_bar, k_bar, v_bar, k_free,
            v_free, merge_full, merge_free, *, num_programs: int, num_kv_heads: int,
            page_size: int, pages_per_block: int, stages: int, consumers: int,
            scale_log2: float, interpret: bool):
    """q_ref/o_ref [items, 8, D]; k_ref/v_ref [Hkv, P, page_size, D]; tables_ref [B, P_max].
    q_smem [consumers, 64, D]; acc_smem [64, D] fp32 and m_smem/l_smem [64] fp32 carry
    consumer 1's partial result to consumer 0 (unused with one consumer)."""
    num_items = q_ref.shape[0]
    block_kv = pages_per_block * page_size
    head_dim = q_ref.shape[2]
    wg = lax.axis_index("wg")
    cta = lax.axis_index("programs")
    my_items = (num_items - cta + num_programs - 1) // num_programs
    # Loop carries need the WGMMA register layout up front; the CPU interpreter has no layouts.
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    rows = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector, one value per WGMMA row

    def load(ref, layout):
        return ref[...] if interpret else _compat.mgpu_load(ref, layout)

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

    def bcast(row_vec, like):  # [64] per row -> like's [64, n]
        return lax.broadcast_in_dim(row_vec, like.shape, [0])

    def consumer(c: int):
        """Consumer c takes the ring's blocks g with g % consumers == c (so the slots
        s % consumers == c): each item's KV is split between the consumers, and consumer 0
        merges the partial softmaxes."""
        q_mine = q_smem.at[c]

        def one_item(i, step):  # step: KV blocks of earlier items (ring position)
            item, _, _, length, n_blocks = item_of(i)
            if c == 0:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left q_mine
            plgpu.copy_gmem_to_smem(q_ref.at[item], q_mine.at[pl.ds(0, _ROWS)], q_bar.at[c])
            plgpu.barrier_wait(q_bar.at[c])
            acc = cast(jnp.zeros((_WGMMA_M, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m_i = cast(jnp.full((_WGMMA_M,), -jnp.inf, jnp.float32), rows)
            l_i = cast(jnp.zeros((_WGMMA_M,), jnp.float32), rows)
            first = lax.rem(c + consumers - lax.rem(step, consumers), consumers)
            mine = (n_blocks - first + consumers - 1) // consumers

            def one_block(n, carry):
                acc, m_i, l_i = carry
                j = first + n * consumers  # the item's block
                slot = lax.rem(step + j, stages)
                plgpu.barrier_wait(k_bar.at[slot])

                s = matmul(q_mine, k_smem.at[slot], block_kv, transpose_b=True)
                plgpu.barrier_arrive(k_free.at[slot])
                col = (lax.broadcasted_iota(jnp.int32, (_WGMMA_M, block_kv), 1) if interpret
                       else plgpu.broadcasted_iota(jnp.int32, (_WGMMA_M, block_kv), 1,
                                                   layout=plgpu.Layout.WGMMA))
                s = jnp.where(j * block_kv + col < length, s * scale_log2, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - bcast(m_new, s))
                l_i = l_i * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_bar.at[slot])

                pv_block = matmul(p.astype(v_smem.dtype), v_smem.at[slot], head_dim)
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * bcast(alpha, acc) + pv_block
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, mine, one_block, (acc, m_i, l_i))
            if c > 0:  # hand the partial result (m, l, acc) to consumer 0
                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(merge_free)

                acc_smem[...] = acc
                m_smem[...] = m_i
                l_smem[...] = l_i
                plgpu.barrier_arrive(merge_full)
                return step + n_blocks
            if consumers > 1:
                plgpu.barrier_wait(merge_full)
                acc_1 = load(acc_smem, plgpu.Layout.WGMMA)
                m_1, l_1 = load(m_smem, rows), load(l_smem, rows)
                plgpu.barrier_arrive(merge_free)
                m_new = jnp.maximum(m_i, m_1)
                # -inf where neither consumer saw a token (length 0): keep exp2 finite.
                m_new = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
                alpha, alpha_1 = jnp.exp2(m_i - m_new), jnp.exp2(m_1 - m_new)
                l_i = l_i * alpha + l_1 * alpha_1
                acc = acc * bcast(alpha, acc) + acc_1 * bcast(alpha_1, acc)
            # Rows of an empty sequence (length 0) have l = 0 and stay exact zeros.
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            acc = acc / bcast(l_safe, acc)
            q_mine[...] = acc.astype(q_mine.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_mine.at[pl.ds(0, _ROWS)], o_ref.at[item])
            return step + n_blocks

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        if c == 0:
            plgpu.wait_smem_to_gmem(0)
        else:  # consumer 0's last read, so no barrier phase is left unobserved
            @pl.when(my_items > 0)
            def _():
                plgpu.barrier_wait(merge_free)

    for c in range(consumers):
        pl.when(wg == c)(functools.partial(consumer, c))

    @pl.when(wg == consumers)
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
    consumers: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D]
    """Paged GQA attention of one query token per sequence, on `num_programs` CTAs (None: one
    per SM). `pages_per_block` pages (default: 64 tokens) form one KV block; `stages` blocks
    are in flight per CTA, shared by `consumers` (1 or 2) computing warpgroups that split each
    item's blocks. Sequence b attends to cache slots 0..lengths[b]-1."""
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
    if consumers not in (1, 2) or stages % consumers:
        raise ValueError(f"consumers must be 1 or 2 and divide stages; got {consumers}, "
                         f"{stages}")
    num_items = batch * num_kv_heads
    programs = min(num_programs or _compat.num_sms(), num_items)
    # [B, Hq, D] -> one [8, D] row block per (sequence, KV head), padded with zeros.
    q_items = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                      ((0, 0), (0, 0), (0, _ROWS - group), (0, 0)))
    q_items = q_items.reshape(num_items, _ROWS, head_dim)
    max_pages = page_tables.shape[1]
    # Rows of 128 B: whole TMA rows, and a copy size JAX 0.10's lowering takes.
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, -max_pages % 32)))
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel, num_programs=programs, num_kv_heads=num_kv_heads, page_size=page_size,
        pages_per_block=pages_per_block, stages=stages, consumers=consumers,
        scale_log2=sm_scale * _LOG2E, interpret=interpret)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        scratch_types=[
            # each consumer's q; consumer 0's is then the output's staging buffer
            plgpu.SMEM((consumers, _WGMMA_M, head_dim), q.dtype, transforms=swizzled),
            plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=swizzled),  # K ring
            plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=swizzled),  # V ring
            plgpu.SMEM((tables.shape[1],), jnp.int32),  # the item's page-table row
            # consumer 1's partial acc, m and l for consumer 0 (a token's worth with one)
            plgpu.SMEM((_WGMMA_M if consumers > 1 else 8, head_dim), jnp.float32,
                       transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
            plgpu.SMEM((_WGMMA_M,), jnp.float32),
            plgpu.SMEM((_WGMMA_M,), jnp.float32),
            plgpu.Barrier(num_barriers=consumers),  # a consumer's q arrived
            plgpu.Barrier(),  # table row arrived
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),  # K slot full
            plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),  # V slot full
            plgpu.Barrier(num_barriers=stages),  # K slot consumed
            plgpu.Barrier(num_barriers=stages),  # V slot consumed
            plgpu.Barrier(),  # consumer 1's partial result is in acc/m/l_smem
            plgpu.Barrier(),  # consumer 0 has read it
        ],
        grid=(programs,),
        grid_names=("programs",),
        num_threads=consumers + 1,  # the computing warpgroups, then the TMA producer
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_compat.mosaic_gpu_interpret_params() if interpret else None,
    )
    out = call(lengths.astype(jnp.int32), tables, q_items, k_pages, v_pages)
    return out.reshape(batch, num_kv_heads, _ROWS, head_dim)[:, :, :group].reshape(
        batch, num_q_heads, head_dim)
