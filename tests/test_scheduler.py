"""The scheduler alone (no model): a bare Scheduler, a PageAllocator and hand-made Sequences.
A "step" lands every sampled token at once, as the engine does one step later."""
import numpy as np
import pytest

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.scheduler import Scheduler
from nanoflow_jax.engine.sequence import PENDING, Sequence, Status
from nanoflow_jax.kv_cache import PageAllocator
from nanoflow_jax.sampling_params import SamplingParams

PAGE = 4
MAX_MODEL_LEN = 256


def _scheduler(num_pages, budget=16, max_prefill_seqs=4, max_running=None):
    config = EngineConfig(max_num_batched_tokens=budget, page_size=PAGE,
                          max_prefill_seqs=max_prefill_seqs)
    return Scheduler(config, PageAllocator(num_pages), max_running=max_running)


def _seq(i, prompt_len, max_tokens=None):
    """A sequence as add_request makes it: without max_tokens it may fill the context."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(seq_id=i, request_id=f"r{i}", index=0,
                    prompt_token_ids=[100 + i] * prompt_len, params=params, seed=0,
                    max_tokens=max_tokens or MAX_MODEL_LEN - prompt_len, arrival_time=float(i))


def _land(sched, out, token=7):
    """The step ran: its sampled tokens replace PENDING; sequences at max_tokens finish."""
    for chunk in out.decodes + out.prefills:
        if chunk.samples:
            seq = chunk.seq
            assert seq.output_token_ids[-1] == PENDING
            seq.output_token_ids[-1] = token
            if seq.done_generating:
                sched.finish(seq, "length")


def _check_pages(sched):
    """Every running sequence holds pages for its computed tokens; none is shared or lost."""
    held = [p for s in sched.running for p in s.pages]
    assert len(held) == len(set(held))
    assert len(held) + sched.allocator.num_free == sched.allocator.num_pages
    for s in sched.running:
        assert len(s.pages) * PAGE >= s.num_computed
    for s in sched.waiting:
        assert not s.pages and s.num_computed == 0 and s.page_row == -1
    _check_page_table(sched)


def _check_page_table(sched):
    """The persistent page table equals one built from scratch from the running sequences:
    a row each, their pages zero-padded; every other row zeros."""
    table = sched.page_table
    want = np.zeros_like(table.table)
    rows = [s.page_row for s in sched.running if s.pages]
    assert len(set(rows)) == len(rows) and 0 not in rows  # row 0 stays the zero row
    for s in sched.running:
        want[s.page_row, :len(s.pages)] = s.pages
        assert table.num_pages[s.page_row] == len(s.pages)
    np.testing.assert_array_equal(table.table, want)
    assert table.num_pages.sum() == sum(len(s.pages) for s in sched.running)


def test_budget_takes_every_decode_first_then_prompt_chunks():
    sched = _scheduler(num_pages=64, budget=16)
    running = [_seq(i, 2, max_tokens=8) for i in range(3)]
    for s in running:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == running and not out.decodes
    assert all(c.start == 0 and c.num_tokens == 2 and c.samples for c in out.prefills)
    _land(sched, out)

    long = _seq(3, 30, max_tokens=4)
    sched.add(long)
    out = sched.schedule()
    assert [c.seq for c in out.decodes] == running  # oldest first, one token each
    assert all(c.num_tokens == 1 and c.start == 2 and c.samples for c in out.decodes)
    (chunk,) = out.prefills
    assert (chunk.seq, chunk.start, chunk.num_tokens, chunk.samples) == (long, 0, 13, False)
    assert out.num_tokens == 16  # the budget is full
    _check_pages(sched)


def test_chunked_prefill_splits_a_long_prompt_across_iterations():
    sched = _scheduler(num_pages=64, budget=16)
    long = _seq(0, 40, max_tokens=4)
    sched.add(long)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        assert not out.decodes
        chunks += [(c.start, c.num_tokens, c.samples) for c in out.prefills]
        assert long.num_computed == chunks[-1][0] + chunks[-1][1]
        assert len(long.pages) == -(-long.num_computed // PAGE)  # pages as the chunks need
        _land(sched, out)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert long.output_token_ids == [7]
    out = sched.schedule()  # now a decode of the sampled token
    assert [(c.seq, c.start, c.num_tokens) for c in out.decodes] == [(long, 40, 1)]


def test_a_running_prefill_continues_before_new_requests_are_admitted():
    sched = _scheduler(num_pages=64, budget=16)
    first, second = _seq(0, 20, max_tokens=2), _seq(1, 4, max_tokens=2)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in out.prefills] == [(first, 16)]
    out = sched.schedule()
    assert [(c.seq, c.start, c.num_tokens) for c in out.prefills] == [(first, 16, 4),
                                                                      (second, 0, 4)]


def test_admission_is_fifo_and_waits_for_the_projected_pages():
    # prompt 8 + max_tokens 8 = 16 tokens = 4 pages projected; 10 pages hold two of them
    sched = _scheduler(num_pages=10, budget=64)
    seqs = [_seq(0, 8, 8), _seq(1, 8, 8), _seq(2, 8, 8), _seq(3, 1, 1)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    # Only 4 pages are in use (free: 6, enough for the third prompt right now), but its
    # projected use would exceed the cache; the small fourth request does not jump the queue.
    assert [c.seq for c in out.prefills] == seqs[:2]
    assert sched.allocator.num_free == 6
    assert list(sched.waiting) == seqs[2:]
    while seqs[0].status is not Status.FINISHED:
        _land(sched, out)
        out = sched.schedule()
        assert not out.preempted
    # the first finished: its 4 pages admit the third, and the fourth (1 page) fits after it
    assert [c.seq for c in out.prefills] == seqs[2:]
    _check_pages(sched)


def test_admission_waits_for_free_pages_and_headroom():
    # Without max_tokens a sequence projects what it holds; then the free list decides: the
    # prompt's pages plus a page of headroom per running decode.
    sched = _scheduler(num_pages=8, budget=64)
    a, b = _seq(0, 20), _seq(1, 9)  # 5 pages, then 3 pages (+1 headroom for a)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == [a]
    assert sched.allocator.num_free == 3 and list(sched.waiting) == [b]


def test_max_running_caps_admission():
    sched = _scheduler(num_pages=64, budget=64, max_running=2)
    seqs = [_seq(i, 3, 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == seqs[:2] and list(sched.waiting) == seqs[2:]


def test_preemption_takes_the_youngest_frees_its_pages_and_recomputes_it():
    sched = _scheduler(num_pages=4, budget=16)
    old, young = _seq(0, 3), _seq(1, 3)  # no max_tokens: they grow past any projection
    sched.add(old)
    sched.add(young)
    out = sched.schedule()
    assert [c.seq for c in out.prefills] == [old, young]
    steps = 0
    while not out.preempted:
        _land(sched, out, token=10 + steps)
        out = sched.schedule()
        _check_pages(sched)
        steps += 1
        assert steps < 20
    # Both hold 2 pages (8 tokens); the oldest needs a third page and there is none.
    assert out.preempted == [young]
    assert [c.seq for c in out.decodes] == [old]
    assert young.status is Status.WAITING and sched.waiting[0] is young
    assert young.pages == [] and young.num_computed == 0
    assert len(old.pages) == 3 and sched.allocator.num_free == 1
    generated = list(young.output_token_ids)
    assert len(generated) == 6 and PENDING not in generated  # 8 tokens cached, 1 new

    _land(sched, out)
    sched.finish(old, "abort")  # frees its pages: the preempted sequence comes back first
    out = sched.schedule()
    (chunk,) = out.prefills
    # recompute: the prompt and everything it had generated are prefilled again, and the
    # chunk samples the next token
    assert (chunk.seq, chunk.start, chunk.num_tokens, chunk.samples) == (young, 0, 9, True)
    assert young.tokens(0, 9) == young.prompt_token_ids + generated
    assert young.output_token_ids == generated + [PENDING]
    _check_pages(sched)


@pytest.mark.parametrize("bounded", [True, False])
def test_many_requests_finish_and_projection_keeps_preemptions_away(bounded):
    """A random load on a small cache: every request finishes with all its tokens and every
    page comes back. With max_tokens the projection admits only what fits: no preemption."""
    import random
    rng = random.Random(0)
    sched = _scheduler(num_pages=40, budget=32, max_prefill_seqs=3)
    seqs = []
    for i in range(60):
        prompt, out_len = rng.randint(1, 50), rng.randint(1, 40)
        seq = _seq(i, prompt, out_len)
        if not bounded:  # same lengths, but the scheduler is not told
            seq.params = SamplingParams(max_tokens=None, ignore_eos=True)
        seqs.append(seq)
        sched.add(seq)
    preemptions = 0
    for _ in range(5000):
        out = sched.schedule()
        preemptions += len(out.preempted)
        assert out.num_tokens <= 32
        _land(sched, out)
        _check_pages(sched)
        if not sched.running and not sched.waiting:
            break
    assert all(s.status is Status.FINISHED and len(s.output_token_ids) == s.max_tokens
               for s in seqs)
    assert sched.allocator.num_free == 40
    assert (preemptions == 0) if bounded else (preemptions > 0)
