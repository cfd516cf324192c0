"""The co-run table, the prediction with the overlap penalty, and the measured guard of the
auto-search (pipeline/corun.py, predict.py, guard.py)."""
import dataclasses
import json

import numpy as np
import pytest

from nanoflow_jax.config import EngineConfig, get_preset
from nanoflow_jax.pipeline import autosearch, guard, predict, solver
from nanoflow_jax.pipeline.profile import Profile, profile_ops, synthetic_profile
from nanoflow_jax.pipeline.schedule import sequential
from nanoflow_jax.pipeline.spec import named_schedule

CFG = get_preset("llama-3-8b")
OPTIONS = autosearch.SearchOptions(num_nano=(2,), max_splits=4, keep=1, time_limit_s=30)


def test_corun_table_gives_its_efficiency_and_round_trips():
    prof = synthetic_profile(CFG, 1024, overlap_efficiency=0.4)
    assert prof.corun["shares"] == [0.25, 0.5, 0.75, 1.0]
    for rows in ((128, 896), (300, 700), (1024, 1024), (16, 4000)):
        for share in (0.25, 0.75, 1.0):
            assert prof.overlap_efficiency("up_gate", *rows, share) == pytest.approx(0.4)
    assert Profile.from_json(prof.to_json()) == prof
    plain = synthetic_profile(CFG, 1024)
    assert Profile.from_json(plain.to_json()) == plain and plain.corun is None
    assert plain.overlap_efficiency("qkv", 512, 512, 0.5) == 1.0
    # A profile written before the table existed loads without it.
    old = json.loads(plain.to_json())
    del old["corun"]
    assert Profile.from_json(json.dumps(old)) == plain


def test_corun_efficiency_interpolates_between_row_counts():
    prof = synthetic_profile(CFG, 1024, overlap_efficiency=1.0)
    table = prof.corun
    # The pair at 256 GEMM rows takes the sum of both (efficiency 0), at 512 the max (1).
    i = table["tokens"].index(256)
    for op in table["ms"]:
        for j, n_a in enumerate(table["tokens"]):
            for k, p in enumerate(table["shares"]):
                table["ms"][op][i][j][k] = (prof.gemm_ms(op, 256, p) + prof.decode_ms(
                    n_a, table["context"], 1.0 if p == 1 else 1 - p))
    assert prof.overlap_efficiency("down", 256, 512, 0.5) == pytest.approx(0.0, abs=1e-9)
    assert prof.overlap_efficiency("down", 384, 512, 0.5) == pytest.approx(1.0)
    assert prof.overlap_efficiency("down", 320, 512, 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="co-run share 0.25 needs"):
        dataclasses.replace(prof, shares=(0.25, 1.0), gemm={
            op: [row[::3] for row in t] for op, t in prof.gemm.items()},
            decode_attn=[[r[::3] for r in c] for c in prof.decode_attn])


class _Flat:
    """A profile stand-in with one overlap efficiency for every pair."""

    def __init__(self, eff):
        self.eff = eff

    def overlap_efficiency(self, *args):
        return self.eff


def test_plan_period_charges_each_overlap_by_its_efficiency():
    # A GEMM of 1.2 ms and an attention of 1.0 ms inside it: the solver's period is 1.2 ms.
    plan = solver.Plan(1.2, (solver.Timed("qkv0", "compute", 0.0, 1.2, 0.5),
                             solver.Timed("attn1", "memory", 0.1, 1.1, 0.5)), True, 0.0)
    rows = {"qkv0": ("qkv", 0, 512), "attn1": ("attn", 512, 1024)}
    assert predict.plan_period(_Flat(1.0), plan, rows) == pytest.approx(1.2)
    assert predict.plan_period(_Flat(0.0), plan, rows) == pytest.approx(2.2)
    assert predict.plan_period(_Flat(0.25), plan, rows) == pytest.approx(1.95)


@pytest.mark.parametrize("eff", [1.0, 0.0])
def test_search_with_the_corun_table(eff):
    """Efficiency 1 is the solver's own assumption: the same schedule and period as without a
    table. Efficiency 0 makes every overlap worthless: the search returns sequential."""
    base = autosearch.search(synthetic_profile(CFG, 1024), CFG.num_layers, options=OPTIONS)
    result = autosearch.search(synthetic_profile(CFG, 1024, overlap_efficiency=eff),
                               CFG.num_layers, options=OPTIONS)
    assert not base.schedule.is_sequential
    if eff == 1.0:
        assert result.schedule == base.schedule
        assert result.period_ms == pytest.approx(base.period_ms) == pytest.approx(
            result.plan.period)
    else:
        assert result.schedule.is_sequential and result.plan is None
        assert all(c[3] is None or c[3] >= result.sequential_period_ms
                   for c in result.candidates)


def test_schedule_replay_predicts_serial_and_overlapped_schedules():
    workload = autosearch.Workload.default(1024)
    one, none = (synthetic_profile(CFG, 1024, overlap_efficiency=e) for e in (1.0, 0.0))
    seq = predict.schedule_ms(one, sequential(1024), workload, 4)
    assert seq == pytest.approx(4 * autosearch.sequential_period(one, 1024, workload))
    # One stream: every op one after the other, whatever the efficiency.
    serial = named_schedule("nano2-pipe-nostreams", 1024)
    halves = sum(one.gemm_ms(op, 512) for op in ("qkv", "o_proj", "up_gate", "down")) * 2 + sum(
        predict.attention_ms(one, workload, s, s + 512, 1.0) for s in (0, 512))
    assert predict.schedule_ms(one, serial, workload, 4) == pytest.approx(4 * halves)
    assert predict.schedule_ms(none, serial, workload, 4) == pytest.approx(4 * halves)
    # Two streams: overlap pays at efficiency 1, and costs the sum of both at 0.
    overlapped = named_schedule("nano2-pipe", 1024)
    assert predict.schedule_ms(one, overlapped, workload, 4) < 0.9 * 4 * halves
    assert predict.schedule_ms(none, overlapped, workload, 4) >= 4 * halves - 1e-9


def _calibrated(profile, workload, gemm_fraction):
    """`profile` with a layer calibration in which the GEMMs take `gemm_fraction` of their
    solo time inside each token count's sequential layer."""
    nds = [round(workload.num_decode * n / 1024) for n in profile.tokens]
    ms = [gemm_fraction * sum(profile.gemm_ms(op, n) for op in profile.gemm)
          + predict.attention_ms(profile, autosearch.Workload(nd, workload.decode_context),
                                 0, n, 1.0) for n, nd in zip(profile.tokens, nds)]
    return dataclasses.replace(profile, layer={"ms": ms, "num_decode": nds,
                                               "context": workload.decode_context})


def test_layer_calibration_scales_the_share_one_gemms_to_the_measured_layer():
    workload = autosearch.Workload.default(1024)
    plain = synthetic_profile(CFG, 1024)
    prof = _calibrated(plain, workload, 0.8)
    assert prof.gemm_scale(1024) == pytest.approx(0.8) == prof.gemm_scale(300)
    assert prof.gemm_ms("down", 1024) == pytest.approx(0.8 * plain.gemm_ms("down", 1024))
    assert prof.gemm_ms("down", 1024, 0.5) == plain.gemm_ms("down", 1024, 0.5)  # persistent
    assert prof.gemm_ms("qkv", 512, calibrated=False) == plain.gemm_ms("qkv", 512)
    # the sequential layer predicts what it measured
    seq = predict.schedule_ms(prof, sequential(1024), workload, 1)
    assert seq == pytest.approx(prof.layer["ms"][-1])
    assert Profile.from_json(prof.to_json()) == prof
    assert plain.gemm_scale(1024) == 1.0
    with pytest.raises(ValueError, match="calibration"):
        dataclasses.replace(prof, layer={**prof.layer, "ms": prof.layer["ms"][:-1]})


def _result(searched_ms, seq_ms=10.0):
    """A fake timer: the searched schedule's and sequential's ms, and what it was asked."""
    asked = []

    def measure(schedule):
        asked.append(schedule.name)
        return seq_ms if schedule.is_sequential else searched_ms

    return measure, asked


def test_guard_keeps_sequential_when_the_searched_schedule_measures_slower():
    searched = named_schedule("nano2-pipe", 1024)
    measure, asked = _result(searched_ms=10.5)
    verdict = guard.choose(searched, 8.0, 10.0, measure, min_gain=0.02)
    assert verdict.schedule.is_sequential and not verdict.kept_searched
    assert sorted(asked) == ["nano2-pipe", "sequential"]
    # Faster, but by less than min_gain: still sequential; by more: the searched one.
    assert guard.choose(searched, 8.0, 10.0, _result(9.9)[0], 0.02).schedule.is_sequential
    assert guard.choose(searched, 8.0, 10.0, _result(9.0)[0], 0.02).schedule == searched


def test_auto_schedule_runs_the_guard(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NANOFLOW_JAX_CACHE", str(tmp_path))
    path = tmp_path / "p.json"
    synthetic_profile(CFG, 1024).save(str(path))
    kw = {"profile_path": str(path), "options": OPTIONS}
    searched = autosearch.auto_schedule(CFG, 1024, **kw)
    assert not searched.schedule.is_sequential
    measure, asked = _result(searched_ms=12.0)
    with caplog.at_level("INFO", logger="nanoflow_jax"):
        guarded = autosearch.auto_schedule(CFG, 1024, measure=measure, **kw)
    assert guarded.schedule.is_sequential and guarded.plan is None and len(asked) == 2
    assert "autosearch guard: keeps sequential" in caplog.text
    assert "measured 12.000 ms" in caplog.text
    kept = autosearch.auto_schedule(CFG, 1024, measure=_result(searched_ms=5.0)[0], **kw)
    assert kept.schedule == searched.schedule


def test_engine_guard_knob():
    with pytest.raises(ValueError, match="schedule_guard must be"):
        EngineConfig(schedule_guard="yes")
    config = EngineConfig(schedule="auto", max_num_batched_tokens=64).for_backend("cpu")
    assert guard.engine_timer(config, {"layers": []}, get_preset("tiny-llama")) is None  # CPU
    on = dataclasses.replace(config, schedule_guard="on")
    assert callable(guard.engine_timer(on, {"layers": []}, get_preset("tiny-llama")))
    fixed = dataclasses.replace(on, schedule="nano2")
    assert guard.engine_timer(fixed, {"layers": []}, get_preset("tiny-llama")) is None


def test_engine_hands_its_timer_to_the_search(monkeypatch):
    """`schedule_guard="on"`: the model runner passes a timer over its own weights to
    `named_schedule` (which `test_auto_schedule_runs_the_guard` follows from there)."""
    from nanoflow_jax.engine import model_runner

    timers, calls = [], []

    def fake_timer(layer_params, model_config, workload, num_tokens, *args):
        timers.append((len(layer_params), num_tokens))
        return "the timer"

    class Stop(Exception):
        pass

    def fake_named_schedule(name, num_tokens, **kw):
        calls.append((name, kw["measure"]))
        raise Stop

    monkeypatch.setattr(guard, "layer_timer", fake_timer)
    monkeypatch.setattr(model_runner, "named_schedule", fake_named_schedule)
    with pytest.raises(Stop):
        model_runner.ModelRunner(EngineConfig(schedule="auto", schedule_guard="on",
                                              max_num_batched_tokens=64, num_pages=64))
    assert calls == [("auto", "the timer")]
    assert timers == [(get_preset("tiny-llama").num_layers, 64)]


def test_profiler_times_pairs_as_programs_of_several(monkeypatch):
    """The co-run table: one entry per (op, GEMM rows, attention rows, share), each the time of
    one instance of a program of `layers` pairs."""
    from nanoflow_jax.pipeline import profile as prof_mod

    programs = []

    def fake_time(fn, *args, calls, repeats):
        if len(args) == 6:  # a pair: weights, GEMM inputs, attention inputs, cache, pos, meta
            programs.append(len(fn(*args)))
            return 9.0
        return 6.0

    monkeypatch.setattr(prof_mod, "_device_ms_per_call", lambda: fake_time)
    prof = profile_ops(get_preset("tiny-llama"), 32, "float32", token_step=32, shares=(1.0,),
                       contexts=(8,), page_size=4, layers=3, progress=False,
                       corun_tokens=(32,))
    assert prof.corun["shares"] == [1.0] and prof.corun["context"] == 8
    assert np.shape(prof.corun["ms"]["qkv"]) == (1, 1, 1)
    assert all(ms == 3.0 for ms in np.ravel([prof.corun["ms"][o] for o in prof.corun["ms"]]))
    assert programs == [3] * 4
    # Solo 2 ms each, the pair 3 ms: half of the shorter op is hidden.
    assert prof.overlap_efficiency("o_proj", 32, 32) == pytest.approx(0.5)
    assert Profile.from_json(prof.to_json()) == prof
