"""One launch: the GEMM of one nano-batch beside the paged decode attention of another.

Why this exists.  The nano-batch pipeline (DESIGN.md, "Nano-batch pipeline") wants a
compute-bound GEMM and a memory-bound decode attention to share the SMs.  Its first
mechanism is XLA streams (`compute_on("gpu_stream:N")`), and the first probe on an H100
showed no overlap: a GEMM beside an independent reduction ran no faster (1.29 vs 1.26 ms),
decode-heavy shapes gained 3 % of the 15 % there is, and a Pallas call inside `compute_on`
failed to compile ("No ExecutionStreamId").  This kernel is the fallback that does not
depend on streams or on XLA's scheduler at all: it is horizontal fusion as in
POD-Attention.  One `pl.pallas_call` (Pallas Triton backend) with a 1-D grid of

    G = gemm_programs + attention_programs

programs.  Each program reads `order[program_id]`: a value < gemm_programs is a GEMM
program, one >= gemm_programs the attention program (value - gemm_programs).  The block
scheduler hands CTAs out in program-id order, so `order` decides which kinds are resident
on the SMs together:

  * `interleave="alternate"` (default): the attention programs are spread evenly among the
    GEMM programs (Bresenham: program i is attention iff floor((i+1)·A/G) > floor(i·A/G)),
    so at every point of the launch both kinds are being dispatched in the ratio A : G-A;
  * `"attention_first"`: all attention programs, then the GEMM (the long-running GEMM
    tiles back-fill SMs as attention programs finish);
  * `"gemm_first"`: the GEMM, then the attention (nearly back to back: the control).

GEMM part: y = x @ w, x [M, K], w [K, N], bf16 (or fp32) in, fp32 accumulation, y in
x.dtype.  A GEMM *tile* is one [block_m, block_n] output block (loop over K in block_k
steps; M, N and K need not be multiples of the blocks: the edge tiles are masked, and only
when the shapes require it).  Tiles are numbered M-fastest (tile t -> (t % n_m, t // n_m)),
so consecutive tiles share one column block of w (the large operand) while x stays in L2.
`gemm_programs=None` gives one program per tile; an int g gives g persistent GEMM programs
that loop over tiles g apart (the GEMM's share of the grid, and so of the SMs, is then
fixed, e.g. 100 of 132 SMs' worth, and the attention gets the rest).

Attention part: exactly `decode_attention` (same layout, same body: the program body is
`decode_attention._decode_program`, run by `decode_work_item` for the attention index
a = (b · Hkv + h) · S + split).  With several splits the per-split
normalised outputs and log2-sum-exp come out of the kernel in fp32 and the same jnp combine
(`decode_attention.combine_splits`) merges them after the call.

Cost of fusing (why it may lose, to be measured):
  * one `num_warps` / `num_stages` for both branches: the GEMM wants more warps and stages
    than the attention (decode_attention's tuned 4 / 3);
  * one register and shared-memory budget: the compiled kernel reserves the larger of the
    two branches (registers are the max of both; Triton may or may not alias the two
    branches' SMEM), which bounds occupancy for *both* kinds;
  * no wgmma-pipelined persistent GEMM here: the GEMM tile is a plain Triton-style K loop
    (`pl.dot`), which may be slower than XLA's cuBLAS GEMM alone; the fused kernel wins only
    if the overlap gains more than that.
  * The tile order is static: nothing balances the two kinds at run time (POD-Attention and
    aiter's pod_attention pick the kind per CTA with atomic counters).

Measured on an H100 (JAX 0.11.2, `profiling/overlap_micro.py`, docs/overlap.md): one
launch per tile gains 0.87-1.13x over the GEMM and the attention back to back (the Triton
tile is slower than cuBLAS); with persistent GEMM programs, 100 GEMM-first 0.98x, 100
alternating 0.73x, 66 alternating 0.61x. Checked against the references in interpret mode
(tests/test_fused_gemm_decode.py) and on the GPU against back to back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.decode_attention import (
    combine_splits,
    decode_attention_reference,
    decode_work_item,
    plan_decode,
)

INTERLEAVES = ("alternate", "attention_first", "gemm_first")


def program_order(n_gemm: int, n_attn: int, interleave: str) -> np.ndarray:
    """[G] int32: what program id i runs (< n_gemm: GEMM program, else attention - n_gemm)."""
    g = n_gemm + n_attn
    if interleave == "gemm_first":
        return np.arange(g, dtype=np.int32)
    if interleave == "attention_first":
        return np.concatenate([np.arange(n_gemm, g), np.arange(n_gemm)]).astype(np.int32)
    if interleave == "alternate":
        i = np.arange(g, dtype=np.int64)
        a_before = i * n_attn // g  # attention programs among ids < i
        is_attn = (i + 1) * n_attn // g > a_before
        return np.where(is_attn, n_gemm + a_before, i - a_before).astype(np.int32)
    raise ValueError(f"interleave must be one of {INTERLEAVES}, got {interleave!r}")


def _gemm_tile(tm, tn, x_ref, w_ref, y_ref, *, block_m, block_n, block_k, precision):
    """y[tm-th block_m rows, tn-th block_n cols] = x @ w, fp32 accumulation."""
    m, k_dim = x_ref.shape
    n = w_ref.shape[1]
    mask_m, mask_n = m % block_m != 0, n % block_n != 0  # static: edges exist at all?
    m0 = tm * block_m
    n0 = tn * block_n
    row_ok = (m0 + jnp.arange(block_m)) < m
    col_ok = (n0 + jnp.arange(block_n)) < n
    kk = jnp.arange(block_k)

    def step(i, acc, masked_k):
        k0 = i * block_k
        x_mask = w_mask = None
        if masked_k:
            k_ok = (k0 + kk) < k_dim
            x_mask = jnp.broadcast_to(k_ok[None, :], (block_m, block_k))
            w_mask = jnp.broadcast_to(k_ok[:, None], (block_k, block_n))
        if mask_m:
            rm = jnp.broadcast_to(row_ok[:, None], (block_m, block_k))
            x_mask = rm if x_mask is None else x_mask & rm
        if mask_n:
            cm = jnp.broadcast_to(col_ok[None, :], (block_k, block_n))
            w_mask = cm if w_mask is None else w_mask & cm
        x_blk = x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)]
        w_blk = w_ref.at[pl.ds(k0, block_k), pl.ds(n0, block_n)]
        xt = _compat.load(x_blk, mask=x_mask, other=0) if x_mask is not None else x_blk[...]
        wt = _compat.load(w_blk, mask=w_mask, other=0) if w_mask is not None else w_blk[...]
        return acc + _compat.dot(xt, wt, precision=precision)

    acc = jnp.zeros((block_m, block_n), jnp.float32)
    n_full = k_dim // block_k
    acc = lax.fori_loop(0, n_full, functools.partial(step, masked_k=False), acc)
    if k_dim % block_k:  # the K tail (a loop of one step: its slice start must be traced)
        acc = lax.fori_loop(n_full, n_full + 1, functools.partial(step, masked_k=True), acc)
    y_blk = y_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)]
    y = acc.astype(y_ref.dtype)
    if mask_m or mask_n:
        _compat.store(y_blk, y, mask=row_ok[:, None] & col_ok[None, :])
    else:
        y_blk[...] = y


def _fused_kernel(
    order_ref,  # [G] int32
    x_ref,  # [M, K]
    w_ref,  # [K, N]
    page_tables_ref,  # [B, max_pages_padded] int32
    lengths_ref,  # [B] int32
    q_ref,  # [B, Hq, D]
    k_ref,  # [Hkv, P, page_size, D]
    v_ref,  # [Hkv, P, page_size, D]
    y_ref,  # [M, N]
    o_ref,  # [B, Hq, D] (one split) or [S, B, Hq, D] fp32
    *lse_refs,  # () or ([S, B, Hq] fp32,)
    gemm_programs: int,
    n_tiles: int,
    n_m: int,
    gemm_kw: dict,
    num_kv_heads: int,
    num_splits: int,
    attn_kw: dict,
):
    t = order_ref[pl.program_id(0)]

    def gemm(p):
        if gemm_programs == n_tiles:  # one tile per program
            _gemm_tile(p % n_m, p // n_m, x_ref, w_ref, y_ref, **gemm_kw)
            return

        def one(i, carry):
            tile = p + i * gemm_programs
            _gemm_tile(tile % n_m, tile // n_m, x_ref, w_ref, y_ref, **gemm_kw)
            return carry

        lax.fori_loop(0, (n_tiles - p + gemm_programs - 1) // gemm_programs, one, 0)

    def attention(a):
        decode_work_item(
            a,
            num_kv_heads,
            num_splits,
            page_tables_ref,
            lengths_ref,
            q_ref,
            k_ref,
            v_ref,
            o_ref,
            *lse_refs,
            **attn_kw,
        )

    lax.cond(t < gemm_programs, gemm, lambda p: attention(p - gemm_programs), t)


def _block(requested: int, extent: int) -> int:
    """Power of two, >= 16 (pl.dot), no larger than needed for `extent`."""
    return max(16, min(_compat.next_pow2(requested), _compat.next_pow2(extent)))


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "interpret",
        "block_m",
        "block_n",
        "block_k",
        "pages_per_block",
        "num_splits",
        "num_warps",
        "num_stages",
        "flat_gather",
        "gemm_programs",
        "interleave",
    ),
)
def fused_gemm_decode(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,  # [Hkv, P, page_size, D]
    page_tables: jax.Array,  # [B, max_pages_per_seq] int32
    lengths: jax.Array,  # [B] int32
    *,
    sm_scale: float,
    interpret: bool = False,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 64,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    flat_gather: bool = True,
    gemm_programs: int | None = None,
    interleave: str = "alternate",
) -> tuple[jax.Array, jax.Array]:
    """(x @ w, decode_attention(q, k_pages, v_pages, page_tables, lengths)) in one launch.

    GEMM: x [M, K] @ w [K, N] with fp32 accumulation, returned in x.dtype;
    `block_m` / `block_n` / `block_k` are its tile (powers of two >= 16, clipped to the
    shapes); `gemm_programs` (None: one per tile) fixes the number of GEMM programs.
    Attention: as `decode_attention` (lengths[b] == 0 -> zeros), tuned by the same
    `pages_per_block` / `num_splits` / `flat_gather`.  `num_warps` / `num_stages` are
    shared by both.  `interleave` orders the programs (module docstring).
    Returns (y [M, N], attn [B, Hq, D] in q.dtype).
    """
    # --- GEMM plan
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"bad GEMM shapes: x {x.shape}, w {w.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    m, k_dim = x.shape
    n = w.shape[1]
    block_m, block_n, block_k = _block(block_m, m), _block(block_n, n), _block(block_k, k_dim)
    n_m, n_n = -(-m // block_m), -(-n // block_n)
    n_tiles = n_m * n_n
    gemm_programs = n_tiles if gemm_programs is None else max(1, min(int(gemm_programs), n_tiles))
    gemm_kw = {
        "block_m": block_m,
        "block_n": block_n,
        "block_k": block_k,
        "precision": lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    }

    # --- attention plan: decode_attention's own checks and defaults
    if interleave not in INTERLEAVES:
        raise ValueError(f"interleave must be one of {INTERLEAVES}, got {interleave!r}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    page_tables, num_splits, attn_kw = plan_decode(
        q, k_pages, v_pages, page_tables, lengths, sm_scale=sm_scale,
        pages_per_block=pages_per_block, num_splits=num_splits, flat_gather=flat_gather)
    n_attn = batch * num_kv_heads * num_splits

    # --- one launch
    order = jnp.asarray(program_order(gemm_programs, n_attn, interleave))
    kernel = functools.partial(
        _fused_kernel,
        gemm_programs=gemm_programs,
        n_tiles=n_tiles,
        n_m=n_m,
        gemm_kw=gemm_kw,
        num_kv_heads=num_kv_heads,
        num_splits=num_splits,
        attn_kw=attn_kw,
    )
    y_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    if num_splits == 1:
        attn_shapes = (jax.ShapeDtypeStruct((batch, num_q_heads, head_dim), q.dtype),)
    else:
        attn_shapes = (
            jax.ShapeDtypeStruct((num_splits, batch, num_q_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, batch, num_q_heads), jnp.float32),
        )
    res = pl.pallas_call(
        kernel,
        out_shape=(y_shape, *attn_shapes),
        grid=(gemm_programs + n_attn,),
        compiler_params=_compat.triton_params(num_warps, num_stages),
        interpret=interpret,
        name=(
            f"fused_gemm{block_m}x{block_n}x{block_k}_decode_h{attn_kw['block_h']}"
            f"_k{attn_kw['pages_per_block'] * k_pages.shape[2]}"
        ),
    )(order, x, w, page_tables, lengths.astype(jnp.int32), q, k_pages, v_pages)
    if num_splits == 1:
        y, attn = res
    else:
        y, o_parts, lse = res
        attn = combine_splits(o_parts, lse, q.dtype)
    return y, attn


def fused_gemm_decode_reference(
    x: jax.Array,
    w: jax.Array,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float,
    interpret: bool = False,
    **unused_tuning,
) -> tuple[jax.Array, jax.Array]:
    """Pure jnp: (x @ w, fp32 at HIGHEST precision, in x.dtype; decode_attention_reference)."""
    del interpret, unused_tuning
    y = jnp.matmul(
        x, w, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    ).astype(x.dtype)
    attn = decode_attention_reference(q, k_pages, v_pages, page_tables, lengths, sm_scale=sm_scale)
    return y, attn
