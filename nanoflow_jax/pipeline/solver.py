"""The auto-search's two MILPs (NanoFlow §4.1, `scipy.optimize.milp` with HiGHS), over a
cyclic op graph.

A `Problem` is one layer's nano-ops: each has a resource category (ops of one category share
one stream and never overlap: "compute" GEMMs, "memory" attention, and under tensor
parallelism "network" collectives, NanoFlow's three) and a duration per SM share. Network ops
run on the interconnect (XLA's async collectives on their own stream, NCCL's few CTAs, which
no knob partitions): they hold no SM share, take their profiled time, and overlap compute
and memory ops freely; the SM capacity binds the other two categories only.
Edges are dependencies, `distance` layers apart (down of layer l -> qkv of layer l + 1 is
distance 1). Every layer repeats the same timeline shifted by the period P, so P is the
steady-state time per layer: op i of layer l runs over [l·P + s_i, l·P + e_i). Each op lasts at
most P and its interval lies in [0, 2P]: a layer spans at most two periods, which is what the
executor's windows express (`autosearch` maps the timeline onto a `Schedule`), and an op can
meet another op only of its own layer or of the layers just before and after it (shifts -1, 0,
+1): three consecutive layers, unrolled as shifts of the middle one, hold every interaction.

Stage 1 (`order`): every op at its full-SM duration, interference between categories ignored.
Variables s_i, P and, per pair of one category and each shift, a binary choosing which of the
two intervals comes first (big-M disjunctions; pairs that a path of edges already orders get
none). Data edges: e_a <= s_b + distance·P, with equality for an `immediate` edge (a fused
successor that starts as its predecessor ends). Objective min P. The per-category order it
finds (for every pair and shift, which ran first) is kept by stage 2 as plain edges.

Stage 2 (`assign_shares`): each op picks one SM share (one-hot x_ip; its duration and share are
linear in x). For every pair of ops of the two categories and each shift, a binary o says they
may overlap: o = 0 forces one to end before the other starts (a second binary picks which), and
o = 1 costs capacity: share_i + share_j <= 1 + (1 - o). With two categories at most two ops run
at any instant, so the pairwise row is exact. Objective min P, plus a small weight on the summed
durations so that ops off the critical path take their fastest share; an op that overlaps
nothing gets all SMs back.

Both stages add valid rows that tighten the relaxation: each category's busy time fits in one
period, and (stage 2) so does the SM-time sum of share·duration. The big-M constants come from
the horizon (the no-overlap period at full SMs), not a fixed constant; each solve has a time
limit and keeps HiGHS's incumbent when it stops on it (`Plan.optimal` says which).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

log = logging.getLogger("nanoflow_jax")

NETWORK = "network"  # the category of collectives: no SM share (module doc)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    category: str
    durations: tuple[tuple[float, float], ...]  # ((SM share, ms), ...), one share being 1.0

    def __post_init__(self):
        shares = [p for p, _ in self.durations]
        if 1.0 not in shares or not all(0 < p <= 1 for p in shares):
            raise ValueError(f"op {self.name}: shares must lie in (0, 1] and include 1.0, "
                             f"got {shares}")
        if any(ms <= 0 for _, ms in self.durations):
            raise ValueError(f"op {self.name}: durations must be > 0, got {self.durations}")

    def ms(self, share: float) -> float:
        return dict(self.durations)[share]


@dataclasses.dataclass(frozen=True)
class Edge:
    before: str
    after: str
    distance: int = 0  # 0: the same layer; 1: `after` of the next layer (-1: the previous)
    immediate: bool = False  # `after` starts exactly when `before` ends


@dataclasses.dataclass(frozen=True)
class Problem:
    ops: tuple[Op, ...]
    edges: tuple[Edge, ...]

    def __post_init__(self):
        names = [o.name for o in self.ops]
        if len(set(names)) != len(names):
            raise ValueError("op names must be unique")
        for e in self.edges:
            if e.before not in names or e.after not in names:
                raise ValueError(f"edge {e.before} -> {e.after} names an unknown op")
            if e.distance not in (-1, 0, 1):
                raise ValueError(f"edge {e.before} -> {e.after}: distance must be -1, 0 or 1")
        if len(self.sm_categories) > 2:
            raise ValueError(f"the capacity rows are exact for two categories sharing the "
                             f"SMs (besides {NETWORK}); got {', '.join(self.sm_categories)}")
        for o in self.ops:
            if o.category == NETWORK and [p for p, _ in o.durations] != [1.0]:
                raise ValueError(f"network op {o.name} holds no SM share: give its duration "
                                 f"at share 1.0 only")

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o.category for o in self.ops))

    @property
    def sm_categories(self) -> tuple[str, ...]:
        """The categories whose ops share the SMs (all but network)."""
        return tuple(c for c in self.categories if c != NETWORK)

    def index(self, name: str) -> int:
        return [o.name for o in self.ops].index(name)

    def horizon(self) -> float:
        """The period with no overlap at all, every op on all SMs: an upper bound of P."""
        return sum(o.ms(1.0) for o in self.ops)


@dataclasses.dataclass(frozen=True)
class Timed:
    name: str
    category: str
    start: float  # ms from the layer's origin, in [0, 2·period)
    end: float
    share: float


@dataclasses.dataclass(frozen=True)
class Plan:
    period: float  # ms per layer in the steady state
    ops: tuple[Timed, ...]
    optimal: bool  # False: HiGHS stopped on its time limit and this is its incumbent
    solve_s: float

    def op(self, name: str) -> Timed:
        return next(t for t in self.ops if t.name == name)


class _Rows:
    """Sparse constraint rows lo <= a·x <= hi, built one at a time."""

    def __init__(self, num_vars: int):
        self.n, self.data, self.lo, self.hi = num_vars, [], [], []

    def add(self, coefs: dict[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        self.data.append(coefs)
        self.lo.append(lo)
        self.hi.append(hi)

    def constraint(self):
        from scipy.optimize import LinearConstraint
        from scipy.sparse import coo_array

        r, c, v = zip(*[(r, c, v) for r, coefs in enumerate(self.data)
                        for c, v in coefs.items()])
        a = coo_array((v, (r, c)), shape=(len(self.data), self.n)).tocsr()
        return LinearConstraint(a, self.lo, self.hi)


def _min_distance(problem: Problem, extra=()) -> np.ndarray:
    """[n, n] the fewest layers a path of edges (data edges plus `extra`) goes forward from
    op a to op b (inf: no path). A path a -> b of distance D puts b of layer l + D after a of
    layer l, so the two never overlap at that shift or any later one."""
    n = len(problem.ops)
    dist = np.full((n, n), np.inf)
    for e in tuple(problem.edges) + tuple(extra):
        a, b = problem.index(e.before), problem.index(e.after)
        dist[a, b] = min(dist[a, b], e.distance)
    for k in range(n):  # Floyd-Warshall
        dist = np.minimum(dist, dist[:, k:k + 1] + dist[k:k + 1, :])
    return dist


def _solve(cost, rows: _Rows, integrality, lb, ub, time_limit: float, what: str):
    from scipy.optimize import Bounds, milp

    t0 = time.perf_counter()
    res = milp(cost, constraints=rows.constraint(), integrality=integrality,
               bounds=Bounds(lb, ub),
               options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": 1e-3})
    solve_s = time.perf_counter() - t0
    if res.x is None:
        raise RuntimeError(f"{what}: HiGHS found no feasible solution in {time_limit:.1f} s "
                           f"({res.message})")
    log.debug("%s: %s in %.2f s", what, res.message, solve_s)
    return res.x, res.status == 0, solve_s


def _add_edges(rows: _Rows, problem: Problem, period, duration) -> None:
    """Data edges: e_a <= s_b + distance·P (equal for immediate edges). `duration(i)` gives
    (coefficients over the share variables, constant ms)."""
    for e in problem.edges:
        a, b = problem.index(e.before), problem.index(e.after)
        coefs, const = duration(a)
        coefs = {**coefs, a: 1, b: -1, period: -e.distance}
        rows.add(coefs, -const if e.immediate else -np.inf, -const)


def _same_category(problem: Problem, dist: np.ndarray) -> list[tuple[int, int, int]]:
    """(i, j, shift), i < j of one category, whose intervals [s_i, e_i) and [s_j + shift·P,
    e_j + shift·P) no path of edges orders already: a disjunction each."""
    n = len(problem.ops)
    return [(i, j, k) for i in range(n) for j in range(i + 1, n) for k in (-1, 0, 1)
            if problem.ops[i].category == problem.ops[j].category
            and dist[i, j] > k and dist[j, i] > -k]


def _add_layer_bounds(rows: _Rows, problem: Problem, period, duration) -> None:
    """Each op lasts at most P (it does not overlap itself in the next layer) and ends by 2P
    (a layer spans at most two windows)."""
    for i in range(len(problem.ops)):
        coefs, const = duration(i)
        rows.add({**coefs, period: -1}, hi=-const)
        rows.add({**coefs, i: 1, period: -2}, hi=-const)


def _add_period_bounds(rows: _Rows, problem: Problem, period, duration, share_time) -> None:
    """Valid rows that tighten the relaxation: each category's ops fit in one period (they
    never overlap), and so does the SM-time of the SM-sharing ops (the shares of running ops
    sum to <= 1 at every instant). `share_time(i)`: coefficients of share·duration (None:
    skip)."""
    for cat in problem.categories:
        coefs, const = {}, 0.0
        for i, o in enumerate(problem.ops):
            if o.category == cat:
                c, k = duration(i)
                coefs.update(c)
                const += k
        rows.add({**coefs, period: -1}, hi=-const)
    if share_time is not None:
        coefs = {}
        for i, o in enumerate(problem.ops):
            if o.category != NETWORK:
                coefs.update(share_time(i))
        rows.add({**coefs, period: -1}, hi=0)


def order(problem: Problem, time_limit: float = 10.0) -> Plan:
    """Stage 1: each op at its full-SM duration, ops of a category never overlapping (in any
    layer), interference between categories ignored; minimises the period. Returns the
    timeline (every share 1.0), whose per-category order stage 2 keeps."""
    n = len(problem.ops)
    d = [o.ms(1.0) for o in problem.ops]
    horizon = problem.horizon()
    big = 3 * horizon + max(d)
    pairs = _same_category(problem, _min_distance(problem))
    period, num_vars = n, n + 1 + len(pairs)  # s_0..s_{n-1}, P, y per pair
    rows = _Rows(num_vars)
    const = lambda i: ({}, d[i])  # noqa: E731
    _add_edges(rows, problem, period, const)
    _add_layer_bounds(rows, problem, period, const)
    _add_period_bounds(rows, problem, period, const, None)
    for m, (i, j, k) in enumerate(pairs):
        y = n + 1 + m  # 1: i ends before j (shifted k layers) starts; 0: the other way
        rows.add({i: 1, j: -1, period: -k, y: big}, hi=big - d[i])
        rows.add({j: 1, i: -1, period: k, y: -big}, hi=-d[j])
    cost = np.zeros(num_vars)
    cost[period] = 1.0
    cost[:n] = 1e-4 / n  # tie-break: start early (a compact, deterministic timeline)
    lb = np.zeros(num_vars)
    ub = np.concatenate([np.full(n, 2 * horizon), [horizon], np.ones(len(pairs))])
    integrality = np.concatenate([np.zeros(n + 1), np.ones(len(pairs))])
    x, optimal, solve_s = _solve(cost, rows, integrality, lb, ub, time_limit, "stage 1")
    ops = tuple(Timed(o.name, o.category, float(x[i]), float(x[i]) + d[i], 1.0)
                for i, o in enumerate(problem.ops))
    return Plan(float(x[period]), ops, optimal, solve_s)


def order_edges(problem: Problem, stage1: Plan) -> list[Edge]:
    """Stage 1's order within each category as edges: for every same-category pair and layer
    shift, the one that ran first still does (distance -1, 0 or 1)."""
    p, edges = stage1.period, []
    timed = {t.name: t for t in stage1.ops}
    for i, j, k in _same_category(problem, _min_distance(problem)):
        a, b = timed[problem.ops[i].name], timed[problem.ops[j].name]
        if a.end <= b.start + k * p + 1e-7 * max(1.0, p):
            edges.append(Edge(a.name, b.name, k))
        else:
            edges.append(Edge(b.name, a.name, -k))
    return edges


def assign_shares(problem: Problem, stage1: Plan, time_limit: float = 30.0) -> Plan:
    """Stage 2: stage 1's per-category order kept; each op's SM share, and which ops of the
    two SM-sharing categories overlap (at shifts -P, 0, +P), chosen to minimise the period
    under the SM capacity (network ops keep stage 1's order and their profiled time)."""
    n = len(problem.ops)
    shares = [tuple(p for p, _ in o.durations) for o in problem.ops]
    horizon = problem.horizon()
    dmax = max(ms for o in problem.ops for _, ms in o.durations)
    big = 3 * horizon + dmax
    # Variables: s_i (n), P, x_ip (one-hot shares), then (o, z) per cross pair and shift.
    period = n
    x_index, k = [], n + 1
    for i in range(n):
        x_index.append(list(range(k, k + len(shares[i]))))
        k += len(shares[i])
    cats = problem.sm_categories
    kept = order_edges(problem, stage1)
    dist = _min_distance(problem, kept)
    cross = [(i, j, shift) for i in range(n) for j in range(n) for shift in (-1, 0, 1)
             if len(cats) == 2 and problem.ops[i].category == cats[0]
             and problem.ops[j].category == cats[1]
             and dist[i, j] > shift and dist[j, i] > -shift]  # else ordered by a path
    o_index = {c: (k + 2 * m, k + 2 * m + 1) for m, c in enumerate(cross)}
    num_vars = k + 2 * len(cross)
    rows = _Rows(num_vars)

    def duration(i):  # (coefficients over x_i, constant)
        return {x: problem.ops[i].ms(p) for x, p in zip(x_index[i], shares[i])}, 0.0

    for i in range(n):
        rows.add({x: 1 for x in x_index[i]}, 1, 1)
    _add_layer_bounds(rows, problem, period, duration)
    _add_period_bounds(rows, problem, period, duration, lambda i: {
        x: p * problem.ops[i].ms(p) for x, p in zip(x_index[i], shares[i])})
    _add_edges(rows, dataclasses.replace(problem, edges=problem.edges + tuple(kept)), period,
               duration)
    for (i, j, shift), (o, z) in o_index.items():
        di, _ = duration(i)
        dj, _ = duration(j)
        # o = 0 and z = 0: e_i <= s_j + shift·P; o = 0 and z = 1: e_j + shift·P <= s_i.
        rows.add({i: 1, j: -1, period: -shift, o: -big, z: -big, **di}, hi=0)
        rows.add({j: 1, i: -1, period: shift, o: -big, z: big, **dj}, hi=big)
        share_i = {x: p for x, p in zip(x_index[i], shares[i])}
        share_j = {x: p for x, p in zip(x_index[j], shares[j])}
        rows.add({**share_i, **share_j, o: 1}, hi=2)  # overlapping: shares sum to <= 1
    cost = np.zeros(num_vars)
    cost[period] = 1.0
    weight = 1e-3 / n  # ops off the critical path take their fastest share
    for i in range(n):
        for x, p in zip(x_index[i], shares[i]):
            cost[x] = weight * problem.ops[i].ms(p)
    lb = np.zeros(num_vars)
    ub = np.concatenate([np.full(n, 2 * horizon), [horizon], np.ones(num_vars - n - 1)])
    integrality = np.concatenate([np.zeros(n + 1), np.ones(num_vars - n - 1)])
    x, optimal, solve_s = _solve(cost, rows, integrality, lb, ub, time_limit, "stage 2")
    ops = []
    for i, op in enumerate(problem.ops):
        p = shares[i][int(np.argmax([x[v] for v in x_index[i]]))]
        ops.append(Timed(op.name, op.category, float(x[i]), float(x[i]) + op.ms(p), p))
    return _all_sms_when_alone(problem, Plan(float(x[period]), tuple(ops), optimal, solve_s))


def _all_sms_when_alone(problem: Problem, plan: Plan) -> Plan:
    """An op that overlaps no op of another SM-sharing category (at any shift) gets all SMs
    back, when that is no slower: its start stays, its end only moves earlier."""
    p, ops = plan.period, list(plan.ops)
    for i, t in enumerate(ops):
        alone = all(u.category in (t.category, NETWORK) or u.end + k * p <= t.start + 1e-7
                    or t.end <= u.start + k * p + 1e-7 for u in ops for k in (-1, 0, 1))
        full = problem.ops[problem.index(t.name)].ms(1.0)
        if alone and t.share < 1 and full <= t.end - t.start:
            ops[i] = dataclasses.replace(t, end=t.start + full, share=1.0)
    return dataclasses.replace(plan, ops=tuple(ops))


def solve(problem: Problem, time_limit: float = 30.0) -> Plan:
    """Stage 1 then stage 2, the result replayed (`replay.check`); the plan's solve_s is both
    stages' time."""
    from nanoflow_jax.pipeline import replay

    t0 = time.perf_counter()
    first = order(problem, time_limit / 4)
    second = assign_shares(problem, first, max(time_limit - (time.perf_counter() - t0), 1.0))
    replay.check(problem, second)
    log.info("solved %d ops in %.2f s: %.4f ms per layer%s", len(problem.ops),
             time.perf_counter() - t0, second.period,
             "" if second.optimal else " (time limit: HiGHS' incumbent)")
    return dataclasses.replace(second, solve_s=time.perf_counter() - t0)
