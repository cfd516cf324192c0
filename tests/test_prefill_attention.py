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


@pytest.mark.parametrize("window,page_size,bq,bk,flat", [
    (8, 16, 16, 16, True),  # window inside a page, shorter than a query block
    (20, 16, 16, 32, False),  # two pages a KV block, reshape gather
    (40, 4, 16, 16, True),  # window over several KV blocks: unmasked blocks between
])
def test_sliding_window_prefill_matches_reference(window, page_size, bq, bk, flat):
    """Chunks with and without context longer than the window; every cache slot below a
    chunk's first row's window is NaN, so reading one would show."""
    seed = random_seed()
    rng = np.random.default_rng(seed)
    q_lens = [int(rng.integers(window + 1, 3 * window)), 9, 1, int(rng.integers(2, 50))]
    ctx_lens = [0, 2 * window + 3, window, int(rng.integers(0, 3 * window))]
    q, k, v, pt, qs, sl = _make(seed, q_lens=q_lens, ctx_lens=ctx_lens, pad=3, hq=4, hkv=1,
                                d=32, page_size=page_size, dtype=jnp.float32)
    k, v = np.array(k), np.array(v)
    for s, first_row in enumerate(ctx_lens):  # slots below the first row's first key
        for pos in range(max(first_row - window + 1, 0)):
            page = int(pt[s, pos // page_size])
            k[:, page, pos % page_size] = v[:, page, pos % page_size] = np.nan
    k, v = jnp.asarray(k), jnp.asarray(v)
    out = prefill_attention(q, k, v, pt, qs, sl, sm_scale=0.2, interpret=True, block_q=bq,
                            block_k=bk, flat_gather=flat, window=window)
    ref = prefill_attention_reference(q, k, v, pt, qs, sl, sm_scale=0.2, window=window)
    msg = f"seed={seed} q_lens={q_lens} ctx={ctx_lens}"
    assert np.isfinite(np.asarray(out)).all(), f"{msg}: read below the window"
    assert (np.asarray(out)[int(qs[-1]):] == 0).all(), f"{msg}: padding rows not zero"
    err = rel_err(out, ref)
    assert err < 1e-5, f"{msg}: rel err {err:.2e}"
    # The window matters: the first chunk's rows past the window differ from full attention.
    full = prefill_attention_reference(q, k, v, pt, qs, sl, sm_scale=0.2)
    assert rel_err(full[window:q_lens[0]], ref[window:q_lens[0]]) > 1e-2


def test_windowed_prefill_reference_matches_dense_softmax():
    """The windowed reference vs a NumPy softmax over keys pos - window + 1 .. pos."""
    seed = random_seed()
    window, q_lens, ctx_lens = 5, [6, 4], [0, 9]
    q, k, v, pt, qs, sl = _make(seed, q_lens=q_lens, ctx_lens=ctx_lens, pad=0, hq=1, hkv=1,
                                d=8, page_size=4, dtype=jnp.float32)
    ref = np.asarray(prefill_attention_reference(q, k, v, pt, qs, sl, sm_scale=0.5,
                                                 window=window))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for s in range(2):
        kk, vv = (x[0, np.asarray(pt[s])].reshape(-1, 8) for x in (kn, vn))
        for i in range(q_lens[s]):
            row, pos = int(qs[s]) + i, ctx_lens[s] + i
            keys = slice(max(pos - window + 1, 0), pos + 1)
            logits = kk[keys] @ qn[row, 0] * 0.5
            p = np.exp(logits - logits.max())
            np.testing.assert_allclose(ref[row, 0], p @ vv[keys] / p.sum(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"seed={seed}")
