"""Paged GQA decode attention (one query token per sequence), Pallas + reference.

KV cache layout (per layer, K and V separate):
  k_pages, v_pages: [num_kv_heads, num_pages, page_size, head_dim]
One (kv head, page) is a contiguous page_size * head_dim block (4 KiB for
16 x 128 bf16), so a program that owns one KV head streams contiguous tiles.

Kernel design (memory-bound: the whole job is reading K and V once):
  * grid = (batch, num_kv_heads, num_splits). A program owns one sequence, one
    KV head and a contiguous range of pages (split-K). It processes *all* q
    heads of its KV group at once, so K/V are read exactly once per group
    (GQA ratio 1, 4, 8, ... all work; rows are padded up to `block_h` >= 16
    for `pl.dot` by repeating the last head, and the repeats are not stored).
  * The program loops over blocks of `pages_per_block` pages (64 tokens by
    default) with an online (flash) softmax in fp32 (base-2 exponent; the
    scale and the max-subtraction fused into one FMA).  The K/V tile is
    addressed directly as [block_k, D], one page id per token (read from the
    page table with a vector gather).  Gathering [pages, page_size, D] and
    reshaping to [block_k, D] instead computes the same thing, but the reshape
    keeps Triton from pipelining the loads through shared memory: 2.36 -> 2.73
    TB/s on an H100 (`flat_gather=False` keeps the old form for comparison).
  * Loads are masked by the sequence length only in the one block that holds
    the sequence's end (the main loop runs unmasked), so cache slots past
    `lengths` are never read: garbage or NaN there cannot leak into the
    output, and tail pages cost nothing.
  * With one split the kernel writes the normalised output directly.  With
    several it writes per-split (normalised output, log2-sum-exp) in fp32 and
    a small jnp combine merges them (a few MB; XLA fuses it into one pass).
  * `lengths == 0` rows produce exact zeros.
  * A sliding `window` (static) shifts each sequence's page range to start at the page of
    position length - window, so a long context costs only the window's pages; splits divide
    that range (at most cdiv(window + page_size - 1, page_size) pages). The first block, when
    the window starts inside its first page, goes through the masked path too.
  * `num_programs` makes the kernel persistent: that many programs, each looping
    over (sequence, KV head, split) work items `num_programs` apart. Fewer
    programs than SMs leave SMs free for a kernel that runs beside it (the
    nano-batch pipeline's GEMMs): NanoFlow's SM partitioning, by grid size.

Backend: the Pallas *Triton* backend (`pl.pallas_call` + `CompilerParams`).
It runs in interpret mode on CPU (our CI), gathers through a page table with
plain pointer arithmetic and lets Triton software-pipeline those gathers
(cp.async, `num_stages`).  Mosaic GPU is JAX's supported Hopper backend, but
page gathers there mean per-page TMA/async copies and hand-built barriers, and
its CPU interpreter has gaps (no scalar prefetch, no dynamic grid).  Measured
on an H100 (JAX 0.11.2, scripts/bench_kernels.py): this kernel reads the KV
cache at 2.73-2.82 TB/s, 94-97 % of a device copy (2.91 TB/s), at batch
256 x 1024 and 64 x 4096 tokens (LLaMA-3-8B heads), so Mosaic GPU has little
left to win here on the full grid. From few SMs it does (persistent programs stream too few
bytes each): `decode_attention_mgpu.py` is the Mosaic GPU kernel for that case.  The Triton backend is deprecated in JAX 0.11 (still works;
warns): `_compat.py` is the single place to adapt.
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

_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite "minus infinity": never produces inf - inf = NaN.


def _decode_kernel(*refs, **static):
    """Grid (batch, num_kv_heads, num_splits): one program per (b, h, split)."""
    _decode_program(pl.program_id(0), pl.program_id(1), pl.program_id(2), *refs, **static)


def decode_work_item(w, num_kv_heads: int, num_splits: int, *refs, **static):
    """Runs work item w = (b · Hkv + h) · S + split: the numbering of the persistent kernel and
    of `fused_gemm_decode`'s attention programs."""
    b, rest = w // (num_kv_heads * num_splits), w % (num_kv_heads * num_splits)
    _decode_program(b, rest // num_splits, rest % num_splits, *refs, **static)


def _persistent_decode_kernel(*refs, num_programs: int, num_kv_heads: int, num_splits: int,
                              num_work: int, **static):
    """Grid (num_programs,): program p runs work items p, p + num_programs, ..."""
    pid = pl.program_id(0)

    def one(i, carry):
        w = pid + i * num_programs

        @pl.when(w < num_work)
        def _():
            decode_work_item(w, num_kv_heads, num_splits, *refs, **static)

        return carry

    lax.fori_loop(0, -(-num_work // num_programs), one, 0)


def _decode_program(
    b,  # sequence
    h,  # KV head
    split,  # split of the page range
    # inputs
    page_tables_ref,  # [B, max_pages_padded] int32
    lengths_ref,  # [B] int32
    q_ref,  # [B, Hq, D]
    k_ref,  # [Hkv, P, page_size, D]
    v_ref,  # [Hkv, P, page_size, D]
    # outputs
    o_ref,  # [B, Hq, D] (one split) or [S, B, Hq, D] fp32
    *lse_refs,  # () or ([S, B, Hq] fp32,)
    scale_log2: float,
    group: int,
    block_h: int,
    pages_per_block: int,
    pages_per_split: int,
    precision,
    flat_gather: bool,
    window: int | None = None,
):
    """One (sequence, KV head, split) of the attention; `_decode_kernel` and
    `fused_gemm_decode` (program id -> (b, h, split)) both run this body."""
    page_size, head_dim = k_ref.shape[2], k_ref.shape[3]
    block_k = pages_per_block * page_size

    length = lengths_ref[b]
    n_pages = (length + page_size - 1) // page_size
    # Keys lo .. length-1; the page range starts at lo's page (0 without a window).
    lo = 0 if window is None else jnp.maximum(length - window, 0)
    first_page = lo // page_size + split * pages_per_split
    end_page = jnp.minimum(first_page + pages_per_split, n_pages)
    n_blocks = (jnp.maximum(end_page - first_page, 0) + pages_per_block - 1) // pages_per_block

    d_idx = jnp.arange(head_dim)
    rows = jnp.arange(block_h)
    # q rows of this KV group; rows past the group repeat the last head.
    heads = h * group + jnp.minimum(rows, group - 1)  # [block_h]
    q = q_ref[b, heads[:, None], d_idx[None, :]]  # [block_h, D]
    # Stores use distinct (unclamped) rows under a mask: duplicate addresses in
    # a masked store are fine on the GPU but not in interpret mode.
    out_heads = h * group + rows

    tok = jnp.arange(page_size)
    blk_tok = jnp.arange(block_k)

    def in_range(pos):  # positions -> bool: keys this query sees
        return (pos < length) if window is None else (pos < length) & (pos >= lo)

    def body(i, carry, masked):
        acc, m_i, l_i = carry
        page0 = first_page + i * pages_per_block
        if flat_gather:  # [BK, D] pointers built directly: no reshape before the dot
            pages = page_tables_ref[b, page0 + blk_tok // page_size]  # [BK]
            idx = (h, pages[:, None], (blk_tok % page_size)[:, None], d_idx[None, :])
            valid = in_range(page0 * page_size + blk_tok)[:, None]  # [BK, 1]
        else:  # [ppb, page_size, D] gather, reshaped to [BK, D]
            pages = page_tables_ref[b, pl.ds(page0, pages_per_block)]  # [ppb]
            idx = (h, pages[:, None, None], tok[None, :, None], d_idx[None, None, :])
            valid = in_range(
                page0 * page_size
                + (jnp.arange(pages_per_block)[:, None] * page_size + tok[None, :])
            )[:, :, None]
        if masked:  # a block holding an end of the keys
            k = _compat.load(k_ref.at[idx], mask=valid, other=0)
            v = _compat.load(v_ref.at[idx], mask=valid, other=0)
        else:
            k = k_ref[idx]
            v = v_ref[idx]
        k = k.reshape(block_k, head_dim)
        v = v.reshape(block_k, head_dim)

        s = _compat.dot(q, k, trans_b=True, precision=precision)  # [block_h, block_k]
        if masked:
            s = jnp.where(in_range(page0 * page_size + blk_tok)[None, :], s, _MASK)
        # scale > 0: max(s) * scale == max(s * scale), and s * scale - m is one FMA.
        m_new = jnp.maximum(m_i, s.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * scale_log2 - m_new[:, None])
        l_new = l_i * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + _compat.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l_new

    carry = (
        jnp.zeros((block_h, head_dim), jnp.float32),
        jnp.full((block_h,), _MASK, jnp.float32),
        jnp.zeros((block_h,), jnp.float32),
    )
    # Blocks wholly inside the keys need no mask: at most the block holding position
    # length-1 and, with a window that starts inside a page, split 0's first block are masked.
    n_full = jnp.clip((length // page_size - first_page) // pages_per_block, 0, n_blocks)
    masked_body = functools.partial(body, masked=True)
    n_head = 0
    if window is not None:
        # 1 when split 0's first page starts below the window, else 0. Integer arithmetic,
        # not a boolean select: Triton lowers the select to an i1 loop bound.
        starts_inside = jnp.minimum(lo % page_size, 1) * (1 - jnp.minimum(split, 1))
        n_head = jnp.minimum(starts_inside, n_blocks)
        n_full = jnp.maximum(n_full, n_head)
        carry = lax.fori_loop(0, n_head, masked_body, carry)
    carry = lax.fori_loop(n_head, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_blocks, masked_body, carry)
    acc, m_i, l_i = carry

    has = l_i > 0
    out = acc / jnp.where(has, l_i, 1.0)[:, None]
    row_ok = (rows < group)[:, None]  # [block_h, 1]
    if not lse_refs:
        _compat.store(
            o_ref.at[b, out_heads[:, None], d_idx[None, :]], out.astype(o_ref.dtype), mask=row_ok
        )
    else:
        (lse_ref,) = lse_refs
        _compat.store(o_ref.at[split, b, out_heads[:, None], d_idx[None, :]], out, mask=row_ok)
        lse = jnp.where(has, m_i + jnp.log(jnp.where(has, l_i, 1.0)) * _LOG2E, _MASK)
        _compat.store(lse_ref.at[split, b, out_heads], lse, mask=rows < group)


def default_num_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    """Split-K factor so that the grid has >= ~4 programs per SM."""
    target = 4 * _compat.num_sms()
    splits = max(1, -(-target // max(1, batch * num_kv_heads)))
    return max(1, min(splits, num_blocks))


def plan_decode(q, k_pages, v_pages, page_tables, lengths, *, sm_scale, pages_per_block,
                num_splits, flat_gather, window=None):
    """Checks the inputs and picks the launch: (padded page tables, splits, the static kwargs
    of `_decode_program`). Shared with the fused GEMM + attention kernel."""
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    check_paged_inputs(q, k_pages, v_pages, sm_scale)
    if page_tables.shape[0] != batch or lengths.shape != (batch,):
        raise ValueError("page_tables / lengths do not match the batch")
    group = num_q_heads // num_kv_heads
    if pages_per_block is None:
        # 64 tokens of 16-bit K/V per step (32 for fp32): 32 KiB of K+V a stage.
        pages_per_block = max(1, (64 if q.dtype.itemsize <= 2 else 32) // page_size)
    pages_per_block = _compat.next_pow2(pages_per_block)

    max_pages = page_tables.shape[1]
    span = max_pages  # most pages one sequence's keys cover
    if window is not None:
        span = min(span, -(-(window + page_size - 1) // page_size))
    num_blocks = -(-span // pages_per_block)
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, num_blocks)
    num_splits = max(1, min(num_splits, num_blocks))
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)  # drop empty tail splits
    pages_per_split = blocks_per_split * pages_per_block
    padded = num_splits * pages_per_split
    if window is not None:  # a block starts at any page < max_pages and reads ppb entries
        padded = max(padded, max_pages + pages_per_block - 1)
    page_tables = page_tables.astype(jnp.int32)
    if padded != max_pages:  # so every pl.ds over the table stays in bounds
        page_tables = jnp.pad(page_tables, ((0, 0), (0, padded - max_pages)))
    static = dict(
        scale_log2=float(sm_scale) * _LOG2E,
        group=group,
        block_h=max(16, _compat.next_pow2(group)),
        pages_per_block=pages_per_block,
        pages_per_split=pages_per_split,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
        flat_gather=bool(flat_gather),
        window=window,
    )
    return page_tables, num_splits, static


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "interpret",
        "pages_per_block",
        "num_splits",
        "num_warps",
        "num_stages",
        "flat_gather",
        "num_programs",
        "window",
    ),
)
def decode_attention(
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,  # [Hkv, P, page_size, D]
    page_tables: jax.Array,  # [B, max_pages_per_seq] int32
    lengths: jax.Array,  # [B] int32
    *,
    sm_scale: float,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    flat_gather: bool = True,
    num_programs: int | None = None,
    window: int | None = None,
) -> jax.Array:
    """Paged GQA attention of one query token per sequence.

    Sequence b attends to cache positions 0..lengths[b]-1 (the current token's
    K/V are already in the cache), with a sliding `window` to the last `window`
    of them only (pages before are never read); lengths[b] == 0 marks a padding
    row (zeros).

    Tuning: `pages_per_block` pages are gathered per loop step (block of
    pages_per_block * page_size tokens; default 64 (fp32: 32)), `num_splits` splits
    the page range of each sequence over that many programs (None: enough to
    give >= 4 programs per SM), `num_warps` / `num_stages` go to Triton;
    `flat_gather` builds the [block_k, D] K/V pointer tile directly (page id
    per token) instead of gathering [pages, page_size, D] and reshaping;
    `num_programs` (None: one program per work item) runs that many persistent
    programs, to leave the other SMs to a kernel running beside this one.
    Returns [B, Hq, D] in q.dtype.
    """
    batch, num_q_heads, head_dim = q.shape
    page_tables, num_splits, static = plan_decode(
        q, k_pages, v_pages, page_tables, lengths, sm_scale=sm_scale,
        pages_per_block=pages_per_block, num_splits=num_splits, flat_gather=flat_gather,
        window=window)
    num_kv_heads = k_pages.shape[0]
    num_work = batch * num_kv_heads * num_splits
    if num_programs is not None and num_programs < num_work:
        if num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {num_programs}")
        kernel = functools.partial(_persistent_decode_kernel, num_programs=num_programs,
                                   num_kv_heads=num_kv_heads, num_splits=num_splits,
                                   num_work=num_work, **static)
        grid = (num_programs,)
    else:
        kernel = functools.partial(_decode_kernel, **static)
        grid = (batch, num_kv_heads, num_splits)
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((batch, num_q_heads, head_dim), q.dtype)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((num_splits, batch, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, batch, num_q_heads), jnp.float32),
        )
    res = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=_compat.triton_params(num_warps, num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_h{static['block_h']}"
        f"_k{static['pages_per_block'] * k_pages.shape[2]}",
    )(page_tables, lengths.astype(jnp.int32), q, k_pages, v_pages)
    if num_splits == 1:
        return res
    o_parts, lse = res  # [S, B, Hq, D], [S, B, Hq]
    return combine_splits(o_parts, lse, q.dtype)


def combine_splits(o_parts: jax.Array, lse: jax.Array, dtype) -> jax.Array:
    """Merge per-split (normalised output [S, B, Hq, D], log2-sum-exp [S, B, Hq])."""
    m = lse.max(axis=0)
    w = jnp.exp2(lse - m[None])  # all-empty rows: w == 1 and o == 0 -> 0
    out = (o_parts * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]
    return out.astype(dtype)


def decode_attention_reference(
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,
    page_tables: jax.Array,  # [B, max_pages]
    lengths: jax.Array,  # [B]
    *,
    sm_scale: float,
    interpret: bool = False,
    window: int | None = None,
    **unused_tuning,
) -> jax.Array:
    """Pure-jnp reference: gather the pages, mask (the last `window` positions only, when
    given), softmax in fp32 (HIGHEST)."""
    del interpret, unused_tuning
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    max_len = page_tables.shape[1] * page_size
    f32 = jnp.float32
    hi = lax.Precision.HIGHEST
    k = k_pages[:, page_tables].reshape(num_kv_heads, batch, max_len, head_dim)
    v = v_pages[:, page_tables].reshape(num_kv_heads, batch, max_len, head_dim)
    qg = q.reshape(batch, num_kv_heads, group, head_dim).astype(f32)
    s = jnp.einsum("bhgd,hbld->bhgl", qg, k.astype(f32), precision=hi) * sm_scale
    valid = jnp.arange(max_len)[None, :] < lengths[:, None]  # [B, L]
    if window is not None:
        valid &= jnp.arange(max_len)[None, :] >= lengths[:, None] - window
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    # Masked positions may hold anything (even NaN): zero V there, not just p.
    v = jnp.where(valid[None, :, :, None], v.astype(f32), 0.0)
    o = jnp.einsum("bhgl,hbld->bhgd", p, v, precision=hi)
    return o.reshape(batch, num_q_heads, head_dim).astype(q.dtype)
