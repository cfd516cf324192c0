"""The auto-search (NanoFlow §4.1): LLaMA's op graph from a profile, the search over nano-batch
splits, the solved timeline as a `Schedule`, and `schedule="auto"`.

One layer of N nano-batches is 5N nano-ops: per nano-batch i the GEMMs qkv_i, o_proj_i,
up_gate_i, down_i (category "compute") and attn_i (category "memory": KV write, decode and
prefill attention of its rows). Edges: qkv_i -> attn_i -> o_proj_i -> up_gate_i -> down_i in a
layer, down_i -> qkv_i of the next layer, and attn_i -> attn_i+1 (a prompt chunk cut by a
boundary needs its earlier rows' K/V). Each GEMM kind also runs its nano-batches in token
order (qkv_i before qkv_i+1, ...): that breaks the symmetry the MILP would otherwise explore,
at no cost to the pipelines NanoFlow uses. Durations come from the profile for the `Workload`: the
dense batch's first `num_decode` rows are decodes of `decode_context` tokens, the rest one
prompt chunk, so a nano-batch's attention is its decode rows plus its slice of the chunk.

Under tensor parallelism (a profile with all-reduce times) a layer is 7N nano-ops: each
nano-batch also has its two all-reduces (category "network", holding no SMs), ar_attn_i
before qkv_i and ar_mlp_i between o_proj_i and up_gate_i, with the chain's edges through
them (down_i -> ar_attn_i of the next layer); the MILP places them beside GEMMs and attention
of other nano-batches, and the schedule keeps them as collective ops at their solved place.

The nano-batch counts and sizes (multiples of `granularity`) are enumerated outside the MILP:
stage 1 (`solver.order`) runs on each split, the best few per count go on to stage 2
(`solver.assign_shares`), every plan is replayed (`replay.check`) and predicted with the
measured interference of its overlapping pairs (`predict.plan_period`: the profile's co-run
table), and the fastest prediction wins unless it saves less than `min_gain` over the
sequential schedule, which is then returned.

The timeline maps onto the executor's window: an op that starts in the first period runs in
the window before its layer's (`layer=1`), one in the second period in its layer's own window
(`layer=0`); each window issues its ops in order of start time. With `streams` the GEMMs go to
stream 1 and attention to stream 2, the ops from one attention's start to the next forming one
XLA scheduling group; each op gets its solved SM share. Smaller buckets than the searched dense
batch run sequentially (`min_tokens`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time

from nanoflow_jax.pipeline import replay, solver
from nanoflow_jax.pipeline.predict import attention_ms, plan_period
from nanoflow_jax.pipeline.profile import Profile
from nanoflow_jax.pipeline.schedule import CHAIN_TP, COLLECTIVES, OPS, NanoOp, Schedule, sequential

log = logging.getLogger("nanoflow_jax")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The dense batch's mix: `num_decode` decode rows first, each with `decode_context`
    tokens of context, then one prompt chunk over the remaining rows."""

    num_decode: int
    decode_context: int

    @classmethod
    def default(cls, num_tokens: int) -> "Workload":
        """benchmarks/step_profile.py's mixed case: 300 decodes of 1300 tokens per 1024."""
        return cls(num_tokens * 300 // 1024, 1300)


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    num_nano: tuple[int, ...] = (2, 3, 4)  # nano-batch counts tried
    granularity: int = 128  # nano-batch sizes are multiples of this
    max_splits: int = 16  # splits per count through stage 1 (evenly thinned beyond)
    keep: int = 2  # splits per count through stage 2
    time_limit_s: float = 50.0  # the whole search; each solve keeps HiGHS' incumbent
    min_gain: float = 0.02  # overlap must predict this much less than sequential
    streams: bool = True  # GEMMs on stream 1, attention on stream 2
    concurrent: bool = False  # XLA may run independent kernels at once (CUDA graphs)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    schedule: Schedule
    period_ms: float  # predicted steady-state ms per layer of the chosen schedule (with the
    # overlap penalty of its pairs: predict.py)
    sequential_period_ms: float
    num_layers: int
    sizes: tuple[int, ...]  # the chosen nano-batch sizes ((T,): sequential)
    plan: solver.Plan | None  # the solved timeline (None: sequential)
    solve_s: float  # the whole search
    # sizes, stage 1's period, stage 2's, stage 2's with the overlap penalty (ms per layer)
    candidates: tuple[tuple[tuple[int, ...], float, float | None, float | None], ...]

    @property
    def predicted_step_ms(self) -> float:
        """The layers' predicted time per step (embedding, LM head and sampling excluded)."""
        return self.num_layers * self.period_ms

    @property
    def sequential_step_ms(self) -> float:
        return self.num_layers * self.sequential_period_ms

    def to_json(self) -> str:
        """The schedule's JSON (what `named_schedule(PATH.json)` loads) plus the prediction."""
        d = json.loads(self.schedule.to_json())
        d["prediction"] = {
            "step_ms": self.predicted_step_ms, "sequential_step_ms": self.sequential_step_ms,
            "period_ms": self.period_ms, "sequential_period_ms": self.sequential_period_ms,
            "solver_period_ms": None if self.plan is None else self.plan.period,
            "num_layers": self.num_layers, "sizes": list(self.sizes), "solve_s": self.solve_s,
            "timeline": None if self.plan is None else [dataclasses.asdict(t)
                                                        for t in self.plan.ops]}
        return json.dumps(d, indent=1)


def build_problem(profile: Profile, sizes, workload: Workload):
    """The cyclic op graph of one layer cut into `sizes`; -> (Problem, {op name: (op, start,
    end)})."""
    bounds = list(itertools.accumulate(sizes, initial=0))
    chain = _chain(profile)
    ops, edges, rows = [], [], {}
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        for kind in chain:
            name = f"{kind}{i}"
            rows[name] = (kind, s, e)
            if kind == "attn":
                ms = [(p, attention_ms(profile, workload, s, e, p)) for p in profile.shares]
                ops.append(solver.Op(name, "memory", tuple(ms)))
            elif kind in COLLECTIVES:
                ops.append(solver.Op(name, solver.NETWORK,
                                     ((1.0, profile.all_reduce_ms(e - s)),)))
            else:
                ms = [(p, profile.gemm_ms(kind, e - s, p)) for p in profile.shares]
                ops.append(solver.Op(name, "compute", tuple(ms)))
        edges += [solver.Edge(f"{a}{i}", f"{b}{i}") for a, b in zip(chain, chain[1:])]
        edges.append(solver.Edge(f"down{i}", f"{chain[0]}{i}", distance=1))
        if i:  # attention in token order (data); the GEMMs too (it breaks symmetry)
            edges += [solver.Edge(f"{kind}{i - 1}", f"{kind}{i}") for kind in chain]
    return solver.Problem(tuple(ops), tuple(edges)), rows


def _chain(profile: Profile) -> tuple[str, ...]:
    """A nano-batch's ops in a layer: with the all-reduces when the profile has them."""
    return OPS if profile.all_reduce is None else CHAIN_TP


def sequential_period(profile: Profile, num_tokens: int, workload: Workload) -> float:
    """ms per layer of the sequential schedule: every op over the whole batch on all SMs (and
    under tensor parallelism its two all-reduces, with nothing beside them)."""
    collectives = 0.0 if profile.all_reduce is None else 2 * profile.all_reduce_ms(num_tokens)
    return (sum(profile.gemm_ms(k, num_tokens) for k in ("qkv", "o_proj", "up_gate", "down"))
            + attention_ms(profile, workload, 0, num_tokens, 1.0) + collectives)


def candidate_splits(num_tokens: int, num_nano: int, granularity: int,
                     max_splits: int) -> list[tuple[int, ...]]:
    """Sizes (multiples of `granularity`, summing to `num_tokens`) of `num_nano` nano-batches;
    beyond `max_splits` an evenly spaced subset, the most equal split always kept."""
    units = num_tokens // granularity
    if num_tokens % granularity or units < num_nano:
        return []
    splits = [tuple(granularity * (b - a) for a, b in zip((0,) + cut, cut + (units,)))
              for cut in itertools.combinations(range(1, units), num_nano - 1)]
    equal = min(splits, key=lambda s: max(s) - min(s))
    if len(splits) > max_splits:
        step = len(splits) / max_splits
        splits = [splits[int(k * step)] for k in range(max_splits)]
    return list(dict.fromkeys([equal] + splits))


def plan_to_schedule(plan: solver.Plan, rows: dict, num_tokens: int,
                     options: SearchOptions) -> Schedule:
    """The executor's window for a solved timeline (see the module doc)."""
    p, tol = plan.period, 1e-9
    two_windows = any(t.start >= p - tol for t in plan.ops)
    placed = []
    for t in plan.ops:
        late = two_windows and t.start >= p - tol
        position = t.start - p if late else t.start
        placed.append((position, t, 0 if late or not two_windows else 1))
    placed.sort(key=lambda x: (x[0], CHAIN_TP.index(rows[x[1].name][0])))
    overlaps = _has_overlap(plan)
    use_streams = options.streams and overlaps
    ops, tick = [], 0
    for _, t, layer in placed:
        kind, start, end = rows[t.name]
        if t.category == "memory":
            tick += 1
        if kind in COLLECTIVES:  # XLA's async collective, outside the stream calls
            ops.append(NanoOp(kind, start, end, layer=layer))
            continue
        stream = (2 if kind == "attn" else 1) if use_streams else 0
        ops.append(NanoOp(kind, start, end, stream, t.share, tick if use_streams else 0, layer))
    num_nano = sum(kind == "qkv" for kind, _, _ in rows.values())
    sizes = "-".join(str(rows[f"qkv{i}"][2] - rows[f"qkv{i}"][1]) for i in range(num_nano))
    name = f"auto-nano{num_nano}-{sizes}" + ("+graph" if options.concurrent else "")
    return Schedule(name, num_tokens, tuple(ops), min_tokens=num_tokens,
                    concurrent=options.concurrent)


def _has_overlap(plan: solver.Plan) -> bool:
    """Whether ops of the two SM-sharing categories overlap (then streams pay); collectives
    overlap through XLA's async collectives without them."""
    p = plan.period
    return any(a.category != b.category and solver.NETWORK not in (a.category, b.category)
               and a.start < b.end + k * p - 1e-9
               and b.start + k * p < a.end - 1e-9
               for a in plan.ops for b in plan.ops for k in (-1, 0, 1))


def search(profile: Profile, num_layers: int, workload: Workload | None = None,
           options: SearchOptions = SearchOptions()) -> SearchResult:
    """The fastest predicted schedule for the profile's dense batch (module doc)."""
    t0 = time.perf_counter()
    num_tokens = profile.key["num_tokens"]
    workload = workload or Workload.default(num_tokens)
    seq = sequential_period(profile, num_tokens, workload)
    splits = [s for n in options.num_nano
              for s in candidate_splits(num_tokens, n, options.granularity, options.max_splits)]
    stage1_budget = 0.4 * options.time_limit_s
    ranked: dict[int, list] = {}
    candidates = []
    for k, sizes in enumerate(splits):
        problem, rows = build_problem(profile, sizes, workload)
        left = stage1_budget - (time.perf_counter() - t0)
        try:
            first = solver.order(problem, max(left / (len(splits) - k), 0.2))
        except RuntimeError as e:
            log.info("autosearch: split %s skipped: %s", sizes, e)
            continue
        ranked.setdefault(len(sizes), []).append((first.period, sizes, problem, rows, first))
    finalists = [c for group in ranked.values() for c in sorted(group, key=lambda c: c[0])
                 [:options.keep]]
    best = None
    for k, (period1, sizes, problem, rows, first) in enumerate(finalists):
        left = options.time_limit_s - (time.perf_counter() - t0)
        try:
            plan = solver.assign_shares(problem, first, max(left / (len(finalists) - k), 0.5))
        except RuntimeError as e:
            log.info("autosearch: split %s: %s", sizes, e)
            candidates.append((sizes, period1, None, None))
            continue
        replay.check(problem, plan)
        predicted = plan_period(profile, plan, rows)
        candidates.append((sizes, period1, plan.period, predicted))
        log.info("autosearch: split %s: stage 1 %.4f ms, stage 2 %.4f ms per layer%s, "
                 "%.4f ms with the overlap penalty", sizes, period1, plan.period,
                 "" if plan.optimal else " (time limit: incumbent)", predicted)
        if best is None or predicted < best[3]:
            best = (plan, sizes, rows, predicted)
    solve_s = time.perf_counter() - t0
    if best is None or best[3] > (1 - options.min_gain) * seq:
        schedule = sequential(num_tokens, options.concurrent)  # collectives: the executor's
        return SearchResult(schedule, seq, seq, num_layers, (num_tokens,), None, solve_s,
                            tuple(candidates))
    plan, sizes, rows, predicted = best
    schedule = plan_to_schedule(plan, rows, num_tokens, options)
    return SearchResult(schedule, predicted, seq, num_layers, tuple(sizes), plan, solve_s,
                        tuple(candidates))


def granularity(num_tokens: int) -> int:
    """Nano-batch sizes (and profiled token counts) are multiples of this: 128 (NanoFlow's)
    for dense batches from 1024, finer below so that small batches can split at all."""
    return max(16, min(128, num_tokens // 8 // 16 * 16))


def default_profile_options(num_tokens: int) -> dict:
    """What `schedule="auto"` profiles: token counts in steps of `granularity`; SM shares of a
    quarter (on a GPU; elsewhere a half and all: shares change nothing there); two contexts;
    on a GPU the co-run table at a quarter and half of the dense batch."""
    import jax

    on_gpu = jax.default_backend() == "gpu"
    return {"token_step": granularity(num_tokens),
            "shares": (0.25, 0.5, 0.75, 1.0) if on_gpu else (0.5, 1.0),
            "contexts": (512, 2048) if on_gpu else (512,),
            "corun_tokens": default_corun_tokens(num_tokens) if on_gpu else ()}


def default_corun_tokens(num_tokens: int) -> tuple[int, ...]:
    """Row counts of the co-run table: a quarter and a half of the dense batch (multiples of
    16), the sizes nano-batches of 2 to 4 have."""
    return tuple(sorted({max(16, num_tokens // d // 16 * 16) for d in (4, 2)}))


def load_or_profile(model_config, num_tokens: int, dtype: str, page_size: int = 16,
                    directory: str | None = None, tensor_parallel_size: int = 1,
                    **profile_kwargs) -> Profile:
    """The cached profile of this device, model, dtype, dense batch and tensor-parallel size;
    profiled (and cached) on a miss with `default_profile_options` updated by
    `profile_kwargs`."""
    from nanoflow_jax.pipeline import profile as prof

    path = prof.cache_path(prof.profile_key(model_config, num_tokens, dtype, page_size,
                                            tensor_parallel_size), directory)
    if os.path.isfile(path):
        log.info("autosearch: op profile %s", path)
        return Profile.load(path)
    log.info("autosearch: profiling the ops (once per device, model and dense batch) -> %s",
             path)
    kwargs = {**default_profile_options(num_tokens), **profile_kwargs}
    result = prof.profile_ops(model_config, num_tokens, dtype, page_size=page_size,
                              tensor_parallel_size=tensor_parallel_size,
                              resume_path=path + ".partial", **kwargs)
    result.save(path)
    return result


def auto_schedule(model_config, num_tokens: int, dtype: str = "bfloat16",
                  profile_path: str | None = None, workload: Workload | None = None,
                  options: SearchOptions | None = None,
                  tensor_parallel_size: int | None = None,
                  measure=None) -> SearchResult:
    """`schedule="auto"`: the profile (from `profile_path`, else the cache, else measured
    now), the search, and a log line with the chosen schedule and its predicted time.
    `tensor_parallel_size`: the profile's (None: a given profile's own, else 1). With
    `measure` (`guard.Measure`) a searched schedule is timed beside sequential and kept only
    when it measures `min_gain` faster (`guard.choose`)."""
    options = options or SearchOptions(granularity=granularity(num_tokens))
    from nanoflow_jax.pipeline.profile import model_key

    if profile_path:
        profile = Profile.load(profile_path)
    else:
        profile = load_or_profile(model_config, num_tokens, dtype,
                                  tensor_parallel_size=tensor_parallel_size or 1)
    if tensor_parallel_size not in (None, profile.tensor_parallel_size):
        raise ValueError(f"schedule auto: the profile {profile_path} is of "
                         f"tensor_parallel_size {profile.tensor_parallel_size}, not "
                         f"{tensor_parallel_size}")
    if profile.key["model"] != model_key(model_config):
        raise ValueError(f"schedule auto: the profile {profile_path} is of model shapes "
                         f"{profile.key['model']}, not this model's {model_key(model_config)}")
    if profile.key["num_tokens"] != num_tokens:
        raise ValueError(f"schedule auto: the profile {profile_path} is of a dense batch of "
                         f"{profile.key['num_tokens']} tokens, not {num_tokens}")
    result = search(profile, model_config.num_layers, workload, options)
    from nanoflow_jax.pipeline.profile import cache_dir

    path = os.path.join(cache_dir(), "schedules", f"{result.schedule.name}-T{num_tokens}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(result.to_json())
    log.info("autosearch: chose %s in %.1f s: predicted %.3f ms per step of layers "
             "(sequential %.3f ms); written to %s", result.schedule.name, result.solve_s,
             result.predicted_step_ms, result.sequential_step_ms, path)
    if measure is None or result.schedule.is_sequential:
        return result
    from nanoflow_jax.pipeline import guard

    verdict = guard.choose(result.schedule, result.predicted_step_ms,
                           result.sequential_step_ms, measure, options.min_gain)
    if verdict.kept_searched:
        return result
    return dataclasses.replace(result, schedule=verdict.schedule,
                               period_ms=result.sequential_period_ms, sizes=(num_tokens,),
                               plan=None)
