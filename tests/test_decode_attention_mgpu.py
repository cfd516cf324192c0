"""Mosaic GPU paged decode attention (Mosaic GPU's CPU interpreter) vs the jnp reference.

The interpreter runs the kernel's TMA page ring, barriers, paging, masking, online softmax and
the consumers' merge, for both consumer forms; it has no transposed WGMMA operands, so there
the two products are plain dots (`profiling/cta_curves.py` checks the WGMMA path on a GPU
against the jnp reference). The interpreter runs each warpgroup's body as one XLA CPU call and
runs as many at once as the CPU has cores, so a kernel of more warpgroups than cores can stall
there (two consumers and the producer are the most a 2-core CI machine runs reliably).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.decode_attention_mgpu import (
    _check_knobs,
    decode_attention_mgpu,
    few_cta_tuning,
    prepare,
    supports,
)
from tests.helpers import random_seed


@pytest.mark.parametrize("consumer,consumers", [("rows", 1), ("rows", 2), ("swap_ab", 2)])
def test_matches_reference_over_ragged_lengths(consumer, consumers):
    seed = random_seed()
    rng = np.random.default_rng(seed)
    batch, hq, hkv, d, page_size, max_pages = 3, 8, 2, 64, 16, 9
    num_pages = batch * max_pages + 2
    lengths = np.asarray([1, 2 * 64 + 9, 0], np.int32)
    q = jnp.asarray(rng.standard_normal((batch, hq, d)), jnp.bfloat16)
    k = rng.standard_normal((hkv, num_pages, page_size, d))
    v = rng.standard_normal((hkv, num_pages, page_size, d))
    tables = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
    for b, n in enumerate(lengths):  # slots a sequence does not own hold large garbage
        for i, page in enumerate(tables[b]):
            k[:, page, max(0, n - i * page_size):] = 1e4
            v[:, page, max(0, n - i * page_size):] = -1e4
    k, v = (jnp.asarray(x, jnp.bfloat16) for x in (k, v))
    tables, lengths = jnp.asarray(tables, jnp.int32), jnp.asarray(lengths)
    # one token; two 64-token blocks and a partial one; no tokens (a padding row: zeros)
    # 2 CTAs over 6 (sequence, KV head) items: each CTA runs 3 items through one ring of 2
    # (and, in swap_ab, its consumers' double-buffered Q). With two consumers, each takes every
    # other block of the ring, so an item's blocks are split between them (or all land on
    # one) and consumer 0 merges the two softmaxes.
    got = decode_attention_mgpu(q, k, v, tables, lengths, sm_scale=d**-0.5, num_programs=2,
                                stages=2, consumers=consumers, consumer=consumer,
                                interpret=True)
    want = decode_attention_reference(q, k, v, tables, lengths, sm_scale=d**-0.5)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2, err_msg=f"seed {seed}")
    assert not np.asarray(got[2]).any()


def test_supports_and_rejects():
    assert supports(32, (8, 100, 16, 128), jnp.bfloat16)  # LLaMA-3-8B
    assert not supports(32, (8, 100, 16, 128), jnp.float32)
    assert not supports(32, (2, 100, 16, 128), jnp.bfloat16)  # a GQA group of 16
    assert not supports(8, (2, 100, 4, 128), jnp.bfloat16)  # 4-token pages
    # A page-table row is one TMA copy of at most 256 entries (rows padded to 32).
    assert supports(32, (8, 100, 16, 128), jnp.bfloat16, max_pages=256)
    assert not supports(32, (8, 100, 16, 128), jnp.bfloat16, max_pages=257)
    with pytest.raises(ValueError, match="257 pages.*at most 256"):
        prepare(jnp.zeros((1, 32, 128), jnp.bfloat16), jnp.zeros((1, 257), jnp.int32), 8)
    q = jnp.zeros((1, 8, 64), jnp.float32)
    cache = jnp.zeros((2, 4, 16, 64), jnp.float32)
    with pytest.raises(ValueError, match="bf16"):
        decode_attention_mgpu(q, cache, cache, jnp.zeros((1, 4), jnp.int32),
                              jnp.ones((1,), jnp.int32), sm_scale=1.0, interpret=True)
    q, cache = q.astype(jnp.bfloat16), cache.astype(jnp.bfloat16)
    args = (q, cache, cache, jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32))
    for knobs, name in (({"consumer": "cols"}, "consumer"),
                        ({"consumer": "rows", "consumers": 3, "stages": 6}, "consumers"),
                        ({"consumer": "swap_ab", "consumers": 3, "stages": 4}, "consumers"),
                        ({"pages_per_block": 2}, "pages_per_block")):
        with pytest.raises(ValueError, match=name):
            decode_attention_mgpu(*args, sm_scale=1.0, interpret=True, **knobs)


@pytest.mark.parametrize("version,consumer", [("0.10.2", "rows"), ("0.11.2", "swap_ab")])
def test_few_cta_tuning_is_a_valid_tuning_for_the_jax_version(monkeypatch, version, consumer):
    # swap_ab lowers for the GPU only under 0.11's warpgroup lowering: older JAX gets rows.
    monkeypatch.setattr("jax.__version__", version)
    tuning = few_cta_tuning()
    assert tuning["consumer"] == consumer
    _check_knobs(tuning["consumer"], tuning["consumers"], tuning["stages"], 64)
