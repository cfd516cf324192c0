"""The scheduler: which tokens of which sequences go into the next iteration's dense batch.

First come, first served. Each iteration fills a token budget (the dense batch) with every
running decode first, one token each, then prompt chunks (chunked prefill: a prompt longer
than what is left of the budget is split across iterations), continuing running prefills before
admitting waiting requests, in arrival order. A request is admitted only while
  - fewer than `max_running` sequences run,
  - its first chunk's pages are free with a page of headroom for each running decode, and
  - the projected KV use of every running sequence and its own still fits the cache (as
    NanoFlow does, which keeps preemptions rare): a sequence whose request set max_tokens may
    reach prompt + max_tokens tokens (add_request caps that at max_model_len); one without
    has no known end and counts what it holds now.
When pages run out all the same (sequences without max_tokens grow past their projection), the
youngest running sequence is preempted by recompute: its pages are freed and it waits at the
head of the queue, to be prefilled again (prompt + what it had generated) later.

The host never waits for the device: a sequence whose last token is still being sampled
(`PENDING`) is scheduled as a decode whose input is that future token.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.sequence import PENDING, Sequence, Status
from nanoflow_jax.kv_cache import PageAllocator, PageTable


class Chunk(NamedTuple):  # a tuple, not a dataclass: one per running sequence every step
    """Tokens [start, start + num_tokens) of `seq` go into this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the chunk ends at the sequence's last token: a new token is sampled


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    decodes: list[Chunk]
    prefills: list[Chunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: PageAllocator,
                 max_running: int | None = None, max_pages: int | None = None):
        """`max_running`: most running sequences (the engine passes the compiled decode rows);
        None: config.max_num_seqs, or no cap but the KV cache and the token budget.
        `max_pages`: the page table's width (it grows past it if a sequence needs more)."""
        self.config = config
        self.allocator = allocator
        self.max_running = max_running or config.max_num_seqs or float("inf")
        # Only running sequences hold pages: a row each.
        self.page_table = PageTable(max_pages or self._pages_for(config.max_model_len or 1),
                                    rows=int(min(self.max_running, 1024)))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest admission first
        # Projected pages of each sequence admitted with a max_tokens (0: none), by identity.
        self._projected: dict[Sequence, int] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues for good and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free_pages(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def _projected_pages(self, seq: Sequence) -> int:
        """Pages `seq` may come to hold: prompt + max_tokens if its request set max_tokens
        (the last token's K/V is never written: one to spare), else what it holds now."""
        if seq.params.max_tokens is not None:
            return self._pages_for(len(seq.prompt_token_ids) + seq.max_tokens)
        return 0

    def _reserved_pages(self) -> int:
        """Pages the running sequences may come to hold (the admission test's left side)."""
        projected = self._projected
        if len(projected) > 2 * len(self.running) + 64:  # forget finished sequences
            self._projected = projected = {s: projected.get(s, 0) for s in self.running}
        return sum(projected.get(s) or max(len(s.pages), self._pages_for(s.num_tokens + 1))
                   for s in self.running)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` tokens, if the free list allows."""
        need = self._pages_for(num_tokens) - len(seq.pages)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            pages = self.allocator.allocate(need)
            seq.pages += pages
            seq.page_row = self.page_table.append(seq.page_row, pages)
        return True

    def _free_pages(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages)
        self.page_table.release(seq.page_row)
        seq.pages, seq.page_row = [], -1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_pages(seq)
        seq.num_computed, seq.status = 0, Status.WAITING
        self.waiting.appendleft(seq)  # youngest preempted first, so older ones end up ahead

    def _make_room(self, seq: Sequence, num_tokens: int, keep: set, preempted: list) -> bool:
        """Preempt the youngest running sequences not in `keep` until `seq` fits."""
        while not self._grow(seq, num_tokens):
            victims = [s for s in reversed(self.running) if s is not seq and s not in keep]
            if not victims:
                return False
            self._preempt(victims[0])
            preempted.append(victims[0])
        return True

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        decodes: list[Chunk] = []
        prefills: list[Chunk] = []
        preempted: list[Sequence] = []
        scheduled: set = set()

        # 1. Every running decode: one token each, oldest first. (This loop runs over every
        # running sequence every step: the common case is kept to a few comparisons.)
        page_size, running = cfg.page_size, Status.RUNNING
        others = []  # the running sequences not decoding: candidates for step 2
        for seq in list(self.running):
            if budget == 0:
                break  # (then step 2 has no budget either)
            out, start = seq.output_token_ids, seq.num_computed
            if (seq.status is not running or len(out) >= seq.max_tokens  # done generating
                    or len(seq.prompt_token_ids) + len(out) - start != 1):
                others.append(seq)
                continue
            if start >= len(seq.pages) * page_size and not self._make_room(
                    seq, start + 1, scheduled, preempted):
                self._preempt(seq)  # everything else is scheduled: seq itself waits
                preempted.append(seq)
                continue
            decodes.append(Chunk(seq, start, 1, samples=True))
            scheduled.add(seq)
            budget -= 1

        # 2. Prompt chunks of running sequences that are part-way through their prefill.
        for seq in others:
            remaining = seq.num_tokens - seq.num_computed
            if seq.status is not Status.RUNNING or remaining <= 1:
                continue
            if budget == 0 or len(prefills) == cfg.max_prefill_seqs:
                break
            n = min(remaining, budget)
            if not self._make_room(seq, seq.num_computed + n, scheduled, preempted):
                continue
            prefills.append(Chunk(seq, seq.num_computed, n, samples=n == remaining))
            scheduled.add(seq)
            budget -= n

        # 3. Admit waiting requests in arrival order while pages and the budget allow.
        reserved = None  # projected pages of the running sequences, summed when first needed
        while (self.waiting and budget > 0 and len(prefills) < cfg.max_prefill_seqs
               and len(self.running) < self.max_running):
            seq = self.waiting[0]
            if seq.has_pending or seq in preempted:  # resumes once its last token is known
                break
            n = min(seq.num_tokens, budget)
            headroom = len(self.running)  # a page each for the running decodes to grow into
            if self._pages_for(n) + headroom > self.allocator.num_free:
                break
            projected = self._projected_pages(seq)
            need = projected or self._pages_for(seq.num_tokens + 1)
            if reserved is None:
                reserved = self._reserved_pages()
            if reserved + need > self.allocator.num_pages:
                break
            self._projected[seq] = projected
            reserved += need
            self.waiting.popleft()
            self._grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            prefills.append(Chunk(seq, 0, n, samples=n == seq.num_tokens))
            scheduled.add(seq)
            budget -= n

        # The chunks' K/V will be in the cache once this step runs; sampled tokens are pending.
        for chunk in decodes:
            chunk.seq.num_computed += 1
            chunk.seq.output_token_ids.append(PENDING)
        for chunk in prefills:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens
            if chunk.samples:
                chunk.seq.output_token_ids.append(PENDING)
        return SchedulerOutput(decodes, prefills, preempted)
