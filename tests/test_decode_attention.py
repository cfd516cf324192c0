"""Paged decode attention: Pallas kernel (interpret mode, CPU) vs the jnp reference.

Fresh random inputs every run; the seed is printed on failure.
"""


import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

from tests.helpers import random_seed, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _make(seed, *, batch, hq, hkv, d, page_size, max_pages, lengths, dtype, extra_pages=3):
    """Scattered (permuted) pages; slots past each length are poisoned with NaN."""
    rng = np.random.default_rng(seed)
    num_pages = batch * max_pages + extra_pages
    q = rng.standard_normal((batch, hq, d)).astype(np.float32)
    k = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
    v = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
    perm = rng.permutation(num_pages)
    pt = perm[: batch * max_pages].reshape(batch, max_pages).astype(np.int32)
    lengths = np.asarray(lengths, np.int32)
    for b in range(batch):  # poison cache slots this sequence does not own
        n = int(lengths[b])
        used = -(-n // page_size)
        if used:
            last = pt[b, used - 1]
            k[:, last, n - (used - 1) * page_size :] = np.nan
            v[:, last, n - (used - 1) * page_size :] = np.nan
        pt[b, used:] = perm[-1 - (b % extra_pages)]  # entries past the end: valid ids
    k[:, perm[-extra_pages:]] = np.nan
    v[:, perm[-extra_pages:]] = np.nan
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(pt), jnp.asarray(lengths)


def _make_ragged(seed, *, page_size, max_pages, **kwargs):
    """`_make` over five sequences of ragged lengths: one token, an exact page multiple, the
    full table, a padding row (0) and a random length."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2 * page_size, max_pages * page_size, 0,
               int(rng.integers(1, max_pages * page_size + 1))]
    return _make(seed, batch=len(lengths), page_size=page_size, max_pages=max_pages,
                 lengths=lengths, **kwargs)


CASES = [
    # (hq, hkv, d, page_size, pages_per_block, num_splits, flat_gather, dtype)
    (4, 4, 64, 4, 2, None, True, jnp.float32),  # GQA 1 (MHA), split-K
    (8, 2, 128, 8, 2, 1, True, jnp.bfloat16),  # GQA 4, head_dim 128, one split
    (8, 1, 64, 4, 1, 3, False, jnp.bfloat16),  # GQA 8, 3 splits, reshape gather
    (16, 2, 128, 16, 1, 2, True, jnp.float32),  # GQA 8, page 16, fp32
]


@pytest.mark.parametrize("hq,hkv,d,page_size,ppb,splits,flat,dtype", CASES)
def test_decode_matches_reference(hq, hkv, d, page_size, ppb, splits, flat, dtype):
    seed = random_seed()
    q, k, v, pt, lens = _make_ragged(seed, hq=hq, hkv=hkv, d=d, page_size=page_size,
                                     max_pages=6, dtype=dtype)
    scale = d**-0.5
    out = decode_attention(
        q,
        k,
        v,
        pt,
        lens,
        sm_scale=scale,
        interpret=True,
        pages_per_block=ppb,
        num_splits=splits,
        flat_gather=flat,
    )
    ref = decode_attention_reference(q, k, v, pt, lens, sm_scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    out_np = np.asarray(out, np.float32)
    assert np.isfinite(out_np).all(), f"seed={seed}: non-finite output"
    assert (out_np[3] == 0).all(), f"seed={seed}: padding row not zero"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"seed={seed}: rel err {err:.2e}"


def test_decode_default_tuning_bf16():
    """Defaults (auto splits, 64-token blocks) on a GPU-like shape, scaled down."""
    seed = random_seed()
    rng = np.random.default_rng(seed)
    batch, page_size, max_pages = 3, 16, 9
    lengths = rng.integers(1, max_pages * page_size + 1, size=batch)
    q, k, v, pt, lens = _make(
        seed,
        batch=batch,
        hq=8,
        hkv=2,
        d=64,
        page_size=page_size,
        max_pages=max_pages,
        lengths=lengths,
        dtype=jnp.bfloat16,
    )
    out = decode_attention(q, k, v, pt, lens, sm_scale=0.125, interpret=True)
    ref = decode_attention_reference(q, k, v, pt, lens, sm_scale=0.125)
    err = rel_err(out, ref)
    assert err < 1e-2, f"seed={seed}: rel err {err:.2e} (lengths {lengths})"


@pytest.mark.parametrize("num_programs,splits", [(1, 2), (3, 2), (7, 1), (100, 3)])
def test_persistent_decode_matches_reference(num_programs, splits):
    """Fewer programs than work items (each loops over items num_programs apart; the last
    round is partial), and more programs than items (the plain grid)."""
    seed = random_seed()
    lengths = [1, 16, 0, 23, 9]
    q, k, v, pt, lens = _make(seed, batch=len(lengths), hq=8, hkv=2, d=64, page_size=4,
                              max_pages=6, lengths=lengths, dtype=jnp.float32)
    out = decode_attention(q, k, v, pt, lens, sm_scale=0.125, interpret=True,
                           pages_per_block=1, num_splits=splits, num_programs=num_programs)
    ref = decode_attention_reference(q, k, v, pt, lens, sm_scale=0.125)
    assert (np.asarray(out)[2] == 0).all(), f"seed={seed}: padding row not zero"
    err = rel_err(out, ref)
    assert err < 1e-5, f"seed={seed}: rel err {err:.2e}"


def test_reference_matches_dense_softmax():
    """The reference itself vs a dense per-sequence softmax in float64 (NumPy)."""
    seed = random_seed()
    q, k, v, pt, lens = _make(
        seed,
        batch=3,
        hq=4,
        hkv=2,
        d=16,
        page_size=4,
        max_pages=3,
        lengths=[5, 12, 1],
        dtype=jnp.float32,
    )
    ref = np.asarray(decode_attention_reference(q, k, v, pt, lens, sm_scale=0.25))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for b, n in enumerate(np.asarray(lens)):
        kk = kn[:, np.asarray(pt[b])].reshape(2, -1, 16)[:, :n]
        vv = vn[:, np.asarray(pt[b])].reshape(2, -1, 16)[:, :n]
        for h in range(4):
            s = kk[h // 2] @ qn[b, h] * 0.25
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(
                ref[b, h], p @ vv[h // 2], rtol=1e-5, atol=1e-6, err_msg=f"seed={seed}"
            )


def _poison_below_window(k, v, pt, lengths, window):
    """NaN in every cache slot below each sequence's window: a kernel that reads one fails."""
    k, v = np.array(k, np.float32), np.array(v, np.float32)
    page_size = k.shape[2]
    for b, n in enumerate(np.asarray(lengths)):
        for pos in range(max(int(n) - window, 0)):
            page = int(pt[b, pos // page_size])
            k[:, page, pos % page_size] = np.nan
            v[:, page, pos % page_size] = np.nan
    return k, v


WINDOW_CASES = [
    # (window, page_size, pages_per_block, num_splits, flat_gather, num_programs)
    (8, 16, 1, None, True, None),  # window inside a page
    (20, 16, 2, 2, False, None),  # window over 2-3 pages, split-K, reshape gather
    (13, 4, 2, 3, True, 5),  # persistent programs, window not a page multiple
]


@pytest.mark.parametrize("window,page_size,ppb,splits,flat,programs", WINDOW_CASES)
def test_sliding_window_decode_matches_reference(window, page_size, ppb, splits, flat,
                                                 programs):
    """Contexts shorter than, equal to, one past and far past the window; keys below the
    window are NaN, so reading one would show."""
    seed = random_seed()
    rng = np.random.default_rng(seed)
    max_pages = -(-(3 * window + 7) // page_size)
    lengths = [1, window, window + 1, 0, max_pages * page_size,
               int(rng.integers(window + 2, max_pages * page_size + 1))]
    q, k, v, pt, lens = _make(seed, batch=len(lengths), hq=4, hkv=1, d=32,
                              page_size=page_size, max_pages=max_pages, lengths=lengths,
                              dtype=jnp.float32)
    k, v = (jnp.asarray(x) for x in _poison_below_window(k, v, pt, lens, window))
    out = decode_attention(q, k, v, pt, lens, sm_scale=0.2, interpret=True,
                           pages_per_block=ppb, num_splits=splits, flat_gather=flat,
                           num_programs=programs, window=window)
    ref = decode_attention_reference(q, k, v, pt, lens, sm_scale=0.2, window=window)
    msg = f"seed={seed} lengths={lengths}"
    assert np.isfinite(np.asarray(out)).all(), f"{msg}: read below the window"
    assert (np.asarray(out)[3] == 0).all(), f"{msg}: padding row not zero"
    err = rel_err(out, ref)
    assert err < 1e-5, f"{msg}: rel err {err:.2e}"
    full = decode_attention_reference(q, k, v, pt, lens, sm_scale=0.2)  # NaN past the window
    assert np.isnan(np.asarray(full)[4]).any()


def test_windowed_reference_matches_dense_softmax():
    """The windowed reference vs a NumPy softmax over the last `window` keys, float64."""
    seed = random_seed()
    window, lengths = 6, [5, 13, 6, 7]
    q, k, v, pt, lens = _make(seed, batch=4, hq=2, hkv=1, d=16, page_size=4, max_pages=4,
                              lengths=lengths, dtype=jnp.float32)
    ref = np.asarray(decode_attention_reference(q, k, v, pt, lens, sm_scale=0.25,
                                                window=window))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    for b, n in enumerate(lengths):
        keys = slice(max(n - window, 0), n)
        kk = kn[0, np.asarray(pt[b])].reshape(-1, 16)[keys]
        vv = vn[0, np.asarray(pt[b])].reshape(-1, 16)[keys]
        for h in range(2):
            s = kk @ qn[b, h] * 0.25
            p = np.exp(s - s.max())
            np.testing.assert_allclose(ref[b, h], p @ vv / p.sum(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"seed={seed}")
