"""`LLMEngine.stats_snapshot()`, what the server reads instead of the scheduler and allocator:
it tracks a request from waiting to running to done, and counts preemptions."""
from __future__ import annotations

import dataclasses

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.llm_engine import LLMEngine
from nanoflow_jax.engine.stats_snapshot import StatsSnapshot


def test_stats_snapshot_follows_requests_and_preemptions():
    # 12 pages of 4 tokens: two sequences that grow to 48 tokens each cannot both stay.
    engine = LLMEngine(EngineConfig(model="tiny-llama", dtype="float32", max_num_seqs=4,
                                    max_num_batched_tokens=16, min_bucket=16, page_size=4,
                                    num_pages=12, max_model_len=48))
    s = engine.stats_snapshot()
    assert isinstance(s, StatsSnapshot)
    assert (s.running_requests, s.waiting_requests, s.kv_pages_used) == (0, 0, 0)
    assert s.kv_pages_total == 12 and s.free_seq_slots == 4 and s.preemptions == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.running_seqs = 1

    # No max_tokens (each runs to max_model_len): the admission cannot project their growth.
    params = SamplingParams(n=2, temperature=0.0, max_tokens=None, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3, 4]}, params)
    s = engine.stats_snapshot()
    assert (s.waiting_requests, s.waiting_seqs, s.running_requests) == (1, 2, 0)
    assert s.running_request_ids == frozenset()

    engine.step()  # schedules (admits) both samples
    s = engine.stats_snapshot()
    assert (s.running_requests, s.running_seqs, s.waiting_seqs) == (1, 2, 0)
    assert s.running_request_ids == {"a"} and s.free_seq_slots == 2
    assert s.kv_pages_used == 2 and s.prompt_tokens == 8 and s.steps == 1

    seen_preemption = False
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.stats_snapshot()
        assert s.kv_pages_used <= s.kv_pages_total
        seen_preemption |= s.waiting_seqs > 0
    s = engine.stats_snapshot()
    assert s.preemptions > 0 and seen_preemption
    assert s.preemptions == engine.stats.preemptions
    assert s.generation_tokens == 2 * (48 - 4)
    assert (s.running_requests, s.waiting_requests, s.kv_pages_used) == (0, 0, 0)
    assert s.free_seq_slots == 4
