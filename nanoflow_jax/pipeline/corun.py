"""Co-run times: a GEMM op beside decode attention, issued as the executor overlaps them, and
the overlap efficiency the prediction reads from them.

The solver assumes that two ops side by side each run at their solo speed at their SM share.
On a GPU they do not (they share HBM, L2 and the SMs' issue slots, and a kernel given a share
of the SMs through its grid does not own them), so the profile measures pairs. The table
(`Profile.corun`, JSON-native; absent: the solver's assumption holds):

    tokens                 rows of both sides, increasing
    context                decode context of the attention's rows
    shares                 GEMM shares p, increasing; the attention beside it runs on 1 - p
                           of the SMs (p = 1: both on all SMs, the two kernels interleaved)
    ms[op][i][j][k]        ms of the pair: GEMM op over tokens[i] rows at shares[k] beside
                           decode attention of tokens[j] rows, from their common start to the
                           later one's end

A pair runs as the executor runs one tick of an overlapped schedule: the GEMM in a call on
stream 1, the attention in a call on stream 2, the two in one XLA scheduling group, several
instances per program like the solo ops (`profile.profile_ops`).

The overlap efficiency of a pair whose solo times (at those shares) are g and a is

    e = (g + a - pair) / min(g, a)        clipped to [-1, 1]

1: the pair takes the longer op's time (the solver's assumption); 0: the sum of both, so the
overlap saves nothing; below 0: longer than the two one after the other. It is interpolated
bilinearly in the two row counts (constant beyond the profiled ones) and taken at the
profiled GEMM share nearest to the one asked for.
"""
from __future__ import annotations

import numpy as np

from nanoflow_jax.pipeline.schedule import NanoOp


def attention_share(gemm_share: float) -> float:
    """The attention's share beside a GEMM at `gemm_share`: the rest of the SMs, or all."""
    return 1.0 if gemm_share >= 1.0 else round(1.0 - gemm_share, 9)


def check(table: dict, gemm_ops, shares) -> None:
    """Raises ValueError unless `table` is a co-run table for these ops and profiled shares."""
    tokens, cshares = list(table["tokens"]), list(table["shares"])
    if not tokens or tokens != sorted(set(tokens)):
        raise ValueError(f"co-run tokens must increase, got {tokens}")
    if not cshares or cshares != sorted(set(cshares)):
        raise ValueError(f"co-run shares must increase, got {cshares}")
    for p in cshares:
        if p not in shares or attention_share(p) not in shares:
            raise ValueError(f"co-run share {p} needs {p} and {attention_share(p)} among the "
                             f"profiled shares {tuple(shares)}")
    shape = (len(tokens), len(tokens), len(cshares))
    if set(table["ms"]) != set(gemm_ops) or any(np.shape(table["ms"][o]) != shape
                                                for o in gemm_ops):
        raise ValueError(f"co-run ms must hold {shape} times for each of {tuple(gemm_ops)}")


def efficiency(profile, op: str, gemm_rows: int, attn_rows: int,
               gemm_share: float = 1.0) -> float:
    """The overlap efficiency (module doc) of `op` over `gemm_rows` beside attention over
    `attn_rows`; 1.0 for a profile without a co-run table."""
    table = profile.corun
    if table is None or gemm_rows <= 0 or attn_rows <= 0:
        return 1.0
    tokens, shares = table["tokens"], table["shares"]
    k = int(np.argmin([abs(p - gemm_share) for p in shares]))
    grid = efficiency_grid(profile, op, k)  # [tokens (GEMM), tokens (attention)]
    per_gemm_row = [float(np.interp(attn_rows, tokens, row)) for row in grid]
    return float(np.interp(gemm_rows, tokens, per_gemm_row))


def efficiency_grid(profile, op: str, k: int) -> np.ndarray:
    """[tokens, tokens] the efficiency at each profiled pair of row counts, GEMM share k."""
    table = profile.corun
    p = table["shares"][k]
    out = np.empty((len(table["tokens"]),) * 2)
    for i, n_g in enumerate(table["tokens"]):
        g = profile.gemm_ms(op, n_g, p, calibrated=False)
        for j, n_a in enumerate(table["tokens"]):
            a = profile.decode_ms(n_a, table["context"], attention_share(p))
            pair = table["ms"][op][i][j][k]
            out[i, j] = np.clip((g + a - pair) / max(min(g, a), 1e-9), -1.0, 1.0)
    return out


def synthetic_table(profile, tokens, context: int, shares, eff: float) -> dict:
    """A co-run table whose every pair has overlap efficiency `eff` on `profile`'s solo
    times."""
    ms = {}
    for op in profile.gemm:
        ms[op] = [[[0.0] * len(shares) for _ in tokens] for _ in tokens]
        for i, n_g in enumerate(tokens):
            for j, n_a in enumerate(tokens):
                for k, p in enumerate(shares):
                    g = profile.gemm_ms(op, n_g, p, calibrated=False)
                    a = profile.decode_ms(n_a, context, attention_share(p))
                    ms[op][i][j][k] = g + a - eff * min(g, a)
    return {"tokens": list(tokens), "context": int(context), "shares": list(shares), "ms": ms}


def pair_call(kind: str, gemm_rows: int, attn_rows: int, gemm_share: float, config, attention,
              gemm_on, streams: bool):
    """One jitted program of instances of the pair (module doc): args (weight sets, GEMM
    input sets, attention q/k/v sets, KV cache, positions [gemm_rows], attention metadata);
    the attention only reads the cache (its K/V count as written)."""
    import jax

    from nanoflow_jax.pipeline.executor import on_stream
    from nanoflow_jax.pipeline.profile import run_op

    gemm_op = NanoOp(kind, 0, gemm_rows, 1, gemm_share, group=1)
    attn_op = NanoOp("attn", 0, attn_rows, 2, attention_share(gemm_share), group=1)
    written = frozenset({(0, 0, attn_rows)})

    def gemm(w, x, pos):
        return run_op(gemm_op, w, x, None, pos, None, config, attention, gemm_on=gemm_on)

    def attn(w, qkv, cache, meta):
        return run_op(attn_op, w, qkv, cache, None, meta, config, attention, written, gemm_on)

    def program(weight_sets, gemm_sets, attn_sets, cache, pos, meta):
        outs = []
        for r, (w, x, qkv) in enumerate(zip(weight_sets, gemm_sets, attn_sets)):
            if not streams:
                outs.append((gemm(w, x, pos), attn(w, qkv, cache, meta)))
                continue
            from jax.experimental.xla_metadata import set_xla_metadata

            with set_xla_metadata(_scheduling_group_id=str(r + 1)):
                outs.append((on_stream(gemm, 1)(w, x, pos),
                             on_stream(attn, 2)(w, qkv, cache, meta)))
        return outs

    return jax.jit(program)
