"""The paged KV cache: device arrays per layer, and the host-side page allocator.

Layout, per layer: K and V each `[num_kv_heads, num_pages, page_size, head_dim]`. One
(KV head, page) is a contiguous page_size·head_dim block (4 KiB at 16 × 128 bf16): the decode
and prefill kernels give a program one KV head and stream these blocks through the page
table, so every load is a contiguous tile. A token's slot is `page * page_size + offset`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.config import ModelConfig

# One (k_pages, v_pages) pair per layer.
KVCache = list[tuple[jax.Array, jax.Array]]


def page_bytes(config: ModelConfig, page_size: int, dtype, tensor_parallel_size: int = 1) -> int:
    """Bytes one page takes on each device across all layers, K and V (a device holds its
    shard's KV heads under tensor parallelism)."""
    from nanoflow_jax.parallel import kv_heads_per_shard

    heads = kv_heads_per_shard(config, tensor_parallel_size)
    per_layer = 2 * heads * page_size * config.head_dim
    return config.num_layers * per_layer * jnp.dtype(dtype).itemsize


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype,
                  mesh=None) -> KVCache:
    """Zeroed pages; on a tensor-parallel `mesh` sharded by KV head (`parallel.kv_sharding`),
    each device allocating only its heads."""
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    heads, placement = config.num_kv_heads, {}
    if mesh is not None:
        from nanoflow_jax import parallel

        heads = parallel.kv_cache_heads(config, parallel.mesh_size(mesh))
        placement = {"out_shardings": parallel.kv_sharding(mesh)}
    shape = (heads, num_pages, page_size, config.head_dim)
    zeros = jax.jit(lambda: [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                             for _ in range(config.num_layers)], **placement)
    return zeros()


def kv_cache_spec(config: ModelConfig, num_pages: int, page_size: int, dtype,
                  mesh=None) -> KVCache:
    """The shapes, dtypes and shardings `init_kv_cache` would give, nothing allocated: what
    programs that take the cache are compiled for before it exists."""
    spec = jax.eval_shape(lambda: init_kv_cache(config, num_pages, page_size, dtype, mesh))
    if mesh is None:
        return spec
    from nanoflow_jax import parallel

    sharding = parallel.kv_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        spec)


def slot_pages(slots: jax.Array, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
    """slots [T] (-1 = padding) -> (page [T], offset [T]) for a scatter into pages. Padding row
    t gets page num_pages + t: out of range, so mode="drop" skips it, and unlike any other
    row's, so the indices stay unique."""
    rows = jnp.arange(slots.shape[0], dtype=slots.dtype)
    return jnp.where(slots >= 0, slots // page_size, num_pages + rows), slots % page_size


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, *,
    unique: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new tokens' K/V ([T, Hkv, D]) into their slots ([T]; -1 = padding, dropped).

    Under jit with the cache donated this is an in-place update of T·Hkv rows of D values.
    `unique` (the default) tells XLA that no two rows share a slot (a slot holds one token of
    one sequence, and a step writes only slots no other sequence holds; padding rows get
    distinct pages here), so it stores each element plainly. `unique=False` makes every
    element an atomic store, for bf16 a compare-and-swap loop on its 32-bit word;
    `profiling/kv_write_check.py` times both and the other ways to write.
    """
    page, offset = slot_pages(slots, k_pages.shape[1], k_pages.shape[2])

    def put(pages, x):  # x [T, Hkv, D] -> [Hkv, T, D], the layout of pages[:, page, offset]
        return pages.at[:, page, offset].set(jnp.swapaxes(x, 0, 1), mode="drop",
                                             unique_indices=unique)

    return put(k_pages, k), put(v_pages, v)


class OutOfPages(RuntimeError):
    """Raised by `PageAllocator.allocate` when the free list is too short; callers preempt."""


class PageAllocator:
    """Free list of page ids with reference counts (so a prefix cache can share pages)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._refcount = np.zeros(num_pages, np.int32)
        # Pop from the end: recently freed pages are reused first (they may still be in L2).
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._refcount[pages] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Another owner of already-allocated pages."""
        if (self._refcount[pages] <= 0).any():
            raise ValueError("sharing a page that is not allocated")
        self._refcount[pages] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"page {p} freed twice")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)


class PageTable:
    """The page table of every sequence that holds pages, kept between steps: row r > 0 of
    `table` [rows, width] int32 lists one sequence's pages, zero-padded. Allocations append
    to a row and frees clear it, so a step's page tables are one gather of its sequences'
    rows (`gather`) instead of a fill per sequence. Row 0 stays zero: padding rows gather
    it. Rows and width grow on demand."""

    def __init__(self, width: int = 1, rows: int = 16):
        rows += 1  # and the zero row
        self.table = np.zeros((rows, max(width, 1)), np.int32)
        self.num_pages = np.zeros(rows, np.int32)  # [rows] pages in each row
        self._free_rows = list(range(rows - 1, 0, -1))  # pop from the end: low rows first

    def append(self, row: int, pages: list[int]) -> int:
        """Add `pages` to `row` (-1: a new row); returns the row."""
        if row < 0:
            if not self._free_rows:
                self._grow(rows=2 * len(self.table))
            row = self._free_rows.pop()
        n = int(self.num_pages[row])
        if n + len(pages) > self.table.shape[1]:
            self._grow(width=max(2 * self.table.shape[1], n + len(pages)))
        self.table[row, n:n + len(pages)] = pages
        self.num_pages[row] = n + len(pages)
        return row

    def release(self, row: int) -> None:
        """Clear `row` (back to zeros) and free it; -1 (no row) is ignored."""
        if row <= 0:
            return
        self.table[row, :self.num_pages[row]] = 0
        self.num_pages[row] = 0
        self._free_rows.append(row)

    def pages(self, row: int) -> np.ndarray:
        """[num_pages] int32: a view of one row's pages (valid until the next `append`)."""
        return self.table[row, :self.num_pages[row]]

    def gather(self, rows: np.ndarray, num_rows: int, width: int) -> np.ndarray:
        """[num_rows, width] int32: the tables of `rows` [n ≤ num_rows], then zero rows; each
        zero-padded or cut to `width` (callers check `num_pages[rows]` against it)."""
        index = np.zeros(num_rows, np.intp)
        index[:len(rows)] = rows
        if self.table.shape[1] >= width:
            return self.table[index, :width]
        out = np.zeros((num_rows, width), np.int32)
        out[:, :self.table.shape[1]] = self.table[index]
        return out

    def _grow(self, rows: int | None = None, width: int | None = None) -> None:
        old = self.table
        rows, width = rows or old.shape[0], width or old.shape[1]
        self.table = np.zeros((rows, width), np.int32)
        self.table[:old.shape[0], :old.shape[1]] = old
        self.num_pages = np.concatenate([self.num_pages,
                                         np.zeros(rows - old.shape[0], np.int32)])
        self._free_rows[:0] = range(rows - 1, old.shape[0] - 1, -1)
