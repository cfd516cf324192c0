"""Fused GEMM + paged decode attention (one launch): Pallas kernel in interpret mode vs jnp.

Fresh random inputs every run; the seed is printed on failure.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.experimental.fused_gemm_decode import (
    INTERLEAVES,
    fused_gemm_decode,
    fused_gemm_decode_reference,
    program_order,
)
from tests.helpers import random_seed, rel_err
from tests.test_decode_attention import _make_ragged  # scattered pages, NaN past each length

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(seed, *, m, k, n, hq, hkv, d, page_size, max_pages, dtype):
    q, kp, vp, pt, lens = _make_ragged(seed, hq=hq, hkv=hkv, d=d, page_size=page_size,
                                       max_pages=max_pages, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) * k**-0.5, dtype)
    return x, w, q, kp, vp, pt, lens


CASES = [
    # dtype, (M, K, N), GEMM tuning, (hq, hkv, d, page_size), attention tuning
    # GQA 1, one split; M, N and K all ragged w.r.t. the blocks; alternate
    (
        jnp.float32,
        (40, 72, 50),
        {"block_m": 16, "block_n": 32, "block_k": 32},
        (4, 4, 32, 4),
        {"pages_per_block": 2, "num_splits": 1, "interleave": "alternate"},
    ),
    # GQA 4, 3 splits; exact block multiples (the unmasked GEMM path); attention first
    (
        jnp.bfloat16,
        (48, 64, 96),
        {"block_m": 16, "block_n": 32, "block_k": 32},
        (8, 2, 64, 8),
        {"pages_per_block": 1, "num_splits": 3, "interleave": "attention_first"},
    ),
    # GQA 4, default splits (> 1 here); 2 persistent GEMM programs over 8 tiles; N ragged
    (
        jnp.bfloat16,
        (32, 48, 120),
        {"block_m": 16, "block_n": 32, "block_k": 16, "gemm_programs": 2},
        (8, 2, 32, 4),
        {"pages_per_block": 2, "interleave": "alternate"},
    ),
    # GQA 1, 2 splits, default GEMM blocks (clipped to the shapes; K tail), gemm first
    (
        jnp.float32,
        (20, 100, 40),
        {},
        (2, 2, 16, 4),
        {"pages_per_block": 1, "num_splits": 2, "interleave": "gemm_first"},
    ),
]


@pytest.mark.parametrize("dtype,mkn,gemm_kw,heads,attn_kw", CASES)
def test_fused_matches_reference(dtype, mkn, gemm_kw, heads, attn_kw):
    seed = random_seed()
    (m, k, n), (hq, hkv, d, page_size) = mkn, heads
    args = _inputs(
        seed, m=m, k=k, n=n, hq=hq, hkv=hkv, d=d, page_size=page_size, max_pages=6, dtype=dtype
    )
    scale = d**-0.5
    y, attn = fused_gemm_decode(*args, sm_scale=scale, interpret=True, **gemm_kw, **attn_kw)
    y_ref, attn_ref = fused_gemm_decode_reference(*args, sm_scale=scale)
    q = args[2]
    assert y.shape == (m, n) and y.dtype == dtype
    assert attn.shape == q.shape and attn.dtype == q.dtype
    err_y = rel_err(y, y_ref)
    assert err_y < TOL[dtype], f"seed={seed}: GEMM rel err {err_y:.2e}"
    attn_np = np.asarray(attn, np.float32)
    assert np.isfinite(attn_np).all(), f"seed={seed}: non-finite attention output"
    assert (attn_np[3] == 0).all(), f"seed={seed}: padding row not zero"
    err_a = rel_err(attn, attn_ref)  # decode_attention_reference
    assert err_a < TOL[dtype], f"seed={seed}: attention rel err {err_a:.2e}"


def test_interleavings_agree_with_decode_kernel():
    """Every program writes its own outputs: the order cannot change a bit, and the
    attention is the decode_attention kernel's own body and combine."""
    seed = random_seed()
    args = _inputs(
        seed, m=24, k=32, n=40, hq=8, hkv=2, d=32, page_size=4, max_pages=6, dtype=jnp.bfloat16
    )
    tune = {"pages_per_block": 2, "num_splits": 2}
    outs = [
        fused_gemm_decode(
            *args,
            sm_scale=0.2,
            interpret=True,
            block_m=16,
            block_n=16,
            block_k=16,
            interleave=il,
            **tune,
        )
        for il in INTERLEAVES
    ]
    for il, (y, attn) in zip(INTERLEAVES[1:], outs[1:]):
        np.testing.assert_array_equal(
            np.asarray(y, np.float32),
            np.asarray(outs[0][0], np.float32),
            err_msg=f"seed={seed} {il}",
        )
        np.testing.assert_array_equal(
            np.asarray(attn, np.float32),
            np.asarray(outs[0][1], np.float32),
            err_msg=f"seed={seed} {il}",
        )
    alone = decode_attention(*args[2:], sm_scale=0.2, interpret=True, **tune)
    np.testing.assert_array_equal(
        np.asarray(outs[0][1], np.float32), np.asarray(alone, np.float32), err_msg=f"seed={seed}"
    )


@pytest.mark.parametrize("n_gemm,n_attn", [(1, 1), (5, 3), (3, 7), (896, 1200), (1, 40)])
def test_program_order(n_gemm, n_attn):
    g = n_gemm + n_attn
    for il in INTERLEAVES:
        order = program_order(n_gemm, n_attn, il)
        assert order.dtype == np.int32
        np.testing.assert_array_equal(np.sort(order), np.arange(g))  # a permutation
        is_attn = order >= n_gemm
        # each kind runs its programs in increasing order
        assert (np.diff(order[is_attn]) > 0).all() and (np.diff(order[~is_attn]) > 0).all()
        if il == "gemm_first":
            assert not is_attn[:n_gemm].any()
        elif il == "attention_first":
            assert is_attn[:n_attn].all()
        else:  # alternate: every prefix holds its proportional share of attention, +-1
            seen = np.cumsum(is_attn)
            share = np.arange(1, g + 1) * n_attn / g
            assert (np.abs(seen - share) <= 1).all()
    with pytest.raises(ValueError):
        program_order(1, 1, "round_robin")
