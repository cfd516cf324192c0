"""Paged chunked-prefill attention: Pallas kernel (interpret mode, CPU) vs the jnp reference.

Fresh random inputs every run; the seed is printed on failure.
"""


import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.prefill_attention import (
    build_block_table,
    prefill_attention,
    prefill_attention_reference,
)

from tests.helpers import random_seed, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _make(seed, *, q_lens, ctx_lens, pad, hq, hkv, d, page_size, dtype, extra_pages=2):
    """Ragged chunks over scattered pages; slots past each seq_len hold NaN."""
    rng = np.random.default_rng(seed)
    q_lens, ctx_lens = np.asarray(q_lens), np.asarray(ctx_lens)
    seq_lens = (q_lens + ctx_lens).astype(np.int32)
    num_seqs = len(q_lens)
    max_pages = int(max(1, -(-seq_lens.max() // page_size)))
    num_pages = num_seqs * max_pages + extra_pages
    perm = rng.permutation(num_pages)
    pt = perm[: num_seqs * max_pages].reshape(num_seqs, max_pages).astype(np.int32)
    k = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
    v = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
    for s in range(num_seqs):
        n = int(seq_lens[s])
        used = -(-n // page_size)
        if used:
            last = pt[s, used - 1]
            k[:, last, n - (used - 1) * page_size :] = np.nan
            v[:, last, n - (used - 1) * page_size :] = np.nan
        pt[s, used:] = perm[-1]
    k[:, perm[-extra_pages:]] = np.nan
    v[:, perm[-extra_pages:]] = np.nan
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(query_start[-1]) + pad
    q = rng.standard_normal((num_tokens, hq, d)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return (
        cast(q),
        cast(k),
        cast(v),
        jnp.asarray(pt),
        jnp.asarray(query_start),
        jnp.asarray(seq_lens),
    )


CASES = [
    # (hq, hkv, d, page_size, block_q, block_k, flat_gather, dtype)
    (2, 2, 64, 4, 16, 16, True, jnp.float32),  # GQA 1
    (8, 2, 128, 8, 16, 16, True, jnp.bfloat16),  # GQA 4, head_dim 128
    (8, 1, 64, 16, 32, 16, True, jnp.bfloat16),  # GQA 8, page 16
    (4, 1, 128, 4, 16, 32, False, jnp.float32),  # GQA 4, 8 pages a block, reshape gather
]


@pytest.mark.parametrize("hq,hkv,d,page_size,bq,bk,flat,dtype", CASES)
def test_prefill_matches_reference(hq, hkv, d, page_size, bq, bk, flat, dtype):
    seed = random_seed()
    rng = np.random.default_rng(seed)
    # fresh prompt; chunk with prior context; empty chunk; 1-token chunk at a
    # page boundary; a random chunk crossing several query blocks.
    q_lens = [int(rng.integers(1, 30)), 7, 0, 1, int(rng.integers(17, 40))]
    ctx_lens = [0, int(rng.integers(1, 25)), 5, 2 * page_size - 1, int(rng.integers(0, 20))]
    pad = int(rng.integers(1, 6))
    q, k, v, pt, qs, sl = _make(
        seed,
        q_lens=q_lens,
        ctx_lens=ctx_lens,
        pad=pad,
        hq=hq,
        hkv=hkv,
        d=d,
        page_size=page_size,
        dtype=dtype,
    )
    scale = d**-0.5
    out = prefill_attention(
        q,
        k,
        v,
        pt,
        qs,
        sl,
        sm_scale=scale,
        interpret=True,
        block_q=bq,
        block_k=bk,
        flat_gather=flat,
    )
    ref = prefill_attention_reference(q, k, v, pt, qs, sl, sm_scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    out_np = np.asarray(out, np.float32)
    msg = f"seed={seed} q_lens={q_lens} ctx={ctx_lens} pad={pad}"
    assert np.isfinite(out_np).all(), f"{msg}: non-finite output"
    assert (out_np[int(qs[-1]) :] == 0).all(), f"{msg}: padding rows not zero"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{msg}: rel err {err:.2e}"


def test_prefill_single_long_sequence_defaults():
    """One causal sequence, default tuning (block_q 128, block_k 64), scattered pages."""
    seed = random_seed()
    q, k, v, pt, qs, sl = _make(
        seed, q_lens=[150], ctx_lens=[0], pad=0, hq=4, hkv=1, d=64, page_size=16, dtype=jnp.bfloat16
    )
    out = prefill_attention(q, k, v, pt, qs, sl, sm_scale=0.125, interpret=True)
    ref = prefill_attention_reference(q, k, v, pt, qs, sl, sm_scale=0.125)
    err = rel_err(out, ref)
    assert err < 1e-2, f"seed={seed}: rel err {err:.2e}"


def test_block_table_covers_every_row_once():
    seed = random_seed()
    rng = np.random.default_rng(seed)
    for _ in range(6):
        num_seqs = int(rng.integers(1, 6))
        block_q = int(rng.choice([1, 4, 16]))
        q_lens = rng.integers(0, 40, size=num_seqs)
        qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        num_tokens = int(qs[-1] + rng.integers(0, 20))
        seq_lens = q_lens + rng.integers(0, 30, size=num_seqs)
        table = np.asarray(
            build_block_table(
                jnp.asarray(qs), jnp.asarray(seq_lens, jnp.int32), num_tokens, block_q
            )
        )
        seq, row0, row1, pos0, kv = table
        covered = np.zeros(num_tokens, int)
        for j in range(table.shape[1]):
            assert row1[j] - row0[j] <= block_q
            covered[row0[j] : row1[j]] += 1
            if row1[j] > row0[j] and row0[j] < qs[-1]:  # a real block: one sequence
                s = seq[j]
                assert qs[s] <= row0[j] and row1[j] <= qs[s + 1], f"seed={seed}"
                assert pos0[j] == seq_lens[s] - q_lens[s] + row0[j] - qs[s], f"seed={seed}"
                assert kv[j] == seq_lens[s], f"seed={seed}"
            elif row1[j] > row0[j]:  # padding rows: no keys
                assert kv[j] == 0 and pos0[j] == -1, f"seed={seed}"
        assert (covered == 1).all(), f"seed={seed}: rows covered {covered}"
