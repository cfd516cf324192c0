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
  * The last warpgroup (producer) reads the item's page-table row into shared memory (the
    next item's row is fetched while this one's pages are issued), then for each block of
    `pages_per_block` pages issues one TMA copy per page for K and for V into the ring slot,
    after its consumer has released it. Pages past the sequence's end re-read its last page
    (masked), so every block has the same number of copies.
  * The first `consumers` warpgroups compute. Consumer c takes the ring's blocks g with
    g % consumers == c, so an item's blocks are dealt round robin; each consumer keeps its
    own online softmax (fp32, base 2) and releases each slot's K and V as soon as their WGMMA
    is done. At the item's end consumers 1.. hand (m, l, acc) to consumer 0 through shared
    memory, which merges the softmaxes and writes the output.

Two consumer forms (`consumer=`):
  * "rows" (the default): S = Q K^T with Q padded to WGMMA's 64 rows in shared memory (only
    the first 8 are real), P V with P from registers. A consumer's chain (WGMMA, wait,
    softmax over 64 x 64, WGMMA, wait) is latency-bound, and 60 of its 64 rows are padding;
    it takes 1 or 2 consumers (2 fill each other's gaps: 1.2x from 33-44 CTAs on an H100).
  * "swap_ab": the KV tokens are WGMMA's M and the query rows its N = 8, so no tensor-core
    work is padding beyond the 4 -> 8 GQA rows:
        S^T [block_kv, 8] = K [block_kv, D] @ Q^T [D, 8]
        O^T [D, 8]       += V^T [D, block_kv] @ P^T [block_kv, 8]
    V^T is the transposed view of the V slot (WGMMA reads a transposed A from shared memory),
    P goes through shared memory as [8, block_kv] (WGMMA's B is always there). A thread holds
    4 values of S^T and 8 of O^T instead of 32 and 64, so a CTA can run up to 4 consumers.
    The softmax reduces along axis 0, across the warpgroup's warps: the max once per block
    (Mosaic GPU's cross-warp reduction, through shared memory), the row sum l once per item
    (each thread keeps partial sums of its own S^T entries until then). Each consumer's Q is
    double-buffered: the next item's Q is fetched while this one computes. Its transposed
    stores into swizzled shared memory (P, the output) need Mosaic GPU's warpgroup lowering
    (JAX 0.11's default; 0.10 lowers them in neither). stages=6 with 2 or 3 consumers fills
    215-226 KiB of the 227 KiB of shared memory (6 x 32 KiB in flight).
    Mosaic GPU gives every cross-warp reduction of a kernel the same shared-memory scratch
    (at the shared memory in use where the reduction is lowered), so two consumer warpgroups
    reducing at once would overwrite each other's partials. Consumer c is therefore lowered
    inside c nested collective `run_scoped` pads of that scratch's size (entered by every
    warpgroup at the start, before any of them waits on anything): its reductions use their
    own bytes.
    The form's pieces serve other kernels too (`gemm_attention_mgpu` runs them beside a GEMM):
    `swap_ab_scratch` (its shared memory and barriers by name), `swap_ab_roles` (the consumers
    and the producer as functions of those refs), `lower_roles` (each role under its
    warpgroup, the consumers under their pads), `make_plan`, `prepare` and `heads_of_items`.

Cache slots past `lengths` are masked out of the softmax but are read: they must hold finite
values (the engine's cache does: zero-initialised, written with finite K/V). A NaN there
would reach the output through 0 x NaN in P V, which the Triton kernel's masked loads avoid.

Runs on the CPU in Mosaic GPU's interpreter (`interpret=True`, tests only): there the WGMMAs
are plain dots (the interpreter has no transposed WGMMA operands) and layouts are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

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

ROWS = 8  # query rows stored per work item (the GQA group, padded); swap_ab's WGMMA N
_WGMMA_M = 64  # WGMMA's row count: the rows form pads Q to it in shared memory
_LOG2E = math.log2(math.e)
MAX_TABLE_PAGES = 256  # a page-table row is one TMA copy: at most 256 entries a dimension
REDUCTION_SCRATCH = 2048  # bytes of Mosaic GPU's cross-warp reduction scratch (its default)
CONSUMERS = ("rows", "swap_ab")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static shape of one launch."""
    num_programs: int
    num_kv_heads: int
    page_size: int
    pages_per_block: int
    stages: int
    consumers: int
    scale_log2: float
    interpret: bool

    @property
    def block_kv(self) -> int:
        return self.pages_per_block * self.page_size


def _items(lengths_ref, plan: Plan, num_items: int):
    """(this CTA's item count, item_of): item_of(i) = (item, sequence, KV head, length, KV
    blocks) of this CTA's i-th work item."""
    cta = lax.axis_index("programs")
    my_items = (num_items - cta + plan.num_programs - 1) // plan.num_programs

    def item_of(i):
        item = cta + i * plan.num_programs
        b = item // plan.num_kv_heads
        length = lengths_ref[b]
        return (item, b, item % plan.num_kv_heads, length,
                (length + plan.block_kv - 1) // plan.block_kv)

    return my_items, item_of


def _produce(tables_ref, k_ref, v_ref, table_smem, k_smem, v_smem, table_bar, k_bar, v_bar,
             k_free, v_free, my_items, item_of, plan: Plan):
    """The TMA producer: each item's KV blocks into the ring, in the consumers' order.
    table_smem [2, P_max] double-buffers the page-table rows of consecutive items."""
    stages, page_size, ppb = plan.stages, plan.page_size, plan.pages_per_block

    def fetch_table(i):
        plgpu.copy_gmem_to_smem(tables_ref.at[item_of(i)[1]], table_smem.at[lax.rem(i, 2)],
                                table_bar.at[lax.rem(i, 2)])

    @pl.when(my_items > 0)
    def _():
        fetch_table(0)

    def one_item(i, step):
        _, _, h, length, n_blocks = item_of(i)
        table = table_smem.at[lax.rem(i, 2)]
        plgpu.barrier_wait(table_bar.at[lax.rem(i, 2)])

        @pl.when(i + 1 < my_items)  # item i-1's row, in the other buffer, is issued
        def _():
            fetch_table(i + 1)

        last_page = jnp.maximum((length + page_size - 1) // page_size - 1, 0)

        def one_block(j, carry):
            g = step + j  # the ring's block count: slot g % stages, its use g // stages
            slot = lax.rem(g, stages)
            pages = [table[jnp.minimum(j * ppb + p, last_page)] for p in range(ppb)]
            for src, dst, ready, free in ((k_ref, k_smem, k_bar, k_free),
                                          (v_ref, v_smem, v_bar, v_free)):
                # the slot's previous block is consumed
                pl.when(g >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot]))
                for p, page in enumerate(pages):
                    plgpu.copy_gmem_to_smem(
                        src.at[h, page], dst.at[slot, pl.ds(p * page_size, page_size)],
                        ready.at[slot])
            return carry

        lax.fori_loop(0, n_blocks, one_block, 0)
        return step + n_blocks

    def last_release(slot: int):
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

    total = lax.fori_loop(0, my_items, one_item, jnp.int32(0))
    for slot in range(stages):  # the consumers' last release of each slot used
        pl.when(total > slot)(functools.partial(last_release, slot))


def _first_and_count(c: int, step, n_blocks, consumers: int):
    """Consumer c's first block of an item that starts at ring position `step`, and how many
    of the item's `n_blocks` blocks are its (blocks g with g % consumers == c)."""
    first = lax.rem(c + consumers - lax.rem(step, consumers), consumers)
    return first, (n_blocks - first + consumers - 1) // consumers


def _merge(m_i, l_i, acc, parts, bcast):
    """Merges the online softmax states (m [8], l [8], acc) of several consumers."""
    m_new = functools.reduce(jnp.maximum, [m for m, _, _ in parts], m_i)
    # -inf where no consumer saw a token (length 0): keep exp2 finite.
    m_new = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
    alpha = jnp.exp2(m_i - m_new)
    l_i, acc = l_i * alpha, acc * bcast(alpha)
    for m_c, l_c, acc_c in parts:
        alpha_c = jnp.exp2(m_c - m_new)
        l_i, acc = l_i + l_c * alpha_c, acc + acc_c * bcast(alpha_c)
    return l_i, acc


class _Ops:
    """The few operations whose GPU form the interpreter lacks: there, WGMMAs are plain dots,
    layouts are ignored and a transposed store stores the transposed value."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def cast(self, x, layout):  # loop carries need their register layout up front
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def load(self, ref, layout):
        return ref[...] if self.interpret else _compat.mgpu_load(ref, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def store_t(self, ref, x):  # ref [n, m] <- x [m, n] transposed
        if self.interpret:
            ref[...] = x.T
        else:
            plgpu.transpose_ref(ref, (1, 0))[...] = x

    def mma(self, a, b, shape, *, a_t=False, b_t=False):
        """a @ b in fp32 into a fresh accumulator of `shape` [M, N]: a is [M, K] (registers or
        a shared-memory ref), b a [K, N] ref; a_t / b_t: that ref holds the operand's
        transpose ([K, M] / [N, K]), and WGMMA reads it through a transposed view."""
        if self.interpret:
            def val(x, transposed):
                x = x if isinstance(x, jax.Array) else x[...]
                return x.T if transposed else x

            return jnp.dot(val(a, a_t), val(b, b_t), preferred_element_type=jnp.float32)
        a = plgpu.transpose_ref(a, (1, 0)) if a_t else a
        b = plgpu.transpose_ref(b, (1, 0)) if b_t else b

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def mma_on_slot(self, ready, free, a, b, shape, **transposed):
        """`mma` once the ring slot's data is there (`ready`), releasing it (`free`) when the
        WGMMA is done."""
        plgpu.barrier_wait(ready)
        out = self.mma(a, b, shape, **transposed)
        plgpu.barrier_arrive(free)
        return out


def _rows_kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem,
                 table_smem, acc_smem, m_smem, l_smem, q_bar, table_bar, k_bar, v_bar, k_free,
                 v_free, merge_full, merge_free, *, plan: Plan):
    """The rows form. q_ref/o_ref [items, 8, D]; k_ref/v_ref [Hkv, P, page_size, D];
    tables_ref [B, P_max]. q_smem [consumers, 64, D]; acc_smem [64, D] fp32 and m_smem/l_smem
    [64] fp32 carry consumer 1's partial result to consumer 0 (unused with one consumer)."""
    ops = _Ops(plan.interpret)
    block_kv, stages, consumers = plan.block_kv, plan.stages, plan.consumers
    head_dim = q_ref.shape[2]
    wg = lax.axis_index("wg")
    my_items, item_of = _items(lengths_ref, plan, q_ref.shape[0])
    rows = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector, one value per WGMMA row

    def bcast(row_vec, like):  # [64] per row -> like's [64, n]
        return lax.broadcast_in_dim(row_vec, like.shape, [0])

    def consumer(c: int):
        q_mine = q_smem.at[c]

        def one_item(i, step):  # step: KV blocks of earlier items (ring position)
            item, _, _, length, n_blocks = item_of(i)
            if c == 0:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left q_mine
            plgpu.copy_gmem_to_smem(q_ref.at[item], q_mine.at[pl.ds(0, ROWS)], q_bar.at[c])
            plgpu.barrier_wait(q_bar.at[c])
            acc = ops.cast(jnp.zeros((_WGMMA_M, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m_i = ops.cast(jnp.full((_WGMMA_M,), -jnp.inf, jnp.float32), rows)
            l_i = ops.cast(jnp.zeros((_WGMMA_M,), jnp.float32), rows)
            first, mine = _first_and_count(c, step, n_blocks, consumers)

            def one_block(n, carry):
                acc, m_i, l_i = carry
                j = first + n * consumers  # the item's block
                slot = lax.rem(step + j, stages)
                s = ops.mma_on_slot(k_bar.at[slot], k_free.at[slot], q_mine, k_smem.at[slot],
                                    (_WGMMA_M, block_kv), b_t=True)
                col = ops.iota((_WGMMA_M, block_kv), 1)
                s = jnp.where(j * block_kv + col < length, s * plan.scale_log2, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - bcast(m_new, s))
                l_i = l_i * alpha + p.sum(axis=1)
                pv_block = ops.mma_on_slot(v_bar.at[slot], v_free.at[slot],
                                           p.astype(v_smem.dtype), v_smem.at[slot],
                                           (_WGMMA_M, head_dim))
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
                part = (ops.load(m_smem, rows), ops.load(l_smem, rows),
                        ops.load(acc_smem, plgpu.Layout.WGMMA))
                plgpu.barrier_arrive(merge_free)
                l_i, acc = _merge(m_i, l_i, acc, [part], lambda x: bcast(x, acc))
            # Rows of an empty sequence (length 0) have l = 0 and stay exact zeros.
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            acc = acc / bcast(l_safe, acc)
            q_mine[...] = acc.astype(q_mine.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_mine.at[pl.ds(0, ROWS)], o_ref.at[item])
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
    def _():
        _produce(tables_ref, k_ref, v_ref, table_smem, k_smem, v_smem, table_bar, k_bar, v_bar,
                 k_free, v_free, my_items, item_of, plan)


def swap_ab_roles(gmem, smem, plan: Plan):
    """The swap_ab form's warpgroup roles: ([consumer 0, ...], producer), each a no-argument
    function to lower under its warpgroup's `pl.when` (`lower_roles`). gmem = (lengths [B],
    tables [B, P_max], q [items, 8, D], k, v [Hkv, P, page_size, D], o [items, 8, D]); smem maps
    the names of `swap_ab_scratch` to their refs: q_smem [consumers, 2, 8, D] (each consumer's
    Q, double-buffered; q_bar [2 * consumers]); p_smem [consumers, 8, block_kv]; o_smem [8, D]
    stages consumer 0's output; acc_smem [consumers - 1, D, 8] and m_smem/l_smem
    [consumers - 1, 8] fp32 carry consumers 1.. partial results to consumer 0."""
    lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref = gmem
    s = types.SimpleNamespace(**smem)
    ops = _Ops(plan.interpret)
    block_kv, stages, consumers = plan.block_kv, plan.stages, plan.consumers
    head_dim = q_ref.shape[2]
    my_items, item_of = _items(lengths_ref, plan, q_ref.shape[0])
    per_q = plgpu.Layout.WGMMA.reduce(0)  # an [8] vector, one value per query row (N)
    s_shape, acc_shape = (block_kv, ROWS), (head_dim, ROWS)

    def bcast(q_vec, shape):  # [8] per query row -> shape [n, 8]
        return lax.broadcast_in_dim(q_vec, shape, [1])

    def consumer(c: int):
        p_mine = s.p_smem.at[c]

        def fetch_q(i):
            buf = lax.rem(i, 2)
            plgpu.copy_gmem_to_smem(q_ref.at[item_of(i)[0]], s.q_smem.at[c, buf],
                                    s.q_bar.at[2 * c + buf])

        @pl.when(my_items > 0)
        def _():
            fetch_q(0)

        def one_item(i, step):  # step: KV blocks of earlier items (ring position)
            item, _, _, length, n_blocks = item_of(i)
            q_now = s.q_smem.at[c, lax.rem(i, 2)]
            plgpu.barrier_wait(s.q_bar.at[2 * c + lax.rem(i, 2)])

            @pl.when(i + 1 < my_items)  # the other buffer held item i-1's Q, now used
            def _():
                fetch_q(i + 1)

            acc = ops.cast(jnp.zeros(acc_shape, jnp.float32), plgpu.Layout.WGMMA)
            m_i = ops.cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), per_q)
            l_part = ops.cast(jnp.zeros(s_shape, jnp.float32), plgpu.Layout.WGMMA)
            first, mine = _first_and_count(c, step, n_blocks, consumers)

            def one_block(n, carry):
                acc, m_i, l_part = carry
                j = first + n * consumers  # the item's block
                slot = lax.rem(step + j, stages)
                sc = ops.mma_on_slot(s.k_bar.at[slot], s.k_free.at[slot], s.k_smem.at[slot],
                                     q_now, s_shape, b_t=True)  # S^T = K Q^T
                token = ops.iota(s_shape, 0)
                sc = jnp.where(j * block_kv + token < length, sc * plan.scale_log2, -jnp.inf)
                m_new = jnp.maximum(m_i, sc.max(axis=0))  # the block has a token: finite
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(sc - bcast(m_new, s_shape))
                l_part = l_part * bcast(alpha, s_shape) + p
                ops.store_t(p_mine, p.astype(p_mine.dtype))  # P [8, block_kv]
                plgpu.commit_smem()  # the stores before WGMMA reads them
                o = ops.mma_on_slot(s.v_bar.at[slot], s.v_free.at[slot], s.v_smem.at[slot],
                                    p_mine, acc_shape, a_t=True, b_t=True)  # block's V^T P^T
                return acc * bcast(alpha, acc_shape) + o, m_new, l_part

            acc, m_i, l_part = lax.fori_loop(0, mine, one_block, (acc, m_i, l_part))
            l_i = l_part.sum(axis=0)
            if c > 0:  # hand the partial result (m, l, acc) to consumer 0
                @pl.when(i > 0)
                def _():
                    plgpu.barrier_wait(s.merge_free.at[c - 1])

                s.acc_smem.at[c - 1][...] = acc
                s.m_smem.at[c - 1][...] = m_i
                s.l_smem.at[c - 1][...] = l_i
                plgpu.barrier_arrive(s.merge_full.at[c - 1])
                return step + n_blocks
            parts = []
            for other in range(1, consumers):
                plgpu.barrier_wait(s.merge_full.at[other - 1])
                parts.append((ops.load(s.m_smem.at[other - 1], per_q),
                              ops.load(s.l_smem.at[other - 1], per_q),
                              ops.load(s.acc_smem.at[other - 1], plgpu.Layout.WGMMA)))
                plgpu.barrier_arrive(s.merge_free.at[other - 1])
            if parts:
                l_i, acc = _merge(m_i, l_i, acc, parts, lambda x: bcast(x, acc_shape))
            # Rows of an empty sequence (length 0) have l = 0 and stay exact zeros.
            l_safe = jnp.where(l_i > 0, l_i, jnp.ones_like(l_i))
            acc = acc / bcast(l_safe, acc_shape)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left o_smem
            ops.store_t(s.o_smem, acc.astype(s.o_smem.dtype))  # O [8, D]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(s.o_smem, o_ref.at[item])
            return step + n_blocks

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        if c == 0:
            plgpu.wait_smem_to_gmem(0)
        else:  # consumer 0's last read, so no barrier phase is left unobserved
            @pl.when(my_items > 0)
            def _():
                plgpu.barrier_wait(s.merge_free.at[c - 1])

    def produce():
        _produce(tables_ref, k_ref, v_ref, s.table_smem, s.k_smem, s.v_smem, s.table_bar,
                 s.k_bar, s.v_bar, s.k_free, s.v_free, my_items, item_of, plan)

    return [functools.partial(consumer, c) for c in range(consumers)], produce


def lower_roles(reducers, others, wg, *, interpret: bool) -> None:
    """Lowers each (warpgroup index, role) pair under `pl.when(wg == index)`. `reducers` are
    roles with cross-warp reductions (swap_ab consumers): reducer r is lowered below r
    reduction-scratch pads (the module docstring says why); `others` are lowered innermost.
    Every warpgroup enters each pad at the start; none synchronizes on leaving one."""
    if interpret:  # its reductions share nothing, and its scoped pads end in a rendezvous
        for index, role in [*reducers, *others]:
            pl.when(wg == index)(role)
        return

    def nest(r: int):
        if r + 1 < len(reducers):
            pl.run_scoped(lambda _: nest(r + 1),
                          plgpu.SMEM((REDUCTION_SCRATCH // 4,), jnp.float32),
                          collective_axes="wg")
        else:
            for index, role in others:
                pl.when(wg == index)(role)
        index, role = reducers[r]
        pl.when(wg == index)(role)

    nest(0)


def _swap_ab_kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *scratch,
                    plan: Plan, names: tuple[str, ...]):
    """The swap_ab form: consumers on warpgroups 0.., the producer last."""
    consumers, produce = swap_ab_roles((lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref),
                                       dict(zip(names, scratch)), plan)
    lower_roles(list(enumerate(consumers)), [(plan.consumers, produce)], lax.axis_index("wg"),
                interpret=plan.interpret)


def supports(num_q_heads: int, cache_shape: tuple[int, ...], dtype, max_pages: int = 0) -> bool:
    """Whether `decode_attention_mgpu` takes these shapes: a GQA group of at most 8 heads,
    head_dim a multiple of 64, pages of a multiple of 8 tokens dividing 64, bf16 or fp16, and
    page-table rows of `max_pages` ≤ MAX_TABLE_PAGES (after `prepare`'s padding)."""
    num_kv_heads, _, page_size, head_dim = cache_shape
    return (num_q_heads % num_kv_heads == 0 and num_q_heads // num_kv_heads <= ROWS
            and head_dim % 64 == 0 and page_size % 8 == 0 and 64 % page_size == 0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and -(-max_pages // 32) * 32 <= MAX_TABLE_PAGES)


def few_cta_tuning() -> dict:
    """The keyword arguments for a run on a share of the SMs: `swap_ab` with 2 consumers and 6
    stages, 1.5x the rows form from 8-44 CTAs on an H200 (BENCHMARKS.md, "CTA curves"), where
    this JAX lowers it for the GPU (0.11's warpgroup lowering); the rows form elsewhere."""
    major_minor = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if major_minor >= (0, 11):
        return {"consumer": "swap_ab", "consumers": 2, "stages": 6}
    return {"consumer": "rows", "consumers": 2, "stages": 4}


def _check_knobs(consumer: str, consumers: int, stages: int, block_kv: int) -> None:
    if consumer not in CONSUMERS:
        raise ValueError(f"consumer must be one of {CONSUMERS}, got {consumer!r}")
    most = 2 if consumer == "rows" else 4
    if not 1 <= consumers <= most or stages % consumers:
        raise ValueError(f"consumers must be 1..{most} for consumer={consumer!r} and divide "
                         f"stages; got consumers={consumers}, stages={stages}")
    if block_kv % 64:
        raise ValueError(f"pages_per_block: a KV block of {block_kv} tokens, WGMMA needs a "
                         f"multiple of 64")


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
    consumer: str = "rows",
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D]
    """Paged GQA attention of one query token per sequence, on `num_programs` CTAs (None: one
    per SM). `pages_per_block` pages (default: 64 tokens) form one KV block; `stages` blocks
    are in flight per CTA, shared by `consumers` computing warpgroups (1-2 for "rows", 1-4
    for "swap_ab") that split each item's blocks. Sequence b attends to cache slots
    0..lengths[b]-1."""
    if plgpu is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Mosaic GPU Pallas backend")
    plan = make_plan(q, k_pages, v_pages, sm_scale=sm_scale, num_programs=num_programs,
                     pages_per_block=pages_per_block, stages=stages, consumers=consumers,
                     consumer=consumer, interpret=interpret)
    q_items, tables = prepare(q, page_tables, k_pages.shape[0])
    head_dim = q.shape[2]
    if consumer == "rows":
        scratch, body = _rows_scratch(plan, head_dim, tables.shape[1], q.dtype), _rows_kernel
        semantics = {}
    else:
        named = swap_ab_scratch(plan, head_dim, tables.shape[1], q.dtype)
        scratch = list(named.values())
        body = functools.partial(_swap_ab_kernel, names=tuple(named))
        # its transposed stores need the warpgroup lowering (the module docstring says why)
        semantics = {"lowering_semantics": plgpu.LoweringSemantics.Warpgroup}
    call = plgpu.kernel(
        functools.partial(body, plan=plan),
        out_type=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        scratch_types=scratch,
        grid=(plan.num_programs,),
        grid_names=("programs",),
        num_threads=consumers + 1,  # the computing warpgroups, then the TMA producer
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True,
                                             reduction_scratch_bytes=REDUCTION_SCRATCH,
                                             **semantics),
        interpret=_compat.mosaic_gpu_interpret_params() if interpret else None,
    )
    out = call(lengths.astype(jnp.int32), tables, q_items, k_pages, v_pages)
    return heads_of_items(out, q.shape[0], q.shape[1])


def make_plan(q, k_pages, v_pages, *, sm_scale: float, num_programs: int | None,
              pages_per_block: int | None, stages: int, consumers: int, consumer: str,
              interpret: bool) -> Plan:
    """Checks the inputs and knobs (ValueError naming the one at fault) and returns the launch's
    plan: `num_programs` CTAs (None: one per SM), at most one per work item."""
    batch, num_q_heads, _ = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    check_paged_inputs(q, k_pages, v_pages, sm_scale, pow2=False)
    if not supports(num_q_heads, k_pages.shape, q.dtype) or k_pages.dtype != q.dtype:
        raise ValueError(f"takes bf16 or fp16 q and cache of one dtype, a GQA group of at most "
                         f"{ROWS} heads, head_dim a multiple of 64 and 8-64-token pages; got "
                         f"q {q.shape} {q.dtype}, cache {k_pages.shape} {k_pages.dtype}")
    pages_per_block = pages_per_block or max(1, 64 // page_size)
    _check_knobs(consumer, consumers, stages, pages_per_block * page_size)
    return Plan(num_programs=min(num_programs or _compat.num_sms(), batch * num_kv_heads),
                num_kv_heads=num_kv_heads, page_size=page_size,
                pages_per_block=pages_per_block, stages=stages, consumers=consumers,
                scale_log2=sm_scale * _LOG2E, interpret=interpret)


def prepare(q, page_tables, num_kv_heads: int):
    """The kernel's inputs: q [B, Hq, D] -> one [8, D] row block per (sequence, KV head), the
    GQA group padded with zeros ([B * Hkv, 8, D]); page tables [B, max_pages] -> int32 rows of
    a multiple of 32 entries (128 B: whole TMA rows, a copy size JAX 0.10's lowering takes)."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q_items = jnp.pad(q.reshape(batch, num_kv_heads, group, head_dim),
                      ((0, 0), (0, 0), (0, ROWS - group), (0, 0)))
    max_pages = page_tables.shape[1]
    if max_pages + -max_pages % 32 > MAX_TABLE_PAGES:
        raise ValueError(f"page tables of {max_pages} pages: the kernel copies a row in one TMA "
                         f"copy of at most {MAX_TABLE_PAGES} entries")
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, -max_pages % 32)))
    return q_items.reshape(batch * num_kv_heads, ROWS, head_dim), tables


def heads_of_items(out_items, batch: int, num_q_heads: int):
    """The kernel's output [B * Hkv, 8, D] -> [B, Hq, D], the padding rows dropped
    (`prepare`'s inverse)."""
    items, _, head_dim = out_items.shape
    num_kv_heads = items // batch
    group = num_q_heads // num_kv_heads
    return out_items.reshape(batch, num_kv_heads, ROWS, head_dim)[:, :, :group].reshape(
        batch, num_q_heads, head_dim)


def swizzled(dtype, row_bytes: int = 128):
    """WGMMA operand tiles: 8 rows of `row_bytes`, swizzled."""
    return (plgpu.TilingTransform((8, row_bytes // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(row_bytes))


def _ring(plan: Plan, head_dim: int, dtype, table_cols: int) -> list:
    """Scratch both forms share: the K and V rings, the page-table rows and their barriers."""
    return [
        plgpu.SMEM((plan.stages, plan.block_kv, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((plan.stages, plan.block_kv, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((2, table_cols), jnp.int32),  # two items' page-table rows
    ]


def _ring_barriers(plan: Plan) -> list:
    return [
        plgpu.Barrier(num_barriers=2),  # a page-table row arrived
        plgpu.Barrier(num_arrivals=plan.pages_per_block, num_barriers=plan.stages),  # K full
        plgpu.Barrier(num_arrivals=plan.pages_per_block, num_barriers=plan.stages),  # V full
        plgpu.Barrier(num_barriers=plan.stages),  # K slot consumed
        plgpu.Barrier(num_barriers=plan.stages),  # V slot consumed
    ]


def _rows_scratch(plan: Plan, head_dim: int, table_cols: int, dtype) -> list:
    k_ring, v_ring, table = _ring(plan, head_dim, dtype, table_cols)
    two = plan.consumers > 1
    return [
        # each consumer's q; consumer 0's is then the output's staging buffer
        plgpu.SMEM((plan.consumers, _WGMMA_M, head_dim), dtype, transforms=swizzled(dtype)),
        k_ring, v_ring, table,
        # consumer 1's partial acc, m and l for consumer 0 (a token's worth with one)
        plgpu.SMEM((_WGMMA_M if two else 8, head_dim), jnp.float32,
                   transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((_WGMMA_M,), jnp.float32),
        plgpu.SMEM((_WGMMA_M,), jnp.float32),
        plgpu.Barrier(num_barriers=plan.consumers),  # a consumer's q arrived
        *_ring_barriers(plan),
        plgpu.Barrier(),  # consumer 1's partial result is in acc/m/l_smem
        plgpu.Barrier(),  # consumer 0 has read it
    ]


def swap_ab_scratch(plan: Plan, head_dim: int, table_cols: int, dtype) -> dict:
    """The swap_ab form's shared memory and barriers, by the names `swap_ab_roles` reads."""
    k_ring, v_ring, table = _ring(plan, head_dim, dtype, table_cols)
    table_bar, k_bar, v_bar, k_free, v_free = _ring_barriers(plan)
    others = max(plan.consumers - 1, 1)  # consumers that hand over a partial result
    return {
        "q_smem": plgpu.SMEM((plan.consumers, 2, ROWS, head_dim), dtype,
                             transforms=swizzled(dtype)),
        "k_smem": k_ring, "v_smem": v_ring, "table_smem": table,
        "p_smem": plgpu.SMEM((plan.consumers, ROWS, plan.block_kv), dtype,
                             transforms=swizzled(dtype)),
        "o_smem": plgpu.SMEM((ROWS, head_dim), dtype, transforms=swizzled(dtype)),
        "acc_smem": plgpu.SMEM((others, head_dim, ROWS), jnp.float32),  # their O^T
        "m_smem": plgpu.SMEM((others, ROWS), jnp.float32),  # their m
        "l_smem": plgpu.SMEM((others, ROWS), jnp.float32),  # their l
        "q_bar": plgpu.Barrier(num_barriers=2 * plan.consumers),  # a consumer's q arrived
        "table_bar": table_bar, "k_bar": k_bar, "v_bar": v_bar, "k_free": k_free,
        "v_free": v_free,
        # consumer c's partial result is in the smem; consumer 0 has read it
        "merge_full": plgpu.Barrier(num_barriers=others),
        "merge_free": plgpu.Barrier(num_barriers=others),
    }
