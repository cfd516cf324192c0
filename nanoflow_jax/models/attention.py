"""Attention over a flat token batch without a KV cache: the pure-jnp reference.

Every token attends to the earlier tokens of its own sequence inside the same batch (with a
sliding `window`: the last `window` of them, itself included, as HF's Mistral does), so one
call can hold whole prompts of several sequences packed on the token axis. The paged-KV
attention used by the engine lives beside the kernels and follows the same interface
(`nanoflow_jax.models.llama.AttentionFn`).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class DenseMetadata:
    seq_ids: jax.Array  # [T] int32: which sequence a token belongs to; -1 marks padding
    positions: jax.Array  # [T] int32: position of the token inside its sequence


def dense_metadata(seq_lens: list[int], pad_to: int | None = None) -> DenseMetadata:
    """Metadata for whole sequences packed back to back, optionally padded to `pad_to` tokens."""
    seq_ids = jnp.concatenate(
        [jnp.full((n,), i, jnp.int32) for i, n in enumerate(seq_lens)]
        + [jnp.zeros((0,), jnp.int32)]
    )
    positions = jnp.concatenate(
        [jnp.arange(n, dtype=jnp.int32) for n in seq_lens] + [jnp.zeros((0,), jnp.int32)]
    )
    pad = (pad_to or 0) - seq_ids.shape[0]
    if pad > 0:
        seq_ids = jnp.concatenate([seq_ids, jnp.full((pad,), -1, jnp.int32)])
        positions = jnp.concatenate([positions, jnp.zeros((pad,), jnp.int32)])
    return DenseMetadata(seq_ids=seq_ids, positions=positions)


def dense_attention(q, k, v, layer_cache, metadata: DenseMetadata, window: int | None = None):
    """q [T, Hq, Dh], k/v [T, Hkv, Dh] -> ([T, Hq, Dh], layer_cache unchanged).

    Causal inside each sequence; a key at position p is seen by queries at positions
    p .. p + window - 1 only (`window` None: all later ones). Padding rows produce zeros.
    Softmax in fp32.
    """
    t, hq, dh = q.shape
    hkv = k.shape[1]
    seq, pos = metadata.seq_ids, metadata.positions
    allowed = (
        (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None]) & (seq[:, None] >= 0)
    )  # [Tq, Tk]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    qg = q.reshape(t, hkv, hq // hkv, dh)  # query heads grouped by their KV head
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (dh**-0.5)
    scores = jnp.where(allowed, scores, -jnp.inf)
    # Padding rows have no allowed key: keep them finite, then zero them.
    probs = jax.nn.softmax(jnp.where(allowed.any(-1)[:, None], scores, 0.0), axis=-1)
    probs = jnp.where(allowed, probs, 0.0)
    out = jnp.einsum("hgqk,khd->qhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(t, hq, dh).astype(q.dtype), layer_cache
