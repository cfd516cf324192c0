"""Write new tokens' K and V into the paged KV cache, in place (Pallas).

Layout, per layer (see nanoflow_jax/kv_cache.py):
  k_pages, v_pages: [Hkv, num_pages, page_size, D]   (the cache, updated in place)
  k, v:             [T, Hkv, D]                       (the new tokens)
  slots:            [T] int32, page * page_size + offset; -1 = padding (nothing written)
Token t's K goes to k_pages[:, slots[t] // page_size, slots[t] % page_size, :] (Hkv rows of D
contiguous values, one per head, heads num_pages * page_size * D apart); V likewise. Slots are
distinct, so programs never write the same row and their order does not matter.

Kernel: grid = (ceil(T / tokens_per_program),). A program loads the [tpp, Hkv, D] K and V of
its tokens (one masked load each: padding and tail tokens are not read) and stores them with
one masked store each through per-token (page, offset) pointers: a pure copy, bit-exact. The
cache goes in and out through `input_output_aliases`, so under
`jax.jit(..., donate_argnums=(0, 1))` only the new K and V rows move (4 * T * Hkv * D * itemsize
bytes read + written). XLA's scatter (`kv_cache.write_kv`, the reference) takes 0.07 ms for
T = 1024 on an H100, about 4 % of the copy bandwidth; the bytes alone take ~3 us.

Masked-off lanes are out of bounds: padding and tail tokens get page `num_pages`, and heads
past Hkv (when Hkv is padded to a power of two) are >= Hkv. On the GPU a masked lane touches no
memory; in interpret mode the store becomes a scatter, which drops out-of-bounds rows. (An
in-bounds dummy slot would make that scatter write the slot's old value back, racing a real
token that writes the same slot in the same program.) So interpret mode cannot see a missing
mask: the masks matter on the GPU only.

Backend: Pallas *Triton*, like the attention kernels: per-token page addresses are plain
pointer arithmetic, masked stores skip padding, and interpret mode runs it on CPU for the
tests. Mosaic GPU (JAX's supported Hopper backend) is the alternative; there each scattered
(token, head) row of D values would be its own async copy, and its CPU interpreter has the
gaps noted in decode_attention.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat

# Default tile: about this many elements of K (and of V) per program, i.e. 32 per thread at
# 4 warps = four 16-byte bf16 vectors: 4 tokens at Hkv = 8, D = 128 (8 KiB of K + 8 KiB of V).
_TILE_ELEMS = 4096


def _kv_write_kernel(
    slots_ref,  # [T] int32
    k_ref,  # [T, Hkv, D]
    v_ref,  # [T, Hkv, D]
    k_in_ref,  # [Hkv, P, page_size, D]: aliased to k_out_ref, never read
    v_in_ref,  # [Hkv, P, page_size, D]: aliased to v_out_ref, never read
    k_out_ref,  # [Hkv, P, page_size, D]
    v_out_ref,  # [Hkv, P, page_size, D]
    *,
    tokens_per_program: int,
    block_h: int,  # Hkv rounded up to a power of two (Triton block shapes)
):
    del k_in_ref, v_in_ref
    num_tokens, num_kv_heads, head_dim = k_ref.shape
    num_pages, page_size = k_out_ref.shape[1], k_out_ref.shape[2]
    tok = pl.program_id(0) * tokens_per_program + jnp.arange(tokens_per_program)  # [tpp]
    slot = _compat.load(slots_ref.at[tok], mask=tok < num_tokens, other=-1)  # [tpp]
    valid = slot >= 0
    page = jnp.where(valid, slot // page_size, num_pages)  # out of bounds when masked off
    offset = slot % page_size

    h = jnp.arange(block_h)
    d = jnp.arange(head_dim)
    mask = valid[:, None, None]  # [tpp, 1, 1]
    if block_h != num_kv_heads:  # static: only when Hkv is not a power of two
        mask = mask & (h < num_kv_heads)[None, :, None]
    src = (tok[:, None, None], h[None, :, None], d[None, None, :])  # [tpp, block_h, D]
    dst = (h[None, :, None], page[:, None, None], offset[:, None, None], d[None, None, :])
    for in_ref, out_ref in ((k_ref, k_out_ref), (v_ref, v_out_ref)):
        x = _compat.load(in_ref.at[src], mask=mask, other=0)
        _compat.store(out_ref.at[dst], x.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("tokens_per_program", "num_warps", "interpret"))
def write_kv_pallas(
    k_pages: jax.Array,  # [Hkv, P, page_size, D]
    v_pages: jax.Array,  # [Hkv, P, page_size, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    slots: jax.Array,  # [T] int, -1 = padding
    *,
    tokens_per_program: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`kv_cache.write_kv` as one Pallas kernel; returns the updated (k_pages, v_pages).

    The cache is aliased input -> output: donate it (`jax.jit(..., donate_argnums=(0, 1))`,
    or pass it through an outer jit that donates it) for an in-place update; otherwise XLA
    copies it first. `tokens_per_program` (a power of two; None: ~4096 elements of K per
    program, 4 at Hkv = 8, D = 128) sets the grid, T / tokens_per_program programs.
    """
    num_kv_heads, _, _, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.shape} != v_pages {v_pages.shape}")
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} / v {v.shape} do not match the cache {k_pages.shape}")
    if slots.shape != (num_tokens,):
        raise ValueError(f"slots {slots.shape} != ({num_tokens},)")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    if num_tokens == 0:
        return k_pages, v_pages
    block_h = _compat.next_pow2(num_kv_heads)
    if tokens_per_program is None:
        tokens_per_program = max(1, _TILE_ELEMS // (block_h * head_dim))
    # No wider than the batch (T = 1 gets one 1-token program); Triton needs powers of two.
    tokens_per_program = _compat.next_pow2(min(tokens_per_program, num_tokens))
    kernel = functools.partial(
        _kv_write_kernel, tokens_per_program=tokens_per_program, block_h=block_h
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
            jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
        ),
        grid=(pl.cdiv(num_tokens, tokens_per_program),),
        input_output_aliases={3: 0, 4: 1},  # k_pages -> out 0, v_pages -> out 1
        compiler_params=_compat.triton_params(num_warps, num_stages=1),
        interpret=interpret,
        name=f"kv_write_t{tokens_per_program}",
    )(slots.astype(jnp.int32), k, v, k_pages, v_pages)
