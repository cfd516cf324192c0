"""GEMM beside decode attention in one Mosaic GPU kernel (CPU interpreter) vs jnp references.

The interpreter runs the kernel's five warpgroups (tests/conftest.py says what that needs), both
TMA rings, their barriers, the GEMM's WGMMAs and epilogue stores, and the attention's paging,
masking, online softmax and consumer merge (its WGMMAs as plain dots). It runs one CTA after
another at ~5 s each, so the shapes are small: each run covers several cases at once.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.decode_attention_mgpu import heads_of_items, prepare
from pallas_kernels.experimental.gemm_attention_mgpu import (
    Registers,
    Tuning,
    gemm_beside_attention,
    shared_memory_bytes,
)
from tests.helpers import random_seed

PAGE, HEAD_DIM = 16, 64


def _inputs(rng, m, k, n, lengths, hq=4, hkv=1):
    """a [m, k], b [k, n]; q [B, hq, D] and a paged cache whose slots past each sequence's
    length hold large finite garbage (the kernel masks them)."""
    batch, max_pages = len(lengths), max(1, -(-max(lengths) // PAGE))
    num_pages = batch * max_pages + 1
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((batch, hq, HEAD_DIM)), jnp.bfloat16)
    kv = rng.standard_normal((2, hkv, num_pages, PAGE, HEAD_DIM))
    tables = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
    for s, length in enumerate(lengths):
        for i, page in enumerate(tables[s]):
            kv[:, :, page, max(0, length - i * PAGE):] = 1e4
    kv = jnp.asarray(kv, jnp.bfloat16)
    return a, b, q, kv[0], kv[1], jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32)


def _check(args, got, seed):
    a, b, q, k, v, tables, lengths = args
    c, o = got
    want_c = jnp.dot(a, b, preferred_element_type=jnp.float32)
    assert c.shape == want_c.shape and c.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(want_c), rtol=2e-2,
                               atol=2e-2, err_msg=f"GEMM, seed {seed}")
    want_o = decode_attention_reference(q, k, v, tables, lengths, sm_scale=HEAD_DIM**-0.5)
    assert o.shape == want_o.shape and o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want_o, np.float32),
                               rtol=2e-2, atol=2e-2, err_msg=f"attention, seed {seed}")


def test_more_tiles_and_items_than_ctas():
    # 2 CTAs, two GEMM consumers, CTA tile 128 x 128, 3-slot rings of tile_k 64. GEMM:
    # M = 300 is padded to 3 row blocks, 3 tiles dealt 2/1, K = 128 is 2 steps a tile, so the
    # ring wraps within CTA 0. Attention: 3 items dealt 2/1: one token; 83 tokens (two KV
    # blocks, the last one partial, pages not full); no tokens (zeros).
    seed = random_seed()
    args = _inputs(np.random.default_rng(seed), 300, 128, 128, [1, 83, 0])
    tuning = Tuning(tile_k=64, gemm_stages=3, kv_stages=3)
    got = gemm_beside_attention(*args, sm_scale=HEAD_DIM**-0.5, num_ctas=2, tuning=tuning,
                                interpret=True)
    _check(args, got, seed)
    assert not np.asarray(got[1][2]).any()


def test_fewer_tiles_and_items_than_ctas():
    # 3 CTAs, one GEMM consumer with delayed release, two attention consumers that merge. GEMM:
    # M = 40 (padded to one 64-row block), one tile, two CTAs without one. Attention: 2 items,
    # one CTA without one; 130 tokens are 3 blocks split 2/1 between the consumers, 17 tokens
    # one block that consumer 1 never sees.
    seed = random_seed()
    args = _inputs(np.random.default_rng(seed), 40, 128, 128, [130, 17])
    tuning = Tuning(tile_k=64, gemm_stages=3, gemm_consumers=1, delay_release=1,
                    attention_consumers=2, kv_stages=2)
    got = gemm_beside_attention(*args, sm_scale=HEAD_DIM**-0.5, num_ctas=3, tuning=tuning,
                                interpret=True)
    _check(args, got, seed)


def test_tuning_parse_and_budgets():
    assert Tuning.parse("") == Tuning()
    assert Tuning.parse("tile_n=256, gemm_stages=2,registers=136/128/40") == Tuning(
        tile_n=256, gemm_stages=2, registers="136/128/40")
    # 5 warpgroups launch at 96 registers; the producers give 56 each to the consumers, and
    # 4 K registers stay unassigned.
    assert Tuning().register_budget() == Registers(launch=96, gemm=136, attention=128,
                                                   producer=40)
    assert Tuning(registers="none").register_budget() is None
    assert Tuning(registers="136/128/40").register_budget().gemm == 136
    assert 200 * 1024 < shared_memory_bytes(Tuning(), head_dim=128, block_kv=64,
                                            table_cols=96) <= 227 * 1024


@pytest.mark.parametrize("spec,knob", [
    ("tile_m=32", "tile_m"), ("tile_n=96", "tile_n"), ("tile_k=32", "tile_k"),
    ("gemm_stages=1", "gemm_stages"), ("gemm_consumers=4", "gemm_consumers"),
    ("delay_release=1,gemm_stages=2", "delay_release"),
    ("attention_consumers=5", "attention_consumers"),
    ("attention_consumers=2,kv_stages=3", "kv_stages"),
    ("registers=160/128/40", "registers"),  # 2 x 160 + 128 + 2 x 40 > 512 per lane of a WG
    ("registers=136/128/104", "registers"),  # producers above the launch count
    ("registers=lots", "registers"), ("tiles=3", "tiles"), ("tile_m", "tile_m"),
    ("tile_n=wide", "tile_n"),
])
def test_tuning_errors_name_the_knob(spec, knob):
    with pytest.raises(ValueError, match=f"tuning: .*{knob}"):
        Tuning.parse(spec)


def test_call_errors_name_the_knob():
    args = _inputs(np.random.default_rng(0), 64, 128, 192, [5])
    with pytest.raises(ValueError, match="tile_n"):  # N = 192 is not a multiple of 128
        gemm_beside_attention(*args, sm_scale=1.0, interpret=True)
    args = _inputs(np.random.default_rng(0), 64, 128, 128, [5])
    with pytest.raises(ValueError, match="shared memory"):
        gemm_beside_attention(*args, sm_scale=1.0, tuning=Tuning(gemm_stages=8),
                              interpret=True)


def test_prepare_and_heads_of_items_invert_each_other():
    # [B, Hq, D] -> one 8-row block per (sequence, KV head), GQA groups padded with zeros
    q = jnp.arange(3 * 8 * 2, dtype=jnp.float32).reshape(3, 8, 2)
    items, tables = prepare(q, jnp.zeros((3, 5), jnp.int32), num_kv_heads=2)
    assert items.shape == (6, 8, 2) and tables.shape == (3, 32)
    assert not np.asarray(items[:, 4:]).any()
    np.testing.assert_array_equal(heads_of_items(items, 3, 8), q)
