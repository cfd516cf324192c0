"""On-device sampling of one token per row, each row with its own parameters.

`sample(logits [B, V], tensors, num_logprobs, mode)` is a pure, jit-friendly function: static
shapes, no host sync. Per row:
    greedy rows (temperature < SAMPLING_EPS, or top_k == 1): argmax of the raw logits
        (ties -> lowest index, as jnp.argmax);
    other rows: x = logits / T; keep the top_k largest (0 = all), then of those the smallest
        prefix of the renormalized distribution whose mass reaches top_p (at least one token),
        as vLLM does; sample by Gumbel-max: argmax(x_kept + Gumbel noise).
The costly parts run only when some row needs them, which the host knows when it builds the
batch: `SampleMode` (a static argument) says whether any row draws (else no [B, V] noise),
filters (a [B, V] sort) or asks for top logprobs (a [B, V] top-k). Not `lax.cond`: XLA's GPU
conditional copies its predicate to the host and blocks the dispatching thread until the
step reaches it, which stalls the engine's asynchronous dispatch for the whole step. The kept
set is applied as a value threshold (x >= the last kept sorted value), so nothing is
un-sorted or scattered; ties at the threshold are all kept (as vLLM's top-k).

Reproducibility: a row's noise depends ONLY on its (seed, step), through
    key = fold_in(fold_in(fold_in(key(0), seed_lo), seed_hi), step)
(threefry, whose bits do not depend on batching), so a seeded request gets the same tokens
whatever else is in the batch, wherever its row sits, and after a preemption recompute.

Logprobs are those of the RAW logits (log_softmax before temperature and filtering), as vLLM
returns them. Logits may hold -inf (masked vocab entries): no NaN comes out.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nanoflow_jax.sampling_params import SAMPLING_EPS, SamplingParams

_INT32_MAX = 2**31 - 1


@flax.struct.dataclass
class SamplingTensors:
    """One row per sequence being sampled; all leaves shape [B]."""

    temperature: jax.Array  # f32; < SAMPLING_EPS => greedy (argmax); padded rows 0
    top_k: jax.Array  # int32; 0 => no limit (1 => greedy)
    top_p: jax.Array  # f32; 1 => no limit
    seed: jax.Array  # uint32: low 32 bits of the sequence's seed
    step: jax.Array  # int32: index of the token being sampled within the sequence's output
    seed_hi: jax.Array | None = None  # uint32: high 32 bits of the seed (None => zeros)


@dataclasses.dataclass(frozen=True)
class SampleMode:
    """Which of the sampler's costly parts a batch needs (host-side, hashable: a static
    argument of the jitted sampler). The default runs everything, right for any batch."""

    sampled: bool = True  # some row draws a token (else every row is an argmax)
    filtered: bool = True  # some drawing row has top_k or top_p (a [B, V] sort)
    logprobs: bool = True  # some row asks for top logprobs (a [B, V] top-k)

    @classmethod
    def of(cls, params_list: Sequence[SamplingParams]) -> "SampleMode":
        drawing = [p for p in params_list if not p.greedy]
        return cls(sampled=bool(drawing),
                   filtered=any(p.top_k > 0 or p.top_p < 1.0 for p in drawing),
                   logprobs=any(p.logprobs for p in params_list))

    @classmethod
    def all(cls) -> list["SampleMode"]:
        """Every distinct mode (filtering only matters when some row draws)."""
        return [cls(s, f, lp) for s in (False, True) for f in (False, True)[:1 + s]
                for lp in (False, True)]


@flax.struct.dataclass
class SampleOutput:
    token_ids: jax.Array  # [B] int32
    logprob: jax.Array  # [B] f32: log_softmax(raw logits) at token_ids
    top_ids: jax.Array  # [B, N] int32: the N most likely tokens, most likely first
    top_logprobs: jax.Array  # [B, N] f32: their log_softmax(raw logits), descending


def sampling_tensors(
    params_list: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    pad_to: int | None = None,
    rows: Sequence[int] | None = None,
) -> SamplingTensors:
    """Host-side builder: numpy leaves of shape [pad_to] (default len(params_list)).

    `seeds[i]` is row i's resolved seed, an int in [0, 2**64): the engine takes it from
    `SamplingParams.seed` (or draws one when None) once per sequence and passes the same value
    at every step. `steps[i]` is the index of the token being sampled in that sequence's
    output. `rows[i]` (default i) is where entry i goes; the other rows are padding: greedy,
    seed 0, step 0. Columns, not a loop per row: the engine builds ~1000 rows every step.
    """
    b = len(params_list)
    pad_to = b if pad_to is None else pad_to
    if len(seeds) != b or len(steps) != b:
        raise ValueError(f"need one seed and one step per row: {b} params, "
                         f"{len(seeds)} seeds, {len(steps)} steps")
    if pad_to < b:
        raise ValueError(f"pad_to ({pad_to}) < number of rows ({b})")
    if b and (min(seeds) < 0 or max(seeds) >= 2**64):
        raise ValueError(f"seeds must be ints in [0, 2**64), got range [{min(seeds)}, "
                         f"{max(seeds)}]")
    if b and (min(steps) < 0 or max(steps) > _INT32_MAX):
        raise ValueError(f"steps must be in [0, 2**31), got range [{min(steps)}, {max(steps)}]")
    rows = np.arange(b) if rows is None else np.asarray(rows, np.intp)
    temperature = np.zeros(pad_to, np.float32)
    top_k = np.zeros(pad_to, np.int32)
    top_p = np.ones(pad_to, np.float32)
    # Greedy rows keep the padding's values: temperature 0, no filtering.
    drawing = [i for i, p in enumerate(params_list) if not p.greedy]
    if drawing:
        at, drawn = rows[drawing], [params_list[i] for i in drawing]
        temperature[at] = [p.temperature for p in drawn]
        top_k[at] = [min(p.top_k, _INT32_MAX) for p in drawn]
        top_p[at] = [p.top_p for p in drawn]
    seed64 = np.zeros(pad_to, np.uint64)
    seed64[rows] = np.fromiter(map(int, seeds), np.uint64, b)
    step = np.zeros(pad_to, np.int32)
    step[rows] = steps
    return SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=(seed64 & np.uint64(0xFFFFFFFF)).astype(np.uint32),
        step=step,
        seed_hi=(seed64 >> np.uint64(32)).astype(np.uint32),
    )


def _row_keys(t: SamplingTensors) -> jax.Array:
    """Typed PRNG keys [B], each a function of its row's (seed, step) alone."""
    base = jax.random.key(0, impl="threefry2x32")  # explicit: independent of jax_default_prng_impl
    seed_lo = t.seed.astype(jnp.uint32)
    seed_hi = jnp.zeros_like(seed_lo) if t.seed_hi is None else t.seed_hi.astype(jnp.uint32)
    step = t.step.astype(jnp.uint32)

    def one(lo, hi, st):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, lo), hi), st)

    return jax.vmap(one)(seed_lo, seed_hi, step)


def _log_softmax(x: jax.Array) -> jax.Array:
    """log_softmax over the last axis, -inf entries allowed; an all -inf row gives -inf, not NaN."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    shifted = x - m
    total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    return shifted - jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)


def _filter_top_k_top_p(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """x [B, V] (temperature-scaled) -> x with entries outside top-k, then top-p, set to -inf."""
    v = x.shape[-1]
    s = -jnp.sort(-x, axis=-1)  # [B, V] descending
    idx = jnp.arange(v, dtype=jnp.int32)  # [V] rank in sorted order
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)[:, None]  # [B, 1]
    in_k = idx < k  # [B, V]
    # Top-p on the top-k renormalized distribution, in sorted order: keep rank i while the mass
    # of ranks < i is below top_p (so rank 0 always; the kept prefix is the smallest reaching p).
    m = s[:, :1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(in_k, jnp.exp(s - m), 0.0)  # [B, V] unnormalized probs, 0 beyond k
    probs = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum [B, V]
    p = top_p[:, None]
    in_p = (mass_before < p) | (p >= 1.0) | (idx == 0)  # p >= 1: keep all despite rounding
    n_keep = jnp.sum(in_k & in_p, axis=-1, keepdims=True)  # [B, 1] >= 1: both are prefixes
    threshold = jnp.take_along_axis(s, n_keep - 1, axis=-1)  # [B, 1] last kept value
    return jnp.where(x >= threshold, x, -jnp.inf)


def sample(logits: jax.Array, t: SamplingTensors, num_logprobs: int = 0,
           mode: SampleMode = SampleMode()) -> SampleOutput:
    """logits [B, V] -> one token per row. `num_logprobs` (static) = N of top_ids [B, N]; with
    `mode.logprobs` False they are -inf and token 0 (no row reads them)."""
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    if not 0 <= num_logprobs <= v:
        raise ValueError(f"num_logprobs must be in [0, {v}], got {num_logprobs}")
    temperature = t.temperature.astype(jnp.float32)
    top_k = t.top_k.astype(jnp.int32)
    top_p = t.top_p.astype(jnp.float32)
    greedy = (temperature < SAMPLING_EPS) | (top_k == 1)  # [B]

    token_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    if mode.sampled:  # Gumbel-max over the filtered, temperature-scaled logits
        x = logits / jnp.maximum(temperature, SAMPLING_EPS)[:, None]  # [B, V]; -inf stays -inf
        if mode.filtered:  # rows without top-k / top-p keep everything
            x = _filter_top_k_top_p(x, top_k, top_p)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32))(_row_keys(t))
        sampled = jnp.argmax(x + noise, axis=-1).astype(jnp.int32)  # -inf + noise stays -inf
        token_ids = jnp.where(greedy, token_ids, sampled)

    logp = _log_softmax(logits)  # [B, V] raw distribution, as vLLM reports it
    logprob = jnp.take_along_axis(logp, token_ids[:, None], axis=-1)[:, 0]
    if num_logprobs and mode.logprobs:
        top_logprobs, top_ids = jax.lax.top_k(logp, num_logprobs)
    else:
        top_logprobs = jnp.full((b, num_logprobs), -jnp.inf, jnp.float32)
        top_ids = jnp.zeros((b, num_logprobs), jnp.int32)
    return SampleOutput(token_ids=token_ids, logprob=logprob,
                        top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)
