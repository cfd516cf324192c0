"""The page allocator (free list + reference counts) and the KV write."""
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax.config import get_preset
from nanoflow_jax.kv_cache import (OutOfPages, PageAllocator, PageTable, init_kv_cache,
                                   kv_cache_spec, page_bytes, write_kv)


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


def test_page_table_equals_a_table_built_from_scratch():
    """Random appends and releases (growing rows and width past their start) keep every
    row equal to its owner's pages; gather gives the rows asked for, zero rows after."""
    rng = np.random.default_rng(0)
    table = PageTable(width=3, rows=2)
    owned: dict[int, list[int]] = {}  # row -> pages, the from-scratch truth
    next_page = 1
    for _ in range(300):
        if owned and rng.random() < 0.3:
            row = int(rng.choice(list(owned)))
            table.release(row)
            del owned[row]
        else:
            row = int(rng.choice(list(owned))) if owned and rng.random() < 0.6 else -1
            pages = list(range(next_page, next_page + int(rng.integers(1, 4))))
            next_page += len(pages)
            got = table.append(row, pages)
            assert got > 0 and (row < 0 or got == row) and (row >= 0 or got not in owned)
            owned[got] = owned.get(got, []) + pages
        want = np.zeros_like(table.table)
        for r, pages in owned.items():
            want[r, :len(pages)] = pages
            np.testing.assert_array_equal(table.pages(r), pages)
        np.testing.assert_array_equal(table.table, want)
    assert table.table.shape[0] > 3 and table.table.shape[1] > 3  # both grew
    rows = np.array(list(owned), np.intp)
    width = table.table.shape[1]
    for w in (width - 1, width + 2):
        got = table.gather(rows, len(rows) + 2, w)
        assert got.shape == (len(rows) + 2, w)
        full = np.zeros((len(rows) + 2, width + 2), np.int32)
        full[:len(rows), :width] = want[rows]
        np.testing.assert_array_equal(got, full[:, :w])


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
