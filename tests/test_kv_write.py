"""Pallas KV write (interpret mode, CPU) vs `kv_cache.write_kv`: a copy, so bit-exact.

Fresh random inputs every run (the seed is in the failure message); the cache is filled with
random values so that any stray write, or a padding token written, shows.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.kv_cache import write_kv
from pallas_kernels.experimental.kv_write import write_kv_pallas
from tests.helpers import random_seed


def _make(seed, *, tokens, hkv, d, num_pages, page_size, dtype, pad_frac=0.25):
    """Cache [Hkv, P, ps, D] and new K/V [T, Hkv, D] (random), slots [T]: distinct, scattered
    over the cache (the very last slot among them), a `pad_frac` share of them -1."""
    rng = np.random.default_rng(seed)
    cast = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    cache = (cast(hkv, num_pages, page_size, d), cast(hkv, num_pages, page_size, d))
    new = (cast(tokens, hkv, d), cast(tokens, hkv, d))
    last = num_pages * page_size - 1
    slots = rng.choice(last, tokens, replace=False).astype(np.int32)
    slots[rng.integers(tokens)] = last  # still distinct: `last` was not drawn
    slots[rng.random(tokens) < pad_frac] = -1
    return cache, new, jnp.asarray(slots)


def _check(out, ref, cache, slots, page_size, seed):
    """Bit-exact against the reference; slots not written keep their old values."""
    slots = np.asarray(slots)
    for got, want, old in zip(out, ref, cache):
        got, want, old = np.asarray(got), np.asarray(want), np.asarray(old)
        assert got.dtype == want.dtype, f"seed={seed}"
        np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")
        untouched = np.ones(old.shape[1:3], bool)  # [P, ps]
        written = slots[slots >= 0]
        untouched[written // page_size, written % page_size] = False
        np.testing.assert_array_equal(got[:, untouched], old[:, untouched], f"seed={seed}")


CASES = [
    # (T, Hkv, D, num_pages, page_size, tokens_per_program, dtype, pad_frac)
    (13, 8, 128, 8, 4, 4, jnp.bfloat16, 0.25),  # T not a multiple of tpp
    (37, 1, 64, 16, 8, 8, jnp.bfloat16, 0.25),
    (24, 8, 64, 6, 8, None, jnp.float32, 0.25),  # default tpp, a nearly full cache
    (10, 3, 128, 5, 4, 2, jnp.float32, 0.25),  # Hkv not a power of two (padded heads)
    (1, 8, 128, 4, 4, None, jnp.bfloat16, 0.0),  # T = 1
    (1, 1, 64, 3, 4, 4, jnp.float32, 0.0),  # T = 1, tpp > T
    (6, 1, 128, 4, 4, 4, jnp.bfloat16, 1.0),  # only padding: nothing written
    (9, 8, 64, 4, 16, 1, jnp.float32, 0.5),  # one token per program
]


@pytest.mark.parametrize("tokens,hkv,d,num_pages,page_size,tpp,dtype,pad_frac", CASES)
def test_write_kv_pallas_matches_reference(tokens, hkv, d, num_pages, page_size, tpp, dtype,
                                           pad_frac):
    seed = random_seed()
    cache, new, slots = _make(seed, tokens=tokens, hkv=hkv, d=d, num_pages=num_pages,
                              page_size=page_size, dtype=dtype, pad_frac=pad_frac)
    out = write_kv_pallas(*cache, *new, slots, tokens_per_program=tpp, interpret=True)
    _check(out, write_kv(*cache, *new, slots), cache, slots, page_size, seed)


def test_write_kv_pallas_jit_donated():
    """Inside jit with the cache donated: aliased in place, same result as the reference."""
    seed = random_seed()
    cache, new, slots = _make(seed, tokens=21, hkv=2, d=64, num_pages=8, page_size=4,
                              dtype=jnp.bfloat16)
    ref = write_kv(*cache, *new, slots)
    kernel = functools.partial(write_kv_pallas, tokens_per_program=4, interpret=True)
    write = jax.jit(kernel, donate_argnums=(0, 1))
    compiled = write.lower(*cache, *new, slots).compile().as_text()
    assert "input_output_alias={ {0}: (0" in compiled and "{1}: (1" in compiled
    donated = tuple(jnp.array(x, copy=True) for x in cache)
    out = write(*donated, *new, slots)
    assert all(x.is_deleted() for x in donated)  # the buffers went to the output
    _check(out, ref, cache, slots, 4, seed)


def test_write_kv_pallas_rejects_bad_shapes():
    cache = jnp.zeros((2, 4, 4, 64), jnp.float32)
    k = jnp.zeros((3, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="do not match"):
        write_kv_pallas(cache, cache, k[:, :1], k[:, :1], jnp.zeros(3, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="slots"):
        write_kv_pallas(cache, cache, k, k, jnp.zeros(2, jnp.int32), interpret=True)
