"""`StatsSnapshot`: what an engine reports about itself between steps (`LLMEngine.stats_snapshot`).

A frozen value, so a monitor (the server's /metrics, its admission control) reads counts and
never the scheduler's queues or the page allocator, which the engine thread mutates.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StatsSnapshot:
    running_requests: int = 0  # requests with at least one sequence in the running batch
    running_seqs: int = 0
    waiting_requests: int = 0  # requests with a sequence queued in the scheduler (not admitted,
    waiting_seqs: int = 0  # or preempted and waiting to be recomputed)
    free_seq_slots: int = 0  # max_num_seqs - running_seqs: sequences admissible now
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    prompt_tokens: int = 0  # prefill tokens computed (recomputation after preemption included)
    generation_tokens: int = 0
    preemptions: int = 0  # sequences preempted (by recompute) since start
    steps: int = 0  # iterations dispatched
    # Ids of the requests counted in running_requests: a monitor tells from it when a request
    # was first scheduled (its queue time).
    running_request_ids: frozenset[str] = frozenset()
