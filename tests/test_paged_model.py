"""The model over the paged KV cache gives the logits of the dense model.

Prompts are prefilled in several chunks, interleaved with other sequences' chunks and decode
steps; every sampled row is compared with the dense (no cache) forward of the same tokens.
Some models get a sliding window (6 tokens, shorter than every sequence here).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.batch import BatchShape, DecodeRows, SeqChunk, build_batch
from nanoflow_jax.kv_cache import PageAllocator, PageTable, init_kv_cache
from nanoflow_jax.model_loader import Model
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from tests.helpers import rel_err

PAGE = 4


@functools.partial(jax.jit, static_argnums=(1, 4), donate_argnums=(2,))
def _step(params, config, kv, batch, attention):
    return llama.forward(params, config, batch.token_ids, batch.positions, kv, batch.attn,
                         batch.logits_indices, attention)


def _run(model, impl, plan, shape, rng):
    """plan: list of steps; a step is a list of (seq name, n new tokens, is_decode)."""
    cfg = model.config
    alloc = PageAllocator(64)
    alloc.allocate(int(rng.integers(0, 9)))  # pages in use elsewhere: tables start anywhere
    kv = init_kv_cache(cfg, 64, PAGE, jnp.float32)
    tokens, pages = {}, {}
    checked = 0
    for step in plan:
        decodes, prefills, names = [], [], []
        for name, n, is_decode in step:
            start = len(tokens.get(name, []))
            tokens[name] = tokens.get(name, []) + list(rng.integers(0, cfg.vocab_size, n))
            need = -(-(start + n) // PAGE) - len(pages.get(name, []))
            pages[name] = pages.get(name, []) + alloc.allocate(need)
            chunk = SeqChunk(tokens[name][start:], start, pages[name])
            (decodes if is_decode else prefills).append(chunk)
            names.append((name, is_decode))
        batch = build_batch(decodes, prefills, shape, PAGE)
        logits, kv = _step(model.params, cfg, kv, jax.device_put(batch), attention_fn(impl))
        logits = np.asarray(logits)
        dec_names = [n for n, d in names if d]
        pre_names = [n for n, d in names if not d]
        rows = [(i, n) for i, n in enumerate(dec_names)]
        rows += [(len(dec_names) + j, n) for j, n in enumerate(pre_names)]
        for row, name in rows:
            dense = model.logits(tokens[name])[-1]
            assert rel_err(logits[row], dense) < 1e-5, (impl, name, len(tokens[name]))
            checked += 1
    return checked


PLAN = [
    [("a", 8, False), ("b", 9, False)],
    [("b", 1, True), ("a", 8, False), ("c", 5, False)],
    [("b", 1, True), ("c", 1, True), ("a", 7, False)],
    [("a", 1, True), ("b", 1, True), ("c", 1, True)],
    [("a", 1, True), ("b", 1, True), ("c", 1, True)],
    [("c", 1, True), ("a", 1, True)],
]


def _windowed(model, full_attention_layers=()):
    config = dataclasses.replace(model.config, sliding_window=6,
                                 full_attention_layers=full_attention_layers)
    return Model(config, model.params)


@pytest.mark.parametrize("preset, window", [("tiny-llama", False), ("tiny-qwen2", True)])
def test_paged_reference_matches_dense(preset, window):
    """tiny-qwen2: a window on layer 1, the whole context on layer 0 (Qwen2's
    max_window_layers)."""
    model = nf.load_model(preset, dtype="float32", seed=2)
    if window:
        model = _windowed(model, full_attention_layers=(0,))
    shape = BatchShape(num_tokens=32, num_decode=4, num_prefill_seqs=3, max_pages=16)
    assert _run(model, "reference", PLAN, shape, np.random.default_rng()) == 16


def test_paged_kernels_interpret_match_dense():
    """The kernels with a sliding window on every layer (as Mistral-7B-v0.1 has)."""
    model = _windowed(nf.load_model("tiny-mistral", dtype="float32", seed=4))
    shape = BatchShape(num_tokens=32, num_decode=4, num_prefill_seqs=3, max_pages=16)
    assert _run(model, "interpret", PLAN[:4], shape, np.random.default_rng()) == 11


def test_prefill_only_and_decode_only_batches():
    model = nf.load_model("tiny-llama", dtype="float32", seed=2)
    only_prefill = BatchShape(num_tokens=16, num_decode=2, num_prefill_seqs=2, max_pages=8)
    only_decode = BatchShape(num_tokens=4, num_decode=4, num_prefill_seqs=1, max_pages=8)
    rng = np.random.default_rng()
    cfg = model.config
    alloc = PageAllocator(16)
    kv = init_kv_cache(cfg, 16, PAGE, jnp.float32)
    toks = list(rng.integers(0, cfg.vocab_size, 13))
    pages = alloc.allocate(4)
    b = build_batch([], [SeqChunk(toks[:11], 0, pages)], only_prefill, PAGE)
    logits, kv = _step(model.params, cfg, kv, jax.device_put(b), attention_fn("reference"))
    # no decodes: the chunk's logits are row 0 (the used rows come first)
    assert rel_err(np.asarray(logits)[0], model.logits(toks[:11])[-1]) < 1e-5
    for n in (12, 13):
        b = build_batch([SeqChunk(toks[n - 1:n], n - 1, pages)], [], only_decode, PAGE)
        logits, kv = _step(model.params, cfg, kv, jax.device_put(b), attention_fn("reference"))
        assert rel_err(np.asarray(logits)[0], model.logits(toks[:n])[-1]) < 1e-5


def test_decode_rows_from_a_page_table_build_the_batch_seq_chunks_do():
    """The engine's path (columns, page tables gathered from a PageTable, a pending input
    read from a sample row) gives the same batch as one SeqChunk per decode."""
    shape = BatchShape(num_tokens=16, num_decode=4, num_prefill_seqs=2, max_pages=5)
    table = PageTable(width=shape.max_pages)
    rng = np.random.default_rng()
    pages = [rng.permutation(40)[:n].tolist() for n in (3, 1, 5)]
    rows = np.array([table.append(-1, p) for p in pages], np.intp)
    starts = [9, 2, 17]
    chunks = [SeqChunk([7], starts[0], pages[0]), SeqChunk([0], starts[1], pages[1], 5),
              SeqChunk([3], starts[2], pages[2])]
    prefill = SeqChunk([1, 2, 3], 0, [38])
    columns = DecodeRows(np.array([7, 0, 3], np.int32), np.array([-1, 5, -1], np.int32),
                         np.array(starts, np.int32),
                         table.gather(rows, shape.num_decode, shape.max_pages),
                         table.num_pages[rows])
    want = build_batch(chunks, [prefill], shape, PAGE)
    got = build_batch(columns, [prefill], shape, PAGE)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="page table width"):  # wider than the bucket
        build_batch(columns, [], dataclasses.replace(shape, max_pages=4), PAGE)


def test_batch_that_does_not_fit_is_rejected():
    shape = BatchShape(num_tokens=8, num_decode=2, num_prefill_seqs=1, max_pages=4)
    with pytest.raises(ValueError, match="do not fit"):
        build_batch([], [SeqChunk([1] * 9, 0, [0, 1, 2])], shape, PAGE)
    with pytest.raises(ValueError, match="pages cannot hold"):
        build_batch([], [SeqChunk([1] * 6, 0, [0])], shape, PAGE)
