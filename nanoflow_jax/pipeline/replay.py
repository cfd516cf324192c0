"""Replays a solved timeline over several layers and checks it: the SM capacity is never
exceeded at any instant (network ops, the collectives, hold no SM share), every dependency
is respected (a collective starts after its producer ends, and its consumer after it), ops of
one category never overlap (network ops included), and each op's duration is the profiled
one at its share. Run on every solver output."""
from __future__ import annotations

from nanoflow_jax.pipeline.solver import NETWORK, Plan, Problem

TOL = 1e-6  # ms, and share units: HiGHS' feasibility tolerance is ~1e-7 relative


def violations(problem: Problem, plan: Plan, layers: int = 4, tol: float = TOL) -> list[str]:
    """Every broken rule of `plan`, one line each (empty: the plan is sound)."""
    out = []
    p = plan.period
    timed = {t.name: t for t in plan.ops}
    if set(timed) != {o.name for o in problem.ops}:
        return [f"the plan's ops {sorted(timed)} are not the problem's"]
    for o in problem.ops:
        t = timed[o.name]
        shares = dict(o.durations)
        if t.share not in shares:
            out.append(f"{o.name}: share {t.share} was not profiled")
        elif abs(t.end - t.start - shares[t.share]) > tol * max(1.0, t.end):
            out.append(f"{o.name}: lasts {t.end - t.start:.4f} ms, profiled "
                       f"{shares[t.share]:.4f} ms at share {t.share}")
        if t.start < -tol or t.end > 2 * p + tol:
            out.append(f"{o.name}: [{t.start:.4f}, {t.end:.4f}) leaves the two periods "
                       f"[0, {2 * p:.4f}]")
    for e in problem.edges:
        a, b = timed[e.before], timed[e.after]
        gap = b.start + e.distance * p - a.end
        if gap < -tol or (e.immediate and gap > tol):
            out.append(f"dependency {e.before} -> {e.after} (layer +{e.distance}): "
                       f"{e.after} starts {gap:+.4f} ms after {e.before} ends")
    # Every op of layers 0..layers-1 on one time axis.
    spans = [(layer * p + t.start, layer * p + t.end, t, layer)
             for layer in range(layers) for t in plan.ops]
    for start, _, t, layer in spans:
        running = [(u, ul) for s, e, u, ul in spans if s <= start + tol and e > start + tol]
        on_sms = [(u, ul) for u, ul in running if u.category != NETWORK]
        load = sum(u.share for u, _ in on_sms)
        if load > 1 + tol:
            names = ", ".join(f"{u.name}@{ul}({u.share:g})" for u, ul in on_sms)
            out.append(f"at {start:.4f} ms ({t.name} of layer {layer} starts) the running ops "
                       f"use {load:.3f} of the SMs: {names}")
        for u, ul in running:
            if u.category == t.category and (u.name, ul) != (t.name, layer):
                out.append(f"{t.name}@{layer} and {u.name}@{ul} overlap in category "
                           f"{t.category}")
    return out


def check(problem: Problem, plan: Plan, layers: int = 4) -> None:
    """Raises ValueError naming every broken rule of `plan`."""
    broken = violations(problem, plan, layers)
    if broken:
        raise ValueError("the plan breaks " + str(len(broken)) + " rule(s): "
                         + "; ".join(broken[:8]))
