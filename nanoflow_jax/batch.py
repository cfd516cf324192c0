"""The flat dense batch handed to the device each iteration.

Tokens are laid out decode rows first (one token per decoding sequence), then the prompt
chunks of prefilling sequences back to back, then padding, so that a nano-batch is a
contiguous slice of the token axis. Every array is padded to a `BatchShape` (a bucket), so the
set of compiled programs is small and fixed at start-up.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import flax.struct
import jax
import numpy as np

from nanoflow_jax.models.paged_attention import PagedMetadata


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """A bucket: the static shapes of one compiled step."""

    num_tokens: int  # T, all rows
    num_decode: int  # Bd ≤ T: at most this many decode rows, at the front of T
    num_prefill_seqs: int  # Sp: at most this many prompt chunks, after the decode rows
    max_pages: int  # page-table width: pages of the longest allowed sequence

    @property
    def num_logits(self) -> int:
        """Rows whose logits can be computed: every decode row and each chunk's last token.
        The used ones come first (decode i at row i, chunk j at row num decodes + j), so a
        step's logits can be taken from a prefix of them."""
        return self.num_decode + self.num_prefill_seqs


class SeqChunk(NamedTuple):  # a tuple, not a dataclass: hundreds are made every step
    """What one sequence contributes to a step."""

    token_ids: Sequence[int]  # new tokens (a decode has 1); ignored where future_row >= 0
    start_pos: int  # position of the first new token (= tokens already in the cache)
    page_ids: Sequence[int]  # page table, covering start_pos + len(token_ids) tokens
    future_row: int = -1  # decode: the input token is this row of the previous step's samples


class DecodeRows(NamedTuple):
    """The decodes of a step as columns (one token each): what the engine builds from its
    persistent page table (`kv_cache.PageTable`) without a Python loop over the sequences."""

    token_ids: np.ndarray  # [n] int32 input tokens (ignored where future_rows >= 0)
    future_rows: np.ndarray  # [n] int32 row of the previous step's samples, or -1
    positions: np.ndarray  # [n] int32 position of the new token
    page_tables: np.ndarray  # [≥ n, any width] int32 each row's pages, zero-padded
    num_pages: np.ndarray  # [n] int32 pages in each row of page_tables

    @classmethod
    def of(cls, chunks: Sequence[SeqChunk], max_pages: int) -> DecodeRows:
        """From one-token SeqChunks (a fill per chunk: tests and profiling)."""
        n = len(chunks)
        num_pages = np.fromiter((len(c.page_ids) for c in chunks), np.int32, n)
        tables = np.zeros((n, max(max_pages, num_pages.max(initial=0))), np.int32)
        for i, chunk in enumerate(chunks):
            tables[i, :num_pages[i]] = chunk.page_ids
        return cls(np.array([c.token_ids[0] for c in chunks], np.int32).reshape(n),
                   np.fromiter((c.future_row for c in chunks), np.int32, n),
                   np.fromiter((c.start_pos for c in chunks), np.int32, n), tables, num_pages)


@flax.struct.dataclass
class Batch:
    token_ids: jax.Array  # [T] int32 (0 where the token comes from the previous step)
    future_rows: jax.Array  # [T] int32 row of the previous step's samples, or -1
    positions: jax.Array  # [T] int32
    logits_indices: jax.Array  # [R] int32 rows of T whose logits are sampled, used ones first
    attn: PagedMetadata


def build_batch(
    decodes: Sequence[SeqChunk] | DecodeRows, prefills: Sequence[SeqChunk], shape: BatchShape,
    page_size: int,
) -> Batch:
    """Host-side (numpy) batch for one step. Raises ValueError if it does not fit `shape`."""
    t, bd, sp, m = shape.num_tokens, shape.num_decode, shape.num_prefill_seqs, shape.max_pages
    if not isinstance(decodes, DecodeRows):
        decodes = DecodeRows.of(decodes, m)
    nd = len(decodes.positions)
    num_prefill_tokens = sum(len(c.token_ids) for c in prefills)
    if (nd > bd or len(prefills) > sp or nd + num_prefill_tokens > t):
        raise ValueError(f"{nd} decodes + {len(prefills)} chunks "
                         f"({num_prefill_tokens} tokens) do not fit {shape}")
    token_ids = np.zeros(t, np.int32)
    future_rows = np.full(t, -1, np.int32)
    positions = np.zeros(t, np.int32)
    slots = np.full(t, -1, np.int32)
    logits_indices = np.zeros(shape.num_logits, np.int32)
    decode_lengths = np.zeros(bd, np.int32)
    prefill_tables = np.zeros((sp, m), np.int32)
    query_start = np.zeros(sp + 1, np.int32)
    seq_lens = np.zeros(sp, np.int32)

    def place(chunk: SeqChunk, row: int, table: np.ndarray) -> int:
        """Fill the token rows of one chunk starting at `row`; returns the row after it."""
        n = len(chunk.token_ids)
        pos = np.arange(chunk.start_pos, chunk.start_pos + n)
        pages = np.asarray(chunk.page_ids, np.int32)
        if len(pages) * page_size < chunk.start_pos + n or len(pages) > m:
            raise ValueError(f"{len(pages)} pages cannot hold {chunk.start_pos + n} tokens "
                             f"(page table width {m})")
        token_ids[row:row + n] = chunk.token_ids
        future_rows[row:row + n] = chunk.future_row
        positions[row:row + n] = pos
        slots[row:row + n] = pages[pos // page_size] * page_size + pos % page_size
        table[:len(pages)] = pages
        return row + n

    if nd and decodes.num_pages.max() > m:
        raise ValueError(f"{decodes.num_pages.max()} pages exceed the page table width {m}")
    decode_tables = decodes.page_tables
    if decode_tables.shape != (bd, m):  # pad with zero rows, cut to the width
        full = np.zeros((bd, m), np.int32)
        w = min(m, decode_tables.shape[1])
        full[:nd, :w] = decode_tables[:nd, :w]
        decode_tables = full
    if nd:  # one token each, as columns
        pos = decodes.positions
        page_index = pos // page_size
        if (page_index >= decodes.num_pages).any():
            raise ValueError("a decode's pages cannot hold its new token")
        token_ids[:nd] = decodes.token_ids
        future_rows[:nd] = decodes.future_rows
        positions[:nd] = pos
        slots[:nd] = decode_tables[np.arange(nd), page_index] * page_size + pos % page_size
        decode_lengths[:nd] = pos + 1
        logits_indices[:nd] = np.arange(nd)
    row = query_start[0] = nd  # chunks start right after the decode rows
    for j, chunk in enumerate(prefills):
        row = place(chunk, row, prefill_tables[j])
        query_start[j + 1] = row
        seq_lens[j] = chunk.start_pos + len(chunk.token_ids)
        logits_indices[nd + j] = row - 1
    query_start[len(prefills) + 1:] = row  # unused chunk slots are empty

    meta = PagedMetadata(
        slots=slots, decode_page_tables=decode_tables, decode_lengths=decode_lengths,
        prefill_page_tables=prefill_tables, prefill_query_start=query_start,
        prefill_seq_lens=seq_lens,
    )
    return Batch(token_ids=token_ids, future_rows=future_rows, positions=positions,
                 logits_indices=logits_indices, attn=meta)
