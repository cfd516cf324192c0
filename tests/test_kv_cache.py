"""The page allocator (free list + reference counts) and the KV write."""
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import get_preset
from nanoflow_jax.kv_cache import (OutOfPages, PageAllocator, init_kv_cache, kv_cache_spec,
                                   page_bytes, write_kv)


def test_allocator_free_list_and_refcounts():
    alloc = PageAllocator(8)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert sorted(a + b) == list(range(8)) and alloc.num_free == 0
    with pytest.raises(OutOfPages):
        alloc.allocate(1)
    alloc.share(a)  # a second owner (a prefix cache): freeing once keeps the pages
    alloc.free(a)
    assert alloc.num_free == 0
    alloc.free(a)
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(a[:1])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.share(a[:1])
    assert sorted(alloc.allocate(3)) == sorted(a)


@pytest.mark.parametrize("unique", [False, True])
def test_write_kv_fills_slots_and_drops_padding(unique):
    cfg = get_preset("tiny-llama")
    (k_pages, v_pages), = init_kv_cache(cfg, 6, 4, jnp.float32)[:1]
    rng = np.random.default_rng()
    slots = np.array([5, 17, -1, 0, -1, 23], np.int32)  # -1: padding tokens
    k = rng.standard_normal((6, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
    v = rng.standard_normal((6, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
    k_pages, v_pages = write_kv(k_pages, v_pages, jnp.asarray(k), jnp.asarray(v), slots,
                                unique=unique)
    k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)
    for t, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(k_pages[:, slot // 4, slot % 4], k[t])
            np.testing.assert_array_equal(v_pages[:, slot // 4, slot % 4], v[t])
    written = {(s // 4, s % 4) for s in slots if s >= 0}
    untouched = [(p, o) for p in range(6) for o in range(4) if (p, o) not in written]
    assert all(not k_pages[:, p, o].any() and not v_pages[:, p, o].any() for p, o in untouched)
    with pytest.raises(ValueError, match="power of two"):
        init_kv_cache(cfg, 4, 12, jnp.float32)


def test_kv_cache_spec_matches_the_cache_and_page_bytes():
    cfg = get_preset("tiny-qwen2")
    cache = init_kv_cache(cfg, 5, 8, jnp.bfloat16)
    spec = kv_cache_spec(cfg, 5, 8, jnp.bfloat16)
    assert [(k.shape, k.dtype, v.shape, v.dtype) for k, v in cache] == \
        [(k.shape, k.dtype, v.shape, v.dtype) for k, v in spec]
    assert sum(k.nbytes + v.nbytes for k, v in cache) == 5 * page_bytes(cfg, 8, jnp.bfloat16)
