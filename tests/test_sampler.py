"""On-device sampler: greedy = argmax, seeded reproducibility, sampled frequencies, logprobs."""
import functools

import jax
import numpy as np
import pytest

from nanoflow_jax.engine.sampler import SampleMode, SampleOutput, sample, sampling_tensors
from nanoflow_jax.sampling_params import SamplingParams

_sample = jax.jit(sample, static_argnames=("num_logprobs", "mode"))


def run(logits, params, seeds=None, steps=None, num_logprobs=0, pad_to=None,
        mode=SampleMode()) -> SampleOutput:
    """Sample rows of `logits` [B, V] (numpy) with per-row SamplingParams; numpy outputs.
    The default mode runs every part of the sampler, right for any rows."""
    b = len(params)
    seeds = list(range(b)) if seeds is None else seeds
    steps = [0] * b if steps is None else steps
    t = sampling_tensors(params, seeds, steps, pad_to=pad_to)
    if pad_to is not None and pad_to > b:
        logits = np.concatenate([logits, np.zeros((pad_to - b, logits.shape[1]), np.float32)])
    return jax.tree.map(np.asarray, _sample(np.asarray(logits, np.float32), t, num_logprobs,
                                            mode))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """vLLM's distribution for one row [V]: softmax(x/T) restricted to top-k, then nucleus."""
    p = np.exp(log_softmax(np.asarray(logits, np.float64) / temperature))
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    mass_before = np.cumsum(q[order]) - q[order]
    nucleus = order[(mass_before < top_p) | (np.arange(len(p)) == 0)]
    out = np.zeros_like(p)
    out[nucleus] = q[nucleus]
    return out / out.sum()


def check_frequencies(tokens, probs, sigmas=4.5):
    """Sampled frequencies match `probs` within `sigmas` binomial std devs; support respected."""
    n, v = len(tokens), len(probs)
    freq = np.bincount(tokens, minlength=v) / n
    assert np.all(freq[probs == 0] == 0), (freq, probs)
    tol = sigmas * np.sqrt(probs * (1 - probs) / n) + 1e-3
    assert np.all(np.abs(freq - probs) <= tol), (freq, probs, tol)


V8 = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)  # distinct, sorted


# ---- greedy ---------------------------------------------------------------------------------


def test_greedy_is_argmax_with_ties_and_masked_vocab():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 1000)).astype(np.float32)
    logits[:, 500:] = -np.inf  # padded vocab
    logits[3, [7, 90, 400]] = 50.0  # tie: lowest index wins, like jnp.argmax
    params = [SamplingParams(temperature=0.0)] * 6 + [SamplingParams(temperature=1.3, top_k=1)] * 6
    logits[9] = logits[3]
    out = run(logits, params, num_logprobs=3)
    np.testing.assert_array_equal(out.token_ids, np.argmax(logits, -1))
    assert out.token_ids[3] == out.token_ids[9] == 7
    assert out.token_ids.dtype == np.int32


def test_near_zero_temperature_is_argmax():
    rng = np.random.default_rng(1)
    logits = (rng.permuted(np.tile(np.arange(64), (200, 1)), axis=1) * 0.5).astype(np.float32)
    for temperature in (1e-7, 1e-3):  # below SAMPLING_EPS (greedy); tiny but sampled
        out = run(logits, [SamplingParams(temperature=temperature)] * 200, seeds=range(200))
        np.testing.assert_array_equal(out.token_ids, np.argmax(logits, -1))


def test_padding_rows_are_greedy_and_builder_checks():
    t = sampling_tensors([SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)],
                         [2**40 + 7], [11], pad_to=4)
    np.testing.assert_allclose(t.temperature, [0.7, 0, 0, 0])
    np.testing.assert_array_equal(t.top_k, [5, 0, 0, 0])
    np.testing.assert_allclose(t.top_p, [0.9, 1, 1, 1])
    np.testing.assert_array_equal(t.seed, [7, 0, 0, 0])
    np.testing.assert_array_equal(t.seed_hi, [2**8, 0, 0, 0])
    np.testing.assert_array_equal(t.step, [11, 0, 0, 0])
    assert t.seed.dtype == np.uint32 and t.step.dtype == np.int32 and t.top_k.dtype == np.int32
    # Greedy params become temperature 0 rows (no filtering work).
    g = sampling_tensors([SamplingParams(temperature=0.5, top_k=1, top_p=0.5)], [0], [0])
    assert g.temperature[0] == 0 and g.top_k[0] == 0 and g.top_p[0] == 1
    params = [SamplingParams(temperature=0.7, top_k=5, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_p=0.5)]
    seeds, steps, rows = [2**64 - 1, 5, 2**40 + 3], [4, 0, 9], [6, 0, 3]
    placed = sampling_tensors(params, seeds, steps, pad_to=8, rows=rows)
    dense = sampling_tensors(params, seeds, steps)
    padding = sampling_tensors([], [], [], pad_to=8)
    for got, want, pad in zip(jax.tree.leaves(placed), jax.tree.leaves(dense),
                              jax.tree.leaves(padding)):
        pad[rows] = want  # the rows given, the padding's values elsewhere
        np.testing.assert_array_equal(got, pad)
    with pytest.raises(ValueError, match="pad_to"):
        sampling_tensors([SamplingParams()] * 2, [0, 0], [0, 0], pad_to=1)
    with pytest.raises(ValueError, match="one seed and one step per row"):
        sampling_tensors([SamplingParams()] * 2, [0], [0, 0])
    with pytest.raises(ValueError, match="seeds"):
        sampling_tensors([SamplingParams()], [-1], [0])
    with pytest.raises(ValueError, match="steps"):
        sampling_tensors([SamplingParams()], [0], [-1])
    out = run(np.tile(V8, (3, 1)), [SamplingParams(temperature=0)] * 3, pad_to=8)
    assert out.token_ids.shape == (8,) and np.all(out.token_ids == 0)


# ---- reproducibility ------------------------------------------------------------------------


def test_seeded_row_is_independent_of_batch_composition_and_position():
    rng = np.random.default_rng(2)
    v = 64
    rows = rng.normal(size=(4, v)).astype(np.float32) * 0.3  # flat-ish: samples vary
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=5),
              SamplingParams(top_k=10), SamplingParams(top_p=0.8, temperature=1.2)]
    seeds, steps = [11, 5, 2**40 + 3, 7], [0, 3, 9, 100]
    base = run(rows, params, seeds, steps).token_ids

    # Alone, one row at a time: rows without top-k/top-p then skip the sort branch.
    for i in range(4):
        assert run(rows[i:i + 1], params[i:i + 1], seeds[i:i + 1], steps[i:i + 1]).token_ids[0] \
            == base[i]
    # Permuted, with other rows (greedy, filtered, different seeds) around and padding after.
    others = rng.normal(size=(5, v)).astype(np.float32)
    o_params = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(top_p=0.5),
                SamplingParams(temperature=2.0), SamplingParams(top_k=1)]
    perm = [2, 0, 3, 1]
    logits = np.concatenate([others[:2], rows[perm], others[2:]])
    all_params = o_params[:2] + [params[i] for i in perm] + o_params[2:]
    all_seeds = [1, 2] + [seeds[i] for i in perm] + [3, 4, 5]
    all_steps = [0, 0] + [steps[i] for i in perm] + [0, 0, 0]
    out = run(logits, all_params, all_seeds, all_steps, pad_to=16).token_ids
    np.testing.assert_array_equal(out[2:6], base[perm])


def test_different_seeds_and_steps_give_different_samples():
    v = 32
    logits = np.zeros((256, v), np.float32)  # uniform: every token equally likely
    p = [SamplingParams()] * 256

    def tokens(seed_of_row, step_of_row):
        return run(logits, p, [seed_of_row(i) for i in range(256)],
                   [step_of_row(i) for i in range(256)]).token_ids

    by_step = tokens(lambda i: 42, lambda i: i)  # one sequence, 256 steps
    assert len(np.unique(by_step)) > v // 2
    by_seed = tokens(lambda i: i, lambda i: 0)  # 256 sequences, first step
    assert len(np.unique(by_seed)) > v // 2
    again = tokens(lambda i: i, lambda i: 0)
    np.testing.assert_array_equal(by_seed, again)  # deterministic
    high_bits = tokens(lambda i: i + 2**32, lambda i: 0)  # seeds differing only in high bits
    assert np.mean(high_bits != by_seed) > 0.8
    other_seed = tokens(lambda i: 43, lambda i: i)
    assert np.mean(other_seed != by_step) > 0.8


# ---- distributions --------------------------------------------------------------------------

N_SAMPLES = 20_000


@functools.lru_cache(maxsize=None)
def _many(**kw):
    """N_SAMPLES draws from V8 with one SamplingParams, over many (seed, step) pairs."""
    seeds = [i // 8 for i in range(N_SAMPLES)]
    steps = [i % 8 for i in range(N_SAMPLES)]
    return run(np.tile(V8, (N_SAMPLES, 1)), [SamplingParams(**kw)] * N_SAMPLES, seeds, steps)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_frequencies_match_softmax(temperature):
    tokens = _many(temperature=temperature).token_ids
    probs = np.exp(log_softmax(V8 / temperature))
    check_frequencies(tokens, probs)
    # Chi-square too (7 dof; 24.3 is the 0.1% critical value).
    expected = probs * N_SAMPLES
    chi2 = np.sum((np.bincount(tokens, minlength=8) - expected) ** 2 / expected)
    assert chi2 < 24.3, chi2


def test_top_k_never_samples_outside_the_top_k():
    tokens = _many(top_k=3).token_ids
    assert set(np.unique(tokens)) == {0, 1, 2}
    check_frequencies(tokens, reference_probs(V8, top_k=3))


def test_top_p_keeps_the_nucleus_only():
    probs = np.exp(log_softmax(V8))  # [0.37, 0.22, 0.14, ...]: nucleus(0.7) = {0, 1, 2}
    assert probs[:2].sum() < 0.7 <= probs[:3].sum()
    tokens = _many(top_p=0.7).token_ids
    assert set(np.unique(tokens)) == {0, 1, 2}
    check_frequencies(tokens, reference_probs(V8, top_p=0.7))
    assert np.all(_many(top_p=1e-6, temperature=1.5).token_ids == 0)  # tiny p: argmax


def test_mixed_batch_top_k_then_top_p_matches_reference():
    # Different parameters per row in ONE batch, each row checked against vLLM's distribution.
    rng = np.random.default_rng(3)
    configs = [dict(temperature=0.9), dict(temperature=1.5, top_k=5, top_p=0.8),
               dict(temperature=0.6, top_p=0.9), dict(temperature=1.0, top_k=4),
               dict(temperature=0.0), dict(temperature=1.2, top_k=6, top_p=0.5)]
    logits = rng.normal(size=(len(configs), 16)).astype(np.float32)
    logits[:, 12:] = -np.inf  # masked vocab: never sampled
    reps = 4000
    rows = np.repeat(np.arange(len(configs)), reps)  # interleave rows of every config
    rows = rows.reshape(len(configs), reps).T.ravel()
    params = [SamplingParams(**configs[c]) for c in rows]
    out = run(logits[rows], params, seeds=list(range(len(rows))), steps=[7] * len(rows))
    assert not np.isnan(out.logprob).any()
    for c, kw in enumerate(configs):
        tokens = out.token_ids[rows == c]
        if kw["temperature"] == 0:
            assert np.all(tokens == np.argmax(logits[c]))
            continue
        ref = reference_probs(logits[c], kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1))
        check_frequencies(tokens, ref)


# ---- logprobs and masked logits -------------------------------------------------------------


@pytest.mark.parametrize("num_logprobs", [0, 1, 5])
def test_logprobs_are_raw_log_softmax(num_logprobs):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 100)).astype(np.float32) * 3
    logits[:, 90:] = -np.inf
    params = [SamplingParams(temperature=0.5, top_k=7, top_p=0.9)] * 3 + \
        [SamplingParams(temperature=0, logprobs=num_logprobs), SamplingParams(),
         SamplingParams(top_p=0.3)]
    out = run(logits, params, num_logprobs=num_logprobs)
    ref = log_softmax(logits)
    np.testing.assert_allclose(out.logprob, ref[np.arange(6), out.token_ids], rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == out.top_logprobs.shape == (6, num_logprobs)
    assert out.top_ids.dtype == np.int32 and out.top_logprobs.dtype == np.float32
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1)[:, :num_logprobs])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, out.top_ids, -1),
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(out.top_logprobs, axis=-1) <= 0)


def test_sample_mode_of_a_batch_changes_nothing_but_the_work():
    """SampleMode.of(rows) skips the parts no row needs; tokens and logprobs stay those of the
    full sampler, for every mix of greedy, drawing, filtering and logprob-asking rows."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 64)).astype(np.float32) * 2
    greedy, asks = SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2)
    draws, top1 = SamplingParams(temperature=0.8), SamplingParams(top_k=1)
    top_k, top_p = SamplingParams(temperature=0.8, top_k=5), SamplingParams(top_p=0.5)
    batches = [[greedy, top1, greedy, greedy], [greedy, asks, top1, greedy],
               [draws, greedy, draws, top1], [asks, draws, greedy, greedy],
               [top_k, draws, greedy, top1], [top_p, asks, top_k, draws]]
    seen = set()
    for params in batches:
        mode = SampleMode.of(params)
        seen.add(mode)
        got = run(logits, params, num_logprobs=3, mode=mode)
        full = run(logits, params, num_logprobs=3)
        np.testing.assert_array_equal(got.token_ids, full.token_ids)
        np.testing.assert_allclose(got.logprob, full.logprob)
        if mode.logprobs:
            np.testing.assert_array_equal(got.top_ids, full.top_ids)
        else:  # skipped: nothing a row asked for
            assert (got.top_logprobs == -np.inf).all() and not got.top_ids.any()
    assert seen == set(SampleMode.all()) and len(SampleMode.all()) == 6
    assert SampleMode.of([SamplingParams(temperature=0)] * 3) == SampleMode(False, False, False)
    assert SampleMode.of([SamplingParams(top_p=0.9), SamplingParams(logprobs=0)]) == \
        SampleMode(True, True, False)


def test_masked_logits_never_sampled_and_never_nan():
    v = 50
    logits = np.full((8, v), -np.inf, np.float32)
    logits[:, 10] = 0.0  # only token 10 allowed ...
    logits[4:, 20] = 1.0  # ... or 10 and 20
    logits[7] = -np.inf  # a fully masked row: no NaN anywhere
    params = [SamplingParams(), SamplingParams(top_k=5), SamplingParams(top_p=0.5),
              SamplingParams(temperature=0), SamplingParams(temperature=3.0),
              SamplingParams(top_k=100), SamplingParams(top_p=0.99, top_k=2), SamplingParams()]
    out = run(logits, params, num_logprobs=3)
    assert np.all(out.token_ids[:4] == 10)
    assert np.all(np.isin(out.token_ids[4:7], [10, 20]))
    for leaf in (out.logprob, out.top_logprobs):
        assert not np.isnan(leaf).any()
    assert 0 <= out.token_ids[7] < v and out.logprob[7] == -np.inf
