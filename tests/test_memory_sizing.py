"""Device memory: the budget, the KV cache sized from the compiled programs' workspace, the
one-line error when a configuration cannot fit, and max_num_seqs=None from the KV capacity.

The CPU reports no memory pool, so these tests give it one: `memory_stats` (the seam the
engine reads) returns a pool of `fraction` × a made-up device, and as bytes in use the live
arrays, as a GPU would. The programs' workspace is the CPU compiler's real memory analysis.
"""
import gc
import logging

import jax
import pytest

from nanoflow_jax import device_memory
from nanoflow_jax.batch import build_batch
from nanoflow_jax.config import EngineConfig, get_preset
from nanoflow_jax.device_memory import GiB, SAFETY_MARGIN_BYTES, DeviceMemory
from nanoflow_jax.engine import model_runner
from nanoflow_jax.engine.llm_engine import LLMEngine
from nanoflow_jax.engine.model_runner import ModelRunner
from nanoflow_jax.engine.sampler import SampleMode, sampling_tensors
from nanoflow_jax.sampling_params import SamplingParams

TINY = dict(model="tiny-llama", dtype="float32", max_num_batched_tokens=32, min_bucket=16,
            page_size=16, max_model_len=128, max_prefill_seqs=4)  # two buckets: 16, 32
SMALL = dict(TINY, max_num_batched_tokens=16, max_model_len=64)  # one bucket
WEIGHT_BYTES = get_preset("tiny-llama").param_count * 4  # float32


def _live_bytes() -> int:
    """Bytes on the first device, as the fake device reports (an array sharded over several
    devices counts its shard)."""
    return sum(device_memory.bytes_per_device(a) for a in jax.live_arrays())


def _install_device(monkeypatch, total: int, xla_fraction: float = 0.9) -> None:
    jax.devices()  # the backend is up: the engine leaves the environment alone
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", repr(xla_fraction))
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    pool = int(total * xla_fraction)
    monkeypatch.setattr(device_memory, "memory_stats", lambda d: {
        "bytes_limit": pool, "bytes_in_use": _live_bytes()})
    gc.collect()  # arrays of earlier tests must not be freed half-way through a sizing


@pytest.fixture
def device(monkeypatch):
    """`device(total, xla_fraction)`: the first device has `total` bytes, of which XLA's pool
    holds `xla_fraction`; what is in use is what the live arrays hold."""
    return lambda total, xla_fraction=0.9: _install_device(monkeypatch, total, xla_fraction)


def _record_compiles(monkeypatch) -> list[tuple]:
    """Every XLA compile from now on, as ("step", T, KV pages) or ("sampler", rows)."""
    seen, compile_lowered = [], model_runner.compile_lowered

    def record(lowered):
        args, _ = lowered.args_info
        if len(args) == 4:  # the model step: (params, kv, batch, prev_tokens)
            seen.append(("step", args[2].token_ids.shape[0], args[1][0][0].shape[1]))
        else:  # a sampler: (head, hidden, sampling)
            seen.append(("sampler", args[2].temperature.shape[0]))
        return compile_lowered(lowered)

    monkeypatch.setattr(model_runner, "compile_lowered", record)
    return seen


TINY_COMPILES = []  # what building tiny_runner compiled


@pytest.fixture(scope="module")
def tiny_runner():
    """TINY sized from 60 % of a 1 GiB device."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _install_device(monkeypatch, GiB)
        seen = _record_compiles(monkeypatch)
        runner = ModelRunner(EngineConfig(**TINY, gpu_memory_utilization=0.6))
        TINY_COMPILES[:] = seen
        yield runner


def _in_use_at_sizing(num_rows: int) -> int:
    """What the engine will see in use when it sizes the cache: what lives now, its weights
    and its prev_tokens."""
    gc.collect()
    return _live_bytes() + WEIGHT_BYTES + 4 * num_rows


# ---- pure pieces ----------------------------------------------------------------------------

def test_pages_that_fit_is_whole_pages_of_what_is_left():
    assert device_memory.pages_that_fit(1000, 100, 200, 50, 150, 100) == 5
    assert device_memory.pages_that_fit(1099, 100, 200, 50, 150, 100) == 5
    assert device_memory.pages_that_fit(1100, 100, 200, 50, 150, 100) == 6
    assert device_memory.pages_that_fit(400, 100, 200, 50, 150, 100) == 0  # nothing left


def test_engine_config_checks_the_memory_knobs():
    assert EngineConfig().max_num_seqs is None  # the KV cache's capacity
    for bad, knob in ((dict(max_num_seqs=0), "max_num_seqs"),
                      (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
                      (dict(gpu_memory_utilization=1.01), "gpu_memory_utilization"),
                      (dict(num_pages=0), "num_pages")):
        with pytest.raises(ValueError, match=knob):
            EngineConfig(**bad)


def test_total_is_the_pool_over_the_xla_fraction(monkeypatch):
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setattr(device_memory, "memory_stats", lambda d: {
        "bytes_limit": 75 * GiB, "bytes_in_use": 3, "largest_free_block_bytes": 70 * GiB})
    assert device_memory.device_memory() == DeviceMemory(100 * GiB, 75 * GiB, 3, 70 * GiB)
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.5")
    assert device_memory.device_memory().total == 150 * GiB
    monkeypatch.setattr(device_memory, "memory_stats", lambda d: None)  # the CPU
    assert device_memory.device_memory() is None


def test_budget_is_the_fraction_of_the_device_capped_at_the_pool(caplog):
    mem = DeviceMemory(total=100 * GiB, pool=75 * GiB, in_use=0)
    with caplog.at_level(logging.WARNING, logger="nanoflow_jax"):
        assert device_memory.memory_budget(0.5, mem) == 50 * GiB
        assert not caplog.records
        assert device_memory.memory_budget(0.9, mem) == 75 * GiB  # XLA's pool is smaller
    (record,) = caplog.records
    assert "\n" not in record.getMessage() and "reserve_device_memory(0.9)" in record.getMessage()
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        device_memory.memory_budget(1.5, mem)


def test_program_memory_reads_the_analysis_and_survives_its_absence():
    class Compiled:
        def __init__(self, analysis):
            self.analysis = analysis

        def memory_analysis(self):
            if isinstance(self.analysis, Exception):
                raise self.analysis
            return self.analysis

    class Stats:  # what XLA gives: the KV cache (600) donated and aliased to an output
        temp_size_in_bytes = 1000
        argument_size_in_bytes = 700  # weights 50 + KV 600 + a batch of 50
        output_size_in_bytes = 620
        alias_size_in_bytes = 600

    p = device_memory.program_memory("step", Compiled(Stats()), resident_bytes=650)
    assert (p.temp, p.outputs, p.arguments, p.known) == (1000, 20, 50, True)
    assert p.workspace == 1070

    class Partial:  # no sizes but the scratch
        temp_size_in_bytes = 64

    assert device_memory.program_memory("p", Compiled(Partial())).workspace == 64
    for missing in (None, NotImplementedError("no analysis on this backend")):
        p = device_memory.program_memory("none", Compiled(missing))
        assert not p.known and p.workspace == 0


@pytest.fixture
def clean_env(monkeypatch):
    for name in device_memory.XLA_FRACTION_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device_memory, "backend_initialized", lambda: False)
    return monkeypatch


def test_reserve_sets_the_xla_fraction_before_the_backend_starts(clean_env):
    import os
    device_memory.reserve_device_memory(0.95)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.95"
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ
    assert device_memory.xla_memory_fraction() == 0.95
    clean_env.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    clean_env.setenv("XLA_CLIENT_MEM_FRACTION", "0.5")  # the name already in use is kept
    device_memory.reserve_device_memory(0.8)
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.8"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    clean_env.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")  # both: JAX would not start
    device_memory.reserve_device_memory(0.6)
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.6"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    for bad in (0, 1.2, -0.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            device_memory.reserve_device_memory(bad)


def test_reserve_after_the_backend_started_checks_the_pool(monkeypatch):
    monkeypatch.setattr(device_memory, "backend_initialized", lambda: True)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setattr(device_memory, "memory_stats", lambda d: {
        "bytes_limit": 75 * GiB, "bytes_in_use": 0})
    device_memory.reserve_device_memory(0.7)  # the pool holds it: nothing to do
    with pytest.raises(RuntimeError) as err:
        device_memory.reserve_device_memory(0.9)
    assert "\n" not in str(err.value) and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in str(err.value)
    monkeypatch.setattr(device_memory, "memory_stats", lambda d: None)  # the CPU: no pool
    device_memory.reserve_device_memory(0.9)


# ---- the engine -----------------------------------------------------------------------------

def test_kv_cache_gets_what_the_budget_leaves_after_the_largest_workspace(tiny_runner):
    runner = tiny_runner
    plan = runner.memory_plan
    assert plan.total == pytest.approx(GiB, abs=2)
    assert plan.budget == int(0.6 * plan.total)
    assert plan.weights == WEIGHT_BYTES and plan.in_use >= WEIGHT_BYTES
    assert plan.margin == SAFETY_MARGIN_BYTES
    assert 0 <= plan.unplanned < plan.page_bytes  # the cache takes every whole page left
    assert runner.num_pages == plan.num_pages == runner.kv[0][0].shape[1] > 0
    assert plan.page_bytes == 2 * 2 * 2 * 16 * 16 * 4  # layers · K,V · kv heads · tokens · D · 4

    # Every program is accounted: each bucket's model step, the sampler in each mode for
    # each number of sampled rows; the reserve is the largest.
    rows = sorted({runner.shape_for(t).num_logits for t in runner.buckets})
    assert len(runner.buckets) == 2 and len(rows) == 2
    assert len(runner.programs) == len(runner.buckets) + len(rows) * len(SampleMode.all())
    assert plan.workspace == max(p.workspace for p in runner.programs)
    assert plan.workspace_program in {p.name for p in runner.programs}
    # ... and covers each program's scratch as compiled here independently.
    shape = runner.shape_for(runner.buckets[-1])
    batch = build_batch([], [], shape, 16)
    step = runner._forward.lower(runner.params, runner.kv, batch, runner._prev_tokens).compile()
    hidden = jax.ShapeDtypeStruct((runner.num_rows, runner.model_config.hidden_size), "float32")
    sampler = runner._sample.lower(runner._head, hidden,
                                   sampling_tensors([], [], [], pad_to=shape.num_logits),
                                   mode=SampleMode()).compile()
    for compiled in (step, sampler):
        assert 0 < compiled.memory_analysis().temp_size_in_bytes <= plan.workspace
    # the step's executables are the ones the runner holds: none compiled on a call
    assert runner.num_compiled == len(runner.programs)


def test_each_bucket_is_compiled_once_at_the_final_page_count(tiny_runner, caplog):
    """One probe (the largest bucket at max_pages), then every bucket once for the KV cache's
    page count; each sampler once."""
    runner = tiny_runner
    steps = sorted(c[1:] for c in TINY_COMPILES if c[0] == "step")
    assert runner.num_pages > runner.max_pages and runner.replans == 0
    assert steps == sorted([(32, runner.max_pages), (16, runner.num_pages),
                            (32, runner.num_pages)])
    samplers = [c for c in TINY_COMPILES if c[0] == "sampler"]
    assert len(samplers) == len(set(runner._samplers)) == 2 * len(SampleMode.all())
    # The start-up's times, and their one log line once warmed up.
    with caplog.at_level(logging.INFO, logger="nanoflow_jax"):
        runner.warmup()
    times = (runner.load_time, runner.probe_time, runner.compile_time, runner.kv_time,
             runner.warmup_time)
    assert all(t > 0 for t in times) and sum(times) <= runner.startup_time
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up")]
    for part in ("weights", "memory probes", "compile", "KV alloc", "warm-up", "other"):
        assert part in line
    assert f"at {runner.num_pages} pages" in line


def test_an_in_sm_schedule_is_probed_with_the_sequential_step(device, monkeypatch):
    """Its step compiles a Mosaic GPU kernel per layer on a GPU: the memory probe lowers the
    sequential step instead, so only the serving compile of the dense batch traces the in-SM
    layers."""
    from nanoflow_jax.pipeline import in_sm

    traced, run_layers = [], in_sm.run_layers

    def counted(*args, **kwargs):
        traced.append(args[2].shape[0])  # x [T, D]
        return run_layers(*args, **kwargs)

    monkeypatch.setattr(in_sm, "run_layers", counted)
    device(2 * GiB)  # room beside the module's tiny_runner, which may be alive
    seen = _record_compiles(monkeypatch)
    runner = ModelRunner(EngineConfig(**TINY, gpu_memory_utilization=0.6, schedule="insm"))
    steps = sorted(c[1:] for c in seen if c[0] == "step")
    assert steps == sorted([(32, runner.max_pages), (16, runner.num_pages),
                            (32, runner.num_pages)])
    assert traced == [32] and runner.replans == 0


@pytest.mark.parametrize("fake", ["small bucket", "cache copy"])
def test_a_step_needing_more_than_planned_re_sizes_the_cache(tiny_runner, device, monkeypatch,
                                                              caplog, fake):
    """What the probe cannot see, found once every bucket is compiled: the small bucket with
    more scratch than the largest, or a step whose workspace grows with the cache (XLA
    copying it). The cache is re-sized from what the steps measure and they are compiled
    again, so the plan holds for the executables that serve."""
    page = tiny_runner.memory_plan.page_bytes
    above = max(p.workspace for p in tiny_runner.programs) + 40 * page  # the largest, and more
    program_memory = model_runner.program_memory

    def faked(name, compiled, resident_bytes=0):
        p = program_memory(name, compiled, resident_bytes)
        pages = (resident_bytes - WEIGHT_BYTES) // page
        if fake == "small bucket" and name == "model step T=16":
            p = p.__class__(p.name, above, p.outputs, p.arguments)
        elif fake == "cache copy" and name.startswith("model step"):
            p = p.__class__(p.name, above + pages * page // 4, p.outputs, p.arguments)
        return p

    monkeypatch.setattr(model_runner, "program_memory", faked)
    monkeypatch.setattr(device_memory, "REPLAN_TOLERANCE_BYTES", 0)
    # Room for about 300 pages beside the real programs (tiny_runner's cache stays in use).
    plan = tiny_runner.memory_plan
    device(total=SAFETY_MARGIN_BYTES + _in_use_at_sizing(tiny_runner.num_rows) + plan.live
           + plan.workspace + 300 * page, xla_fraction=1.0)
    seen = _record_compiles(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="nanoflow_jax"):
        # 12 decode rows: both buckets sample 16 rows, one set of samplers to compile
        runner = ModelRunner(EngineConfig(**TINY, gpu_memory_utilization=1.0, max_num_seqs=12))
    (warning,) = [r.getMessage() for r in caplog.records if "re-planning" in r.getMessage()]
    assert runner.replans == 1 and ("per page" in warning) == (fake == "cache copy")
    assert len([c for c in seen if c[0] == "sampler"]) == len(SampleMode.all())
    first = [pages for kind, t, *pages in [c for c in seen if c[0] == "step"]]
    planned = first[1][0]  # the probe, then the buckets as first planned
    assert runner.max_pages < runner.num_pages < planned
    steps = sorted(c[1:] for c in seen if c[0] == "step")
    assert steps == sorted([(32, runner.max_pages), (16, planned), (32, planned),
                            (16, runner.num_pages), (32, runner.num_pages)])
    plan = runner.memory_plan
    assert plan.num_pages == runner.num_pages == runner.kv[0][0].shape[1]
    assert 0 <= plan.unplanned < plan.page_bytes + (page // 4 if fake == "cache copy" else 0)
    if fake == "small bucket":
        assert plan.workspace_program == "model step T=16"


def test_growth_per_page_and_pages_beside_programs():
    assert device_memory.growth_per_page(100, 4, 100, 40) == 0  # updated in place
    assert device_memory.growth_per_page(100, 4, 461, 40) == 11  # rounded up
    assert device_memory.growth_per_page(100, 4, 50, 40) == 0  # a shrink charges nothing
    assert device_memory.growth_per_page(100, 4, 900, 4) == 0  # one page count
    step = device_memory.ProgramMemory("step", 300, 0, 0)
    sampler = device_memory.ProgramMemory("sampler", 200, 0, 0)
    fit = device_memory.pages_beside_programs
    # budget 10_000, 1000 in use, live 100, margin 400: 8500 left
    assert fit(10_000, 1000, 100, 400, 100, [step], 10, 0, [sampler]) == 82  # (8500-300)//100
    # growing by 10 bytes a page, 300 measured at 10 pages: 200 at none, 110 a page
    assert fit(10_000, 1000, 100, 400, 100, [step], 10, 10, [sampler]) == 75
    big = device_memory.ProgramMemory("sampler", 2000, 0, 0)
    assert fit(10_000, 1000, 100, 400, 100, [step], 10, 0, [big]) == 65  # the sampler's


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_budget_without_room_for_one_sequence_is_a_one_line_error(device):
    device(total=GiB)
    with pytest.raises(ValueError) as err:  # the margin alone takes the budget
        ModelRunner(EngineConfig(**TINY, gpu_memory_utilization=0.45))
    message = _one_line(err)
    assert message.startswith("gpu_memory_utilization=0.45 leaves room for 0 KV pages")
    assert "max_model_len=128 needs 8" in message


def test_the_workspace_can_be_what_leaves_no_room(tiny_runner, device):
    """Room for one sequence without the programs, none with them: found once compiled."""
    plan = tiny_runner.memory_plan
    need = plan.workspace + plan.live
    total = (SAFETY_MARGIN_BYTES + _in_use_at_sizing(tiny_runner.num_rows)
             + tiny_runner.max_pages * plan.page_bytes + need // 2)
    device(total=total, xla_fraction=1.0)
    with pytest.raises(ValueError) as err:
        ModelRunner(EngineConfig(**TINY, gpu_memory_utilization=1.0))
    message = _one_line(err)
    assert "raise gpu_memory_utilization" in message
    assert "(model step T=" in message or "(sampler rows=" in message


def test_max_num_seqs_none_is_what_the_kv_cache_holds(device):
    """Large pages (1 MiB) and a tight budget: the cache holds fewer sequences than the dense
    batch has tokens, so the running cap and the decode rows come from the cache."""
    config = dict(SMALL, page_size=1024, max_model_len=1024)
    page = 2 * 2 * 2 * 1024 * 16 * 4
    rows_expected = 12  # sequences of one page the budget holds before any workspace
    prefill_rows = SMALL["max_prefill_seqs"]
    total = (SAFETY_MARGIN_BYTES + _in_use_at_sizing(rows_expected + prefill_rows)
             + rows_expected * page + page // 2)
    device(total=total, xla_fraction=1.0)
    engine = LLMEngine(EngineConfig(**config, gpu_memory_utilization=1.0))
    runner = engine.runner
    assert runner.max_decode == runner.max_num_seqs == rows_expected < config[
        "max_num_batched_tokens"]
    assert engine.scheduler.max_running == rows_expected
    assert runner.num_rows == rows_expected + prefill_rows
    # the sampler is compiled (and its workspace counted) for the capacity's rows
    samplers = {p.name.split()[1] for p in runner.programs if p.name.startswith("sampler")}
    assert samplers == {f"rows={runner.num_rows}"}
    assert 1 <= runner.num_pages < rows_expected  # the workspace took some pages
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    for i in range(20):
        engine.add_request(str(i), {"prompt_token_ids": [1 + i] * 10}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
        assert len(engine.scheduler.running) <= runner.num_pages
    assert sorted(done, key=int) == [str(i) for i in range(20)]
    assert all(len(o.outputs[0].token_ids) == 5 for o in done.values())
    assert engine.allocator.num_free == runner.num_pages


def test_num_pages_beyond_the_budget_is_a_one_line_error(device):
    device(total=GiB)
    with pytest.raises(ValueError) as err:
        ModelRunner(EngineConfig(**SMALL, gpu_memory_utilization=0.6, num_pages=100_000))
    assert _one_line(err).startswith("num_pages=100000 (")
    assert "lower num_pages" in str(err.value)


def test_any_max_num_seqs_and_utilization_start_or_fail_in_one_line(device):
    """From one running sequence to more than the dense batch, with and without room: the
    engine starts and serves, or stops at once with one line naming the knob."""
    device(total=GiB)
    plans = {}
    for max_num_seqs, utilization, starts in [
            (1, 0.6, True), (10_000, 0.6, True), (None, 0.6, True), (None, 0.65, True),
            (None, 0.5, False), (64, 0.3, False), (10_000, 0.49, False)]:
        config = EngineConfig(**SMALL, max_num_seqs=max_num_seqs,
                              gpu_memory_utilization=utilization)
        if not starts:
            with pytest.raises(ValueError) as err:
                LLMEngine(config)
            assert _one_line(err).startswith(f"gpu_memory_utilization={utilization:g} leaves")
            continue
        engine = LLMEngine(config)
        runner = engine.runner
        plan = plans[max_num_seqs, utilization] = runner.memory_plan
        assert 0 <= plan.unplanned < plan.page_bytes and runner.num_pages >= runner.max_pages
        assert runner.max_decode == min(max_num_seqs or 16, 16)
        assert engine.scheduler.max_running == (max_num_seqs or runner.max_decode)
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        for i in range(5):
            engine.add_request(str(i), {"prompt_token_ids": [3] * (5 + 7 * i)}, params)
        finished = 0
        while engine.has_unfinished_requests():
            finished += sum(o.finished for o in engine.step())
        assert finished == 5 and engine.allocator.num_free == runner.num_pages
        del engine, runner
        gc.collect()
    # A larger budget buys its difference in pages.
    low, high = plans[None, 0.6], plans[None, 0.65]
    extra = (high.num_pages - low.num_pages) * high.page_bytes
    slack = 2 * high.page_bytes + abs(high.in_use - low.in_use) + abs(high.workspace
                                                                        - low.workspace)
    assert abs(extra - (high.budget - low.budget)) <= slack
    # More decode rows: a larger sampler workspace
    assert plans[1, 0.6].workspace <= plans[10_000, 0.6].workspace


@pytest.mark.eight_devices
def test_tensor_parallel_budget_is_per_device(device):
    """Each device holds its shard of the weights and of the KV heads: the page and weight
    bytes of the plan are a device's, and the cache still fills what its budget leaves."""
    device(total=GiB)
    runner = ModelRunner(EngineConfig(**SMALL, gpu_memory_utilization=0.6,
                                      tensor_parallel_size=2))
    plan = runner.memory_plan
    assert plan.page_bytes == 2 * 1 * 16 * 16 * 4 * 2  # one of the two KV heads per device
    assert plan.weights < WEIGHT_BYTES
    assert 0 <= plan.unplanned < plan.page_bytes
    k_pages = runner.kv[0][0]
    assert k_pages.shape[1] == runner.num_pages
    assert k_pages.sharding.shard_shape(k_pages.shape)[0] == 1
    assert runner.num_compiled == len(runner.programs)
