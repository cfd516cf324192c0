"""The scheduler: which tokens of which sequences go into the next iteration's dense batch.

First come, first served. Each iteration fills a token budget (the dense batch) with every
running decode first, one token each, then prompt chunks (chunked prefill: a prompt longer
than what is left of the budget is split across iterations), continuing running prefills before
admitting waiting requests. A request is admitted only when its chunk's pages are free with
headroom for the running decodes. When pages run out, the youngest running sequence is
preempted by recompute: its pages are freed and it waits at the head of the queue, to be
prefilled again (prompt + what it had generated) later.

The host never waits for the device: a sequence whose last token is still being sampled
(`PENDING`) is scheduled as a decode whose input is that future token.
"""
from __future__ import annotations

import collections
import dataclasses

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.sequence import PENDING, Sequence, Status
from nanoflow_jax.kv_cache import PageAllocator


@dataclasses.dataclass(frozen=True)
class Chunk:
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
    def __init__(self, config: EngineConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.num_preemptions = 0  # sequences preempted since start (a monitoring counter)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take `seq` out of the queues for good and free its pages."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.release_pages())
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` tokens, if the free list allows."""
        need = self._pages_for(num_tokens) - len(seq.pages)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            seq.add_pages(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.allocator.free(seq.release_pages())
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
        page_size = cfg.page_size
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING or seq.done_generating:
                continue
            if seq.num_tokens - seq.num_computed != 1:
                continue
            has_room = seq.num_computed < len(seq.pages) * page_size
            if not has_room and not self._make_room(seq, seq.num_computed + 1, scheduled,
                                                    preempted):
                self._preempt(seq)  # everything else is scheduled: seq itself waits
                preempted.append(seq)
                continue
            decodes.append(Chunk(seq, seq.num_computed, 1, samples=True))
            scheduled.add(seq)
            budget -= 1

        # 2. Prompt chunks of running sequences that are part-way through their prefill.
        for seq in list(self.running):
            remaining = seq.num_tokens - seq.num_computed
            if seq.status is not Status.RUNNING or seq in scheduled or remaining <= 1:
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
        while (self.waiting and budget > 0 and len(prefills) < cfg.max_prefill_seqs
               and len(self.running) < cfg.max_num_seqs):
            seq = self.waiting[0]
            if seq.has_pending or seq in preempted:  # resumes once its last token is known
                break
            n = min(seq.num_tokens, budget)
            headroom = len(self.running)  # a page each for the running decodes to grow into
            if self._pages_for(n) + headroom > self.allocator.num_free:
                break
            self.waiting.popleft()
            self._grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            prefills.append(Chunk(seq, 0, n, samples=n == seq.num_tokens))
            scheduled.add(seq)
            budget -= n

        # The chunks' K/V will be in the cache once this step runs; sampled tokens are pending.
        for chunk in decodes + prefills:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens
            if chunk.samples:
                chunk.seq.output_token_ids.append(PENDING)
        return SchedulerOutput(decodes, prefills, preempted)
