"""The auto-search: the MILP on problems with known optima, the replay checker, the profile
format and the profiler on the CPU, and a searched schedule run through the executor."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.config import get_preset
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline import autosearch, replay, solver
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.profile import (Profile, cache_path, profile_ops, synthetic_profile,
                                           token_counts)
from nanoflow_jax.pipeline.solver import Edge, Op, Problem
from nanoflow_jax.pipeline.spec import named_schedule
from tests.helpers import rel_err
from tests.test_pipeline import T, _as_calls, _batch, _forward, _prefill_context, PAGE

# A compute-bound op slowed by losing SMs, a memory-bound one that keeps its speed on half.
GEMM = Op("gemm", "compute", ((0.5, 1.2), (1.0, 1.0)))
ATTN = Op("attn", "memory", ((0.5, 1.0), (1.0, 1.0)))


def test_two_independent_ops_run_side_by_side_on_half_the_sms_each():
    problem = Problem((GEMM, ATTN), ())
    plan = solver.solve(problem, time_limit=10)
    replay.check(problem, plan)
    # Side by side at 0.5 + 0.5 the period is the GEMM's 1.2 ms; one after the other, 2 ms.
    assert plan.period == pytest.approx(1.2, abs=1e-6)
    assert {t.share for t in plan.ops} == {0.5}
    gemm, attn = plan.op("gemm"), plan.op("attn")
    assert gemm.start < attn.end and attn.start < gemm.end  # they overlap


def test_a_chain_cannot_overlap_and_gets_all_sms():
    # gemm -> attn in a layer, attn -> the next layer's gemm: nothing can run beside anything.
    problem = Problem((GEMM, ATTN), (Edge("gemm", "attn"), Edge("attn", "gemm", 1)))
    plan = solver.solve(problem, time_limit=10)
    replay.check(problem, plan)
    assert plan.period == pytest.approx(2.0, abs=1e-6)
    assert {t.share for t in plan.ops} == {1.0}  # overlapping nothing, each takes every SM
    assert plan.op("attn").start >= plan.op("gemm").end - 1e-9


def test_overlap_across_the_layer_boundary():
    """a -> b within a layer: they cannot overlap there, but b of layer l can run beside a of
    layer l + 1 (a software pipeline over the unrolled layers)."""
    a = Op("a", "compute", ((0.5, 1.2), (1.0, 1.0)))
    b = Op("b", "memory", ((0.5, 1.0), (1.0, 0.9)))
    problem = Problem((a, b), (Edge("a", "b"),))
    plan = solver.solve(problem, time_limit=10)
    replay.check(problem, plan)
    assert plan.period == pytest.approx(1.2, abs=1e-6)  # one after the other: 1.0 + 0.9
    ta, tb = plan.op("a"), plan.op("b")
    assert tb.start >= ta.end - 1e-9 and {ta.share, tb.share} == {0.5}
    shifted = [(tb.start + k * plan.period, tb.end + k * plan.period) for k in (-1, 1)]
    assert any(s < ta.end and ta.start < e for s, e in shifted)


def test_an_immediate_edge_starts_the_successor_at_once():
    a = Op("a", "compute", ((1.0, 1.0),))
    b = Op("b", "compute", ((1.0, 0.5),))
    c = Op("c", "memory", ((1.0, 3.0),))
    problem = Problem((a, b, c), (Edge("a", "b", immediate=True), Edge("b", "a", 1)))
    plan = solver.solve(problem, time_limit=10)
    replay.check(problem, plan)
    assert plan.op("b").start == pytest.approx(plan.op("a").end, abs=1e-6)
    assert plan.period == pytest.approx(4.5, abs=1e-6)  # c (all SMs) cannot overlap a or b


def _plan(ops, period):
    return solver.Plan(period, tuple(solver.Timed(*o) for o in ops), True, 0.0)


def test_replay_rejects_broken_plans():
    problem = Problem((GEMM, ATTN), (Edge("gemm", "attn"),))
    good = _plan([("gemm", "compute", 0.0, 1.0, 1.0), ("attn", "memory", 1.0, 2.0, 1.0)], 2.0)
    replay.check(problem, good)
    over = _plan([("gemm", "compute", 0.0, 1.0, 1.0), ("attn", "memory", 0.5, 1.5, 0.5)], 2.0)
    with pytest.raises(ValueError, match="use 1.500 of the SMs"):
        replay.check(Problem((GEMM, ATTN), ()), over)
    early = _plan([("gemm", "compute", 1.0, 2.0, 1.0), ("attn", "memory", 0.0, 1.0, 1.0)], 2.0)
    with pytest.raises(ValueError, match="dependency gemm -> attn"):
        replay.check(problem, early)
    # The next layer's gemm (period 0.9) would start while this one still runs.
    self_overlap = _plan([("gemm", "compute", 0.0, 1.0, 1.0),
                          ("attn", "memory", 1.0, 2.0, 1.0)], 0.9)
    assert any("overlap in category compute" in v
               for v in replay.violations(problem, self_overlap))
    wrong_time = _plan([("gemm", "compute", 0.0, 1.0, 0.5), ("attn", "memory", 1.0, 2.0, 1.0)],
                       2.0)
    with pytest.raises(ValueError, match="profiled 1.2000 ms"):
        replay.check(problem, wrong_time)


def test_synthetic_profile_lookups_and_json():
    cfg = get_preset("llama-3-8b")
    prof = synthetic_profile(cfg, 1024)
    assert prof.tokens == token_counts(1024, 128) == tuple(range(128, 1025, 128))
    assert Profile.from_json(prof.to_json()) == prof
    # Between profiled counts: linear; below the first, a GEMM costs the first's time.
    mid = prof.gemm_ms("up_gate", 192)
    assert mid == pytest.approx((prof.gemm_ms("up_gate", 128) + prof.gemm_ms("up_gate", 256)) / 2)
    assert prof.gemm_ms("qkv", 16) == prof.gemm_ms("qkv", 128)
    # A compute-bound GEMM on half the SMs takes twice as long; attention keeps 70 %.
    assert prof.gemm_ms("down", 1024, 0.5) > 1.9 * prof.gemm_ms("down", 1024, 1.0)
    ratio = prof.decode_ms(512, 2048, 0.5) / prof.decode_ms(512, 2048, 1.0)
    assert 1.3 < ratio < 1.5
    # Linear in the context between and beyond the profiled ones; nothing for no rows.
    assert prof.decode_ms(256, 1024) == pytest.approx(
        (2 * prof.decode_ms(256, 512) + prof.decode_ms(256, 2048)) / 3)
    assert prof.decode_ms(0, 1024) == 0.0
    with pytest.raises(ValueError, match="not profiled"):
        prof.gemm_ms("qkv", 128, 0.3)


@pytest.mark.parametrize("num_tokens", [1024, 2048])
def test_search_on_llama3_8b_shapes_beats_sequential_and_replays(num_tokens):
    cfg = get_preset("llama-3-8b")
    prof = synthetic_profile(cfg, num_tokens)
    options = autosearch.SearchOptions(num_nano=(2,), max_splits=4, keep=1, time_limit_s=30)
    result = autosearch.search(prof, cfg.num_layers, options=options)
    assert not result.schedule.is_sequential
    assert result.period_ms < 0.98 * result.sequential_period_ms
    problem, _ = autosearch.build_problem(prof, result.sizes, autosearch.Workload.default(
        num_tokens))
    assert replay.violations(problem, result.plan) == []
    # The JSON is a schedule the engine loads, with the prediction beside it.
    d = json.loads(result.to_json())
    assert d["prediction"]["step_ms"] == pytest.approx(cfg.num_layers * result.period_ms)
    assert sum(d["prediction"]["sizes"]) == num_tokens


def test_search_returns_sequential_when_overlap_does_not_pay():
    cfg = get_preset("llama-3-8b")
    prof = synthetic_profile(cfg, 1024)
    # Attention no faster on few SMs than GEMMs: splitting only costs.
    flat = dataclasses.replace(prof, decode_attn=[[[ms / s for ms, s in zip(row, prof.shares)]
                                                   for row in ctx] for ctx in prof.decode_attn])
    options = autosearch.SearchOptions(num_nano=(2,), max_splits=3, keep=1, time_limit_s=20)
    result = autosearch.search(flat, cfg.num_layers, options=options)
    assert result.schedule.is_sequential and result.plan is None
    assert result.candidates and all(c[2] is None or c[2] > 0.98 * result.sequential_period_ms
                                     for c in result.candidates)


def _tiny_profile(num_tokens=T):
    """tiny-llama shapes on a slow synthetic device, so that its ops cost what an 8B model's do
    on an H200 and overlap pays."""
    return synthetic_profile(get_preset("tiny-llama"), num_tokens, "float32", token_step=16,
                             peak_tflops=1e-3, hbm_tbps=5e-4)


def test_searched_schedule_gives_the_sequential_logits():
    model = nf.load_model("tiny-llama", dtype="float32", seed=7)
    options = autosearch.SearchOptions(num_nano=(2, 3), granularity=16, max_splits=3, keep=1,
                                       time_limit_s=30)
    result = autosearch.search(_tiny_profile(), model.config.num_layers,
                               autosearch.Workload(16, 512), options)
    schedule = result.schedule
    assert not schedule.is_sequential and schedule.num_tokens == T
    assert any(o.sm_share < 1 for o in schedule.ops) and schedule.windows == 1
    rng = np.random.default_rng()
    attention = attention_fn("reference")
    for kind in ("mixed",):
        batch = jax.device_put(_batch(kind, rng, model.config.vocab_size))
        kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
        want, want_kv = _forward(model.params, model.config, kv, batch, attention,
                                 llama.run_layers)
        got, got_kv = _forward(model.params, model.config, kv, batch, attention,
                               make_layers_fn(schedule, use_streams=True, wrap_call=_as_calls))
        rows = np.asarray(batch.attn.slots) >= 0
        assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5
        for (gk, gv), (wk, wv) in zip(got_kv, want_kv):
            assert rel_err(gk, wk) < 1e-6 and rel_err(gv, wv) < 1e-6


def test_profiler_on_cpu_with_tiny_llama(tmp_path):
    cfg = get_preset("tiny-llama")
    prof = profile_ops(cfg, 64, "float32", token_step=32, shares=(0.5, 1.0), contexts=(8, 40),
                       page_size=4, calls=2, repeats=2, progress=False)
    assert prof.tokens == (32, 64) and prof.key["num_tokens"] == 64
    assert prof.key["model"]["hidden_size"] == cfg.hidden_size and prof.key["jax"]
    tables = [prof.gemm[o] for o in prof.gemm] + [prof.decode_attn, prof.prefill_attn,
                                                  prof.kv_write]
    assert all(ms > 0 for ms in np.concatenate([np.ravel(t) for t in tables]))
    assert prof.layer["num_decode"] == [9, 18] and all(ms > 0 for ms in prof.layer["ms"])
    path = cache_path(prof.key, str(tmp_path))
    prof.save(path)
    assert Profile.load(path) == prof
    result = autosearch.search(prof, cfg.num_layers, autosearch.Workload(8, 16),
                               autosearch.SearchOptions(num_nano=(2,), granularity=32,
                                                        time_limit_s=10))
    assert result.schedule.num_tokens == 64  # whichever wins, a valid schedule


def test_profiler_times_one_instance_of_a_program_of_several(monkeypatch):
    """Each op is timed as `layers` instances in one program: an entry is the program's time
    over the instances, and every program holds that many (one output per instance)."""
    from nanoflow_jax.pipeline import profile as prof_mod

    outputs = []

    def fake_time(fn, *args, calls, repeats):
        outputs.append(len(fn(*args)) if args else 3)  # the KV write returns one scalar
        return 6.0

    monkeypatch.setattr(prof_mod, "_device_ms_per_call", lambda: fake_time)
    prof = profile_ops(get_preset("tiny-llama"), 32, "float32", token_step=32, shares=(1.0,),
                       contexts=(8,), page_size=4, layers=3, progress=False)
    tables = [prof.gemm[o] for o in prof.gemm] + [prof.decode_attn, prof.prefill_attn,
                                                  prof.kv_write]
    assert all(ms == 2.0 for ms in np.concatenate([np.ravel(t) for t in tables]))
    assert outputs and all(n == 3 for n in outputs)


def test_engine_auto_searches_from_the_cached_profile(tmp_path, monkeypatch, caplog):
    """`schedule="auto"`: the profile is measured once and cached; `auto:PROFILE.json` searches
    from a given profile; both generate the sequential schedule's tokens."""
    monkeypatch.setenv("NANOFLOW_JAX_CACHE", str(tmp_path))
    light = {"token_step": 32, "shares": (0.5, 1.0), "contexts": (64,), "calls": 1,
             "repeats": 1}  # a quick profile: its values only steer the search
    monkeypatch.setattr(autosearch, "default_profile_options", lambda num_tokens: light)
    prompts = [{"prompt_token_ids": list(range(i, i + 9 + 5 * i))} for i in range(5)]
    params = nf.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", max_num_batched_tokens=T, min_bucket=T, max_model_len=128,
              page_size=4, num_pages=300)
    profile_file = tmp_path / "tiny.json"
    _tiny_profile().save(str(profile_file))
    outs = {}
    for name in ("sequential", "auto", f"auto:{profile_file}"):
        with caplog.at_level("INFO", logger="nanoflow_jax"):
            llm = nf.LLM("tiny-llama", schedule=name, **kw)
        if name.startswith("auto:"):
            assert not llm.engine.runner.schedule.is_sequential
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                    use_tqdm=False)]
    assert outs["auto"] == outs["sequential"] == outs[f"auto:{profile_file}"]
    assert "autosearch: chose" in caplog.text and "profiling the ops" in caplog.text
    cached = os.listdir(tmp_path / "profiles")
    assert len(cached) == 1
    stamp = os.path.getmtime(tmp_path / "profiles" / cached[0])
    caplog.clear()
    with caplog.at_level("INFO", logger="nanoflow_jax"):  # the engine's call, again
        named_schedule("auto", T, model_config=get_preset("tiny-llama"), dtype="float32")
    assert "profiling the ops" not in caplog.text and "op profile" in caplog.text
    assert os.path.getmtime(tmp_path / "profiles" / cached[0]) == stamp


def test_named_schedule_auto_needs_the_model():
    with pytest.raises(ValueError, match="needs the model's config"):
        named_schedule("auto", 64)


def _tp_problem():
    """Two nano-batches of o -> ar -> u (GEMM, its all-reduce, the GEMM that reads it), u -> o
    of the next layer: one after the other 2·(1 + 0.8 + 1) = 5.6 ms, with each all-reduce
    under the other nano-batch's GEMM 4 ms (the GEMMs back to back)."""
    def gemm(name):
        return Op(name, "compute", ((0.5, 2.0), (1.0, 1.0)))

    ops = [gemm("o0"), Op("ar0", solver.NETWORK, ((1.0, 0.8),)), gemm("u0"),
           gemm("o1"), Op("ar1", solver.NETWORK, ((1.0, 0.8),)), gemm("u1")]
    edges = [Edge(f"{a}{i}", f"{b}{i}") for i in (0, 1) for a, b in (("o", "ar"), ("ar", "u"))]
    edges += [Edge("u0", "o0", 1), Edge("u1", "o1", 1), Edge("o0", "o1"), Edge("u0", "u1")]
    return Problem(tuple(ops), tuple(edges))


def test_solver_places_a_collective_beside_a_gemm():
    problem = _tp_problem()
    plan = solver.solve(problem, time_limit=10)
    replay.check(problem, plan)
    assert plan.period == pytest.approx(4.0, abs=1e-6)
    # ar0 runs under o1 and ar1 under u0 (at any layer shift); the GEMMs keep every SM.
    p = plan.period

    def beside(a, b):
        a, b = plan.op(a), plan.op(b)
        return any(a.start < b.end + k * p and b.start + k * p < a.end for k in (-1, 0, 1))

    assert beside("ar0", "o1") and beside("ar1", "u0")
    assert {t.share for t in plan.ops} == {1.0}
    with pytest.raises(ValueError, match="network op ar holds no SM share"):
        Problem((Op("ar", solver.NETWORK, ((0.5, 1.0), (1.0, 0.8))),), ())


def test_replay_rejects_a_collective_before_its_producer():
    problem = _tp_problem()
    good = solver.solve(problem, time_limit=10)
    assert replay.violations(problem, good) == []
    timed = {t.name: t for t in good.ops}
    # The all-reduce moved to start before its GEMM ends.
    o0 = timed["o0"]
    early = dataclasses.replace(timed["ar0"], start=o0.start, end=o0.start + 0.8)
    plan = dataclasses.replace(good, ops=tuple(early if t.name == "ar0" else t
                                               for t in good.ops))
    with pytest.raises(ValueError, match="dependency o0 -> ar0"):
        replay.check(problem, plan)
    # Two all-reduces at once share the network: rejected; beside GEMMs they take no SMs.
    both = dataclasses.replace(good, ops=tuple(
        dataclasses.replace(t, start=timed["ar0"].start, end=timed["ar0"].end)
        if t.name == "ar1" else t for t in good.ops))
    assert any("overlap in category network" in v for v in replay.violations(problem, both))
    assert not any("of the SMs" in v for v in replay.violations(problem, good))


def test_search_on_a_tensor_parallel_profile_places_the_all_reduces():
    """LLaMA-3-70B shapes at TP 8 (synthetic): the searched schedule has the collective ops
    at solved places, beats sequential and replays; the profile round-trips as JSON."""
    cfg = get_preset("llama-3-70b")
    prof = synthetic_profile(cfg, 1024, tensor_parallel_size=8)
    assert Profile.from_json(prof.to_json()) == prof and prof.tensor_parallel_size == 8
    assert prof.key["model"] == synthetic_profile(cfg, 1024).key["model"]  # the whole model's
    assert prof.all_reduce_ms(64) == prof.all_reduce_ms(128) < prof.all_reduce_ms(1024)
    assert prof.gemm_ms("up_gate", 1024) < synthetic_profile(cfg, 1024).gemm_ms("up_gate", 1024)
    options = autosearch.SearchOptions(num_nano=(2,), max_splits=4, keep=1, time_limit_s=30)
    result = autosearch.search(prof, cfg.num_layers, options=options)
    schedule = result.schedule
    assert schedule.has_collectives and not schedule.is_sequential
    assert result.period_ms < 0.9 * result.sequential_period_ms
    problem, _ = autosearch.build_problem(prof, result.sizes, autosearch.Workload.default(1024))
    assert replay.violations(problem, result.plan) == []
    assert {t.category for t in result.plan.ops} == {"compute", "memory", solver.NETWORK}
    # Some all-reduce is not issued right before the op that reads it: the solver moved it.
    kinds = [o.op for o in schedule.ops]
    assert any(kinds[i + 1] not in ("qkv", "up_gate") for i, k in enumerate(kinds)
               if k.startswith("ar_"))
    with pytest.raises(ValueError, match="has no all-reduce times"):
        synthetic_profile(cfg, 1024).all_reduce_ms(64)


def test_profile_resumes_from_the_points_of_a_run_cut_short(tmp_path, monkeypatch):
    # A run stopped after a few points (a command's time limit) leaves them in the partial
    # file; the next run measures only the rest and keeps the saved ones.
    from nanoflow_jax.pipeline import profile as prof

    cfg, partial = get_preset("tiny-llama"), str(tmp_path / "p.json.partial")
    kwargs = {"token_step": 32, "shares": (1.0,), "contexts": (8,), "calls": 1, "repeats": 1,
              "progress": False, "resume_path": partial}
    timed = []

    def fake_time(fn, *args, calls, repeats):
        timed.append(fn)
        if len(timed) == 3:
            raise KeyboardInterrupt  # cut short while measuring the third point
        return 10.0 * len(timed)

    monkeypatch.setattr(prof, "_device_ms_per_call", lambda: fake_time)
    with pytest.raises(KeyboardInterrupt):
        prof.profile_ops(cfg, 64, "float32", **kwargs)
    with open(partial) as f:
        saved = json.load(f)["ms"]
    n0 = prof.token_counts(64, 32)[0]
    first, second = f"qkv {n0} tokens, share 1", f"o_proj {n0} tokens, share 1"
    assert set(saved) == {first, second}

    timed.clear()
    monkeypatch.setattr(prof, "_device_ms_per_call",
                        lambda: lambda fn, *args, calls, repeats: timed.append(fn) or 1.0)
    result = prof.profile_ops(cfg, 64, "float32", **kwargs)
    # GEMMs, decode, prefill, KV write, the calibration's layer
    points = len(result.tokens) * (len(prof.GEMM_OPS) + 4)
    assert len(timed) == points - 2  # only the points not measured before
    assert result.gemm["qkv"][0][0] == saved[first] != result.gemm["up_gate"][0][0]
    assert result.gemm["o_proj"][0][0] == saved[second]
    assert not os.path.exists(partial)  # the profile is whole


def test_profile_points_from_another_profile_are_not_reused(tmp_path):
    from nanoflow_jax.pipeline.profile import Points

    path = str(tmp_path / "p.partial")
    Points(path, {"model": "a"}).get("qkv", lambda: 3.0)
    assert Points(path, {"model": "a"}).ms == {"qkv": 3.0}
    assert Points(path, {"model": "b"}).ms == {}
