"""Predicted times from a profile, with the measured interference of ops side by side.

The solver's timeline assumes that a GEMM and an attention side by side each run at their solo
speed at their SM share. The prediction charges every such pair (1 - e)·o on top, o the time
the two overlap and e their overlap efficiency (`corun.py`): a GEMM at g ms with an attention
of a <= g ms inside it then takes g + (1 - e)·a, which is the measured pair time the efficiency
comes from. e = 1 (a profile without a co-run table) leaves the solver's times as they are;
e = 0 charges every overlap in full, so that no overlap beats the ops one after the other.

    plan_period    a solved timeline's period (ms per layer in the steady state)
    schedule_ms    any `Schedule` replayed as the executor issues it, ms of the decoder
                   layers of one step
"""
from __future__ import annotations

import itertools

from nanoflow_jax.pipeline.schedule import COLLECTIVES


def attention_ms(profile, workload, start: int, end: int, share: float) -> float:
    """The attention op over rows [start, end) of the workload's batch (`autosearch.Workload`):
    its decode rows, its slice of the prompt chunk, and the KV write of all its rows."""
    decode_rows = max(0, min(end, workload.num_decode) - start)
    chunk = (max(start, workload.num_decode) - workload.num_decode,
             max(end, workload.num_decode) - workload.num_decode)
    prefill = profile.prefill_ms(chunk[1]) - profile.prefill_ms(chunk[0]) if chunk[1] > chunk[0] \
        else 0.0
    return (profile.decode_ms(decode_rows, workload.decode_context, share) + max(prefill, 0.0)
            + profile.kv_write_ms(end - start))


def overlap_penalty(profile, gemm, attn, shifts=(0.0,)) -> float:
    """(1 - e)·overlap of a GEMM span and an attention span, each (kind, rows, share, start,
    end) in ms, the attention shifted by each of `shifts` ms."""
    total = 0.0
    for shift in shifts:
        o = min(gemm[4], attn[4] + shift) - max(gemm[3], attn[3] + shift)
        if o > 1e-9:
            e = profile.overlap_efficiency(gemm[0], gemm[1], attn[1], gemm[2])
            total += (1.0 - e) * o
    return total


def plan_period(profile, plan, rows: dict) -> float:
    """The period of `plan` (a `solver.Plan` of `autosearch.build_problem`, whose `rows` map
    each op's name to (kind, start row, end row)) with the overlap penalty of every GEMM and
    attention side by side, in the same layer or the layers just before and after."""
    p = plan.period
    spans = {k: [] for k in ("gemm", "attn")}
    for t in plan.ops:
        kind, start, end = rows[t.name]
        if kind not in COLLECTIVES:
            spans["attn" if kind == "attn" else "gemm"].append(
                (kind, end - start, t.share, t.start, t.end))
    return p + sum(overlap_penalty(profile, g, a, (-p, 0.0, p))
                   for g in spans["gemm"] for a in spans["attn"])


def schedule_ms(profile, schedule, workload, num_layers: int, use_streams: bool = True) -> float:
    """ms of `num_layers` decoder layers of `schedule` at the profile's dense batch, replayed
    as issued: ops in the executor's order, each as soon as its rows' previous op and the
    previous op of its stream (its queue: stream 0, each stream > 0 with `use_streams`, and
    XLA's collective queue) have ended, attention after the layer's earlier attention; then
    the overlap penalty of every GEMM and attention span that the replay puts side by side.
    An SM share that was not profiled takes the nearest profiled one's times."""
    t = profile.key["num_tokens"]
    sched = schedule.for_tokens(t)
    sched = sched.with_collectives() if profile.all_reduce is not None \
        else sched.without_collectives()
    bounds = sorted({b for o in sched.ops for b in (o.start, o.end)})
    segments = list(itertools.pairwise(bounds))
    ready = dict.fromkeys(segments, 0.0)  # when each row segment's last op ended
    queue_free, attn_done, gemms, attns, end_all = {}, {}, [], [], 0.0
    for w, o in sched.flatten(num_layers):
        layer = w + o.layer
        share = min(profile.shares, key=lambda s: abs(s - o.sm_share))
        if o.op in COLLECTIVES:
            queue, ms = "collective", profile.all_reduce_ms(o.end - o.start)
        elif o.op == "attn":
            queue, ms = o.stream if use_streams else 0, attention_ms(profile, workload,
                                                                       o.start, o.end, share)
        else:
            queue, ms = o.stream if use_streams else 0, profile.gemm_ms(o.op, o.end - o.start,
                                                                        share)
        mine = [s for s in segments if o.start <= s[0] and s[1] <= o.end]
        start = max([queue_free.get(queue, 0.0)] + [ready[s] for s in mine]
                    + ([attn_done.get(layer, 0.0)] if o.op == "attn" else []))
        end = start + ms
        queue_free[queue] = end
        ready.update(dict.fromkeys(mine, end))
        if o.op == "attn":
            attn_done[layer] = end
            attns.append((o.op, o.end - o.start, share, start, end))
        elif o.op not in COLLECTIVES:
            gemms.append((o.op, o.end - o.start, share, start, end))
        end_all = max(end_all, end)
    return end_all + sum(overlap_penalty(profile, g, a) for g in gemms for a in attns
                         if g[3] < a[4] and a[3] < g[4])
