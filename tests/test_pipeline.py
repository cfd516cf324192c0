"""Nano-batch schedules: validation, JSON, and the same outputs as the sequential schedule."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.batch import BatchShape, SeqChunk, build_batch
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.schedule import (NanoOp, Schedule, nano_batched, nano_pipelined,
                                            sequential)
from nanoflow_jax.pipeline.spec import ScheduleSpec, named_schedule
from tests.helpers import golden_path, rel_err

PAGE, T = 4, 64


def _batch(kind, rng, vocab):
    """decode-only, prefill-only or mixed; prompt chunks with prior context, one straddling
    the nano-batch boundaries."""
    perm = rng.permutation(200).tolist()
    take = lambda n: [perm.pop() for _ in range(n)]  # noqa: E731
    decodes, prefills = [], []
    if kind in ("decode", "mixed"):
        for ctx in rng.integers(1, 40, 5 if kind == "mixed" else 12):
            decodes.append(SeqChunk([int(rng.integers(vocab))], int(ctx), take(-(-(ctx + 1) // PAGE))))
    if kind in ("prefill", "mixed"):
        for n, prior in ((30, 7), (20, 0)) if kind == "mixed" else ((41, 3), (15, 9)):
            prefills.append(SeqChunk(rng.integers(0, vocab, n).tolist(), prior,
                                     take(-(-(prior + n) // PAGE))))
    shape = BatchShape(num_tokens=T, num_decode=16, num_prefill_seqs=4, max_pages=16)
    return build_batch(decodes, prefills, shape, PAGE)


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _forward(params, config, kv, batch, attention, layers_fn):
    return llama.forward(params, config, batch.token_ids, batch.positions, kv, batch.attn,
                         jnp.arange(T), attention, layers_fn)


def _prefill_context(model, kv, rng):
    """Random K/V in every page: the prior context the chunks and decodes attend to."""
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), len(kv))
    return [(jax.random.normal(kk, k.shape, k.dtype), jax.random.normal(kk, v.shape, v.dtype) * 2)
            for kk, (k, v) in zip(keys, kv)]


CUSTOM = Schedule("custom", T, (  # attention split elsewhere than the GEMMs, three streams
    NanoOp("qkv", 0, 32, 1), NanoOp("qkv", 32, 64, 1),
    NanoOp("attn", 0, 24, 2), NanoOp("attn", 24, 64, 3),
    NanoOp("o_proj", 0, 48, 1), NanoOp("up_gate", 0, 16, 1), NanoOp("o_proj", 48, 64, 1),
    NanoOp("up_gate", 16, 64, 1), NanoOp("down", 0, 64, 1),
))


def _as_calls(fn, stream):
    """Stand-in for a stream on the CPU: each call its own jit, so a call that misses an input
    or drops an output fails here as it would on the GPU."""
    del stream
    return jax.jit(fn)


@pytest.mark.parametrize("kind", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("schedule", [nano_batched(T, 2), nano_batched(T, 3, grouped=True),
                                      nano_batched(T, 4, overlap=False), CUSTOM,
                                      nano_pipelined(T, 2), nano_pipelined(T, 3, streams=False),
                                      nano_pipelined(T, 2, streams=False, gemm_sm_share=0.5)],
                         ids=lambda s: s.name)
def test_schedule_matches_sequential(kind, schedule):
    model = nf.load_model("tiny-llama", dtype="float32", seed=11)
    rng = np.random.default_rng()
    batch = jax.device_put(_batch(kind, rng, model.config.vocab_size))
    kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
    attention = attention_fn("reference")
    want, want_kv = _forward(model.params, model.config, kv, batch, attention,
                             llama.run_layers)
    got, got_kv = _forward(model.params, model.config, kv, batch, attention,
                           make_layers_fn(schedule, use_streams=True, wrap_call=_as_calls))
    assert_same_step(batch, (want, want_kv), (got, got_kv))


def assert_same_step(batch, want, got):
    """The hidden states of the batch's real rows and every layer's KV cache agree."""
    (want, want_kv), (got, got_kv) = want, got
    rows = np.asarray(batch.attn.slots) >= 0
    assert rows.sum() > 0
    assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5
    for (gk, gv), (wk, wv) in zip(got_kv, want_kv):
        assert rel_err(gk, wk) < 1e-6 and rel_err(gv, wv) < 1e-6


def test_schedule_with_kernels_in_interpret_mode():
    model = nf.load_model("tiny-qwen2", dtype="float32", seed=5)
    rng = np.random.default_rng()
    batch = jax.device_put(_batch("mixed", rng, model.config.vocab_size))
    kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
    want, _ = _forward(model.params, model.config, kv, batch, attention_fn("reference"),
                       llama.run_layers)
    # 3 persistent decode programs (2 % of 132 SMs) for more work items: the loop runs.
    got, _ = _forward(model.params, model.config, kv, batch, attention_fn("interpret"),
                      make_layers_fn(nano_pipelined(T, 2, attn_sm_share=0.02), use_streams=True,
                                     wrap_call=_as_calls))
    rows = np.asarray(batch.attn.slots) >= 0
    assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5


def test_gemm_sm_share_runs_the_persistent_gemm_in_interpret_mode():
    """GEMM ops with an SM share go through `gemm_on`: here the persistent Mosaic GPU GEMM on 2
    CTAs in its CPU interpreter (fp32 tiles that cover every tiny-llama projection; the
    interpreter crashes on a 64-wide bf16 or fp32 N tile)."""
    from pallas_kernels.persistent_matmul import MatmulTiling, persistent_matmul

    tiling = MatmulTiling(tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2,
                          wg_split_m=True)
    shares = []

    def gemm_on(share):
        shares.append(share)
        return functools.partial(persistent_matmul, num_programs=2, tiling=tiling,
                                 interpret=True)

    model = nf.load_model("tiny-llama", dtype="float32", seed=3)
    rng = np.random.default_rng()
    batch = jax.device_put(_batch("mixed", rng, model.config.vocab_size))
    kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
    attention = attention_fn("reference")
    want, _ = _forward(model.params, model.config, kv, batch, attention, llama.run_layers)
    schedule = nano_pipelined(T, 2, streams=False, gemm_sm_share=0.85)
    got, _ = _forward(model.params, model.config, kv, batch, attention,
                      make_layers_fn(schedule, gemm_on=gemm_on))
    rows = np.asarray(batch.attn.slots) >= 0
    assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5
    # 4 GEMM ops x 2 nano-batches x 2 layers, each given the schedule's share.
    assert shares == [0.85] * 16


def test_engine_with_a_nano_batch_schedule_generates_the_same_tokens():
    prompts = [{"prompt_token_ids": list(range(i, i + 20 + 7 * i))} for i in range(6)]
    params = nf.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for name in ("sequential", "nano2"):
        llm = nf.LLM("tiny-llama", dtype="float32", max_num_batched_tokens=128, min_bucket=128,
                     max_model_len=256, page_size=4, num_pages=400, schedule=name)
        if name == "nano2":  # 128 >= nano2's min_tokens: the split really runs
            assert not llm.engine.runner.schedule.for_tokens(128).is_sequential
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                    use_tqdm=False)]
    assert outs["nano2"] == outs["sequential"]


def test_validation_and_json():
    s = nano_batched(1024, 3)
    assert Schedule.from_json(s.to_json()) == s
    assert [o.op for o in sequential(16).ops] == ["qkv", "attn", "o_proj", "up_gate", "down"]
    scaled = s.for_tokens(512)
    assert scaled.num_tokens == 512 and not scaled.is_sequential
    assert all(o.start % 16 == 0 and o.end <= 512 for o in scaled.ops)
    assert s.for_tokens(128).is_sequential  # below min_tokens: splitting cannot pay
    assert named_schedule("nano2-nooverlap", 256).name == "nano2-nooverlap"
    big_only = named_schedule("nano2-pipe-nostreams-min512+graph", 1024)
    plain = named_schedule("nano2-pipe-nostreams+graph", 1024)
    assert big_only.name == "nano2-pipe-nostreams-min512+graph" and big_only.concurrent
    assert big_only.ops == plain.ops and big_only.min_tokens == 512
    assert big_only.for_tokens(256).is_sequential and not plain.for_tokens(256).is_sequential
    assert not big_only.for_tokens(512).is_sequential
    with pytest.raises(ValueError, match="unknown schedule"):
        named_schedule("sequential-min512", 1024)
    grouped = named_schedule("nano2-grouped", 256)
    assert Schedule.from_json(grouped.to_json()) == grouped
    # One group per tick: nano-batch 0's attention beside nano-batch 1's qkv GEMM.
    tick2 = [(o.op, o.start, o.stream) for o in grouped.ops if o.group == 2]
    assert tick2 == [("attn", 0, 2), ("qkv", 128, 1)]
    with pytest.raises(ValueError, match="group"):
        NanoOp("qkv", 0, 8, group=-1)
    with pytest.raises(ValueError, match="gap or overlap"):
        Schedule("bad", 32, tuple(NanoOp(k, 0, 32) for k in
                                  ("qkv", "attn", "o_proj", "up_gate")) + (NanoOp("down", 0, 16),
                                                                           NanoOp("down", 8, 32)))
    with pytest.raises(ValueError, match="before its tokens' qkv"):
        Schedule("bad", 32, (NanoOp("attn", 0, 32),) + tuple(
            NanoOp(k, 0, 32) for k in ("qkv", "o_proj", "up_gate", "down")))
    with pytest.raises(ValueError, match="unknown nano-op"):
        NanoOp("softmax", 0, 8)
    with pytest.raises(ValueError, match="layer must be"):
        NanoOp("qkv", 0, 8, layer=2)


def test_pipelined_schedules_cross_layers_in_data_flow_order():
    s = named_schedule("nano2-pipe-sm25+graph", 256)
    assert (s.name, s.windows, s.concurrent) == ("nano2-pipe-sm25+graph", 1, True)
    assert s.compiler_options() == {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
    assert Schedule.from_json(s.to_json()) == s
    assert {o.sm_share for o in s.ops if o.op == "attn"} == {0.25}
    partitioned = named_schedule("nano2-pipe-nostreams-gemm85+graph", 256)
    assert partitioned.name == "nano2-pipe-nostreams-gemm85+graph"
    assert {(o.op == "attn", o.sm_share) for o in partitioned.ops} == {(True, 1), (False, 0.85)}
    # The persistent GEMM chain is issued first in each tick: the attention after it finds
    # the SMs it leaves.
    assert [o.op for o in partitioned.ops[:5]] == ["o_proj", "up_gate", "down", "qkv", "attn"]
    # Tick 1 of window l: nano-batch 1's attention beside nano-batch 0's o_proj, up/gate,
    # down and its next layer's qkv; tick 2: nano-batch 0's next-layer attention beside
    # nano-batch 1's chain.
    ticks = [[(o.op, o.start, o.layer) for o in s.ops if o.group == g] for g in (1, 2)]
    assert ticks[0] == [("attn", 128, 0), ("o_proj", 0, 0), ("up_gate", 0, 0), ("down", 0, 0),
                        ("qkv", 0, 1)]
    assert ticks[1][0] == ("attn", 0, 1)
    # Prologue (window -1) and epilogue come from skipping layers outside the model.
    flat = [(w + o.layer, o.op, o.start) for w, o in s.flatten(2)]
    assert flat[:3] == [(0, "qkv", 0), (0, "attn", 0), (0, "qkv", 128)]
    assert flat[-3:] == [(1, "o_proj", 128), (1, "up_gate", 128), (1, "down", 128)]
    assert named_schedule("sequential+graph", 64).is_sequential
    assert not named_schedule("nano2-pipe", 256).for_tokens(256).is_sequential
    ops = list(nano_pipelined(64, 2, streams=False).ops)
    with pytest.raises(ValueError, match="before its tokens' down of layer 0"):
        # nano-batch 0's next-layer qkv before its down
        Schedule("bad", 64, tuple(ops[:3] + [ops[4], ops[3]] + ops[5:]))
    with pytest.raises(ValueError, match="attention of tokens 0"):
        # the second half's attention first: a chunk cut at 32 would miss its first K/V
        Schedule("bad", 64, tuple(NanoOp(op, s, e) for op, s, e in [
            ("qkv", 0, 32), ("qkv", 32, 64), ("attn", 32, 64), ("attn", 0, 32),
            ("o_proj", 0, 64), ("up_gate", 0, 64), ("down", 0, 64)]))


def test_pipelined_stream_calls_two_per_tick_and_cache_writes_outside():
    """nano2-pipe on streams: per layer 2 ticks × (attention call + GEMM chain call), each
    (window, tick) its own scheduling group, and no side-stream call writes the KV cache
    (XLA would copy the whole cache to keep its input intact)."""
    model = nf.load_model("tiny-llama", dtype="float32", seed=1)
    cfg, num_layers = model.config, len(model.params["layers"])
    batch = _batch("mixed", np.random.default_rng(0), cfg.vocab_size)
    kv = init_kv_cache(cfg, 200, PAGE, jnp.float32)
    run = make_layers_fn(nano_pipelined(T, 2), use_streams=True)

    def layers(x, kv):
        return run(model.params["layers"], x, batch.positions, kv, batch.attn, cfg,
                   attention_fn("reference"))

    x = jnp.zeros((T, cfg.hidden_size))
    eqns = jax.make_jaxpr(layers)(x, kv).jaxpr.eqns
    calls = [e for e in eqns if e.primitive.name == "compute_on"]
    assert len(calls) == 4 * num_layers + 2  # + the prologue's qkv split in two groups
    inside = {e.primitive.name for c in calls for e in c.params["jaxpr"].eqns}
    assert "dot_general" in inside and "scatter" not in inside
    # K and V of both nano-batches, every layer, on the main stream
    assert sum(e.primitive.name == "scatter" for e in eqns) == 2 * 2 * num_layers
    text = jax.jit(layers).lower(x, kv).as_text()
    groups = set(re.findall(r'_scheduling_group_id = "(\d+)"', text))
    assert len(groups) == 2 * (num_layers + 1)
    with pytest.raises(ValueError, match="unknown schedule"):
        named_schedule("nano", 64)


def _digest(schedule: Schedule) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(json.loads(schedule.to_json()),
                                     sort_keys=True).encode()).hexdigest()[:16]


def test_every_alias_builds_the_schedule_it_always_did():
    """tests/golden/schedule_aliases.json holds digests of the schedules the string parser
    built for 400 aliases (every family and suffix, 3 dense batches); the spec builds each."""
    import json

    with open(golden_path("schedule_aliases.json")) as f:
        golden = json.load(f)
    assert len(golden) > 300
    for key, digest in golden.items():
        alias, tokens = key.rsplit("@", 1)
        spec = ScheduleSpec.parse(alias)
        assert spec.alias == alias  # canonical: the alias is the spec's own name
        assert _digest(spec.build(int(tokens))) == digest, key
        assert _digest(named_schedule(alias, int(tokens))) == digest, key
        assert ScheduleSpec.from_dict(json.loads(spec.to_json())) == spec


def test_schedule_spec_json_and_schedule_json_files(tmp_path):
    spec = ScheduleSpec("pipe", num_nano=2, streams=False, attention_sm_share=0.33,
                        gemm_sm_share=0.67, min_tokens=1024, concurrent=True)
    assert spec.alias == "nano2-pipe-nostreams-sm33-gemm67-min1024+graph"
    assert ScheduleSpec.parse(spec.alias) == spec
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    built = named_schedule(str(spec_file), 2048)
    assert built == spec.build(2048) and built.name == spec.alias
    sched_file = tmp_path / "schedule.json"
    sched_file.write_text(nano_pipelined(1024, 2).to_json())
    assert named_schedule(str(sched_file), 2048) == nano_pipelined(1024, 2).for_tokens(2048)
    assert named_schedule(spec, 2048) == built  # objects too
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_tokens": 3}')
    with pytest.raises(ValueError, match="neither a Schedule JSON"):
        named_schedule(str(bad), 64)
    bad.write_text('{"kind": "pipe", "overlap": false}')
    with pytest.raises(ValueError, match="overlap applies to kind nano"):
        named_schedule(str(bad), 64)
    bad.write_text('{"kind": "nano", "colour": 1}')
    with pytest.raises(ValueError, match="unknown ScheduleSpec field"):
        named_schedule(str(bad), 64)
    with pytest.raises(FileNotFoundError):
        named_schedule(str(tmp_path / "missing.json"), 64)


@pytest.mark.parametrize("name", ["nano", "nano2-pipe-sm0", "sequential-min512", "seq",
                                  "nano2+graph-min64", "nano2-gemm50", "nano1-pipe"])
def test_bad_schedule_names_get_one_line_listing_the_forms(name):
    with pytest.raises(ValueError) as err:
        named_schedule(name, 1024)
    message = str(err.value)
    assert "\n" not in message and name in message
    if "sm0" not in name and name != "nano1-pipe":
        assert "valid forms: sequential, nanoN" in message and "auto" in message
    # The engine's config names the knob, at construction.
    with pytest.raises(ValueError, match="^schedule: "):
        nf.EngineConfig(schedule=name)


def test_inline_nested_jits_flattens_and_keeps_values():
    """Stream bodies must hold no nested jit (XLA gives a nested call-start no stream)."""
    from nanoflow_jax.pipeline.executor import inline_nested_jits

    def body(x, pair):
        return {"a": jax.nn.silu(x) @ pair[0], "b": jnp.pad(pair[1], 1)}

    rng = np.random.default_rng()
    x, w, y = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 8), (8, 3), (2, 2)))

    def nested_calls(f):
        return [e for e in jax.make_jaxpr(f)(x, (w, y)).jaxpr.eqns
                if e.primitive.name in ("pjit", "jit")]

    assert nested_calls(body)  # silu and pad are jitted functions
    assert not nested_calls(inline_nested_jits(body))
    got, want = inline_nested_jits(body)(x, (w, y)), body(x, (w, y))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, e)


def test_side_stream_attention_body_has_no_xla_control_flow():
    """On a side stream, every sub-computation of the body must be gone: XLA placed neither a
    nested jit's call nor a while loop's condition on a stream (H100, JAX 0.11.2)."""
    from nanoflow_jax.pipeline.executor import inline_nested_jits

    model = nf.load_model("tiny-llama", dtype="float32", seed=1)
    batch = _batch("mixed", np.random.default_rng(), model.config.vocab_size)
    cfg = model.config
    q = jnp.zeros((T, cfg.num_heads, cfg.head_dim))
    k = v = jnp.zeros((T, cfg.num_kv_heads, cfg.head_dim))
    cache = init_kv_cache(cfg, 200, PAGE, jnp.float32)[0]
    body = inline_nested_jits(attention_fn("pallas"))  # traced only: no GPU needed
    prims = {e.primitive.name for e in jax.make_jaxpr(body)(q, k, v, cache, batch.attn).eqns}
    assert "pallas_call" in prims
    assert not prims & {"pjit", "jit", "while", "cond", "scan"}, prims


def test_collective_ops_in_the_schedule_format():
    """The all-reduces are ops of their own: both or neither, on stream 0, after their
    producer; `-ar` families place them a tick after it, the executor's insertion just before
    their consumer."""
    s = named_schedule("nano2-ar", 64)
    assert s.name == "nano2-ar" and s.has_collectives and not s.is_sequential
    assert Schedule.from_json(s.to_json()) == s
    # Tick by tick (nano-batch 0 first): nano-batch 1's ar_attn is issued with nano-batch 0's
    # qkv GEMM, nano-batch 0's ar_mlp with nano-batch 1's o_proj GEMM.
    ops = [(o.op, o.start) for o in s.ops]
    assert ops[:6] == [("ar_attn", 0), ("qkv", 0), ("ar_attn", 32), ("attn", 0), ("qkv", 32),
                       ("o_proj", 0)]
    i = ops.index(("ar_mlp", 0))
    assert ops[i + 1] == ("o_proj", 32)
    assert all(o.stream == 0 and o.group == 0 for o in s.ops if o.op.startswith("ar_"))
    dropped = s.without_collectives()  # a valid schedule: nano2's ops, another order
    assert sorted(dropped.ops, key=repr) == sorted(named_schedule("nano2", 64).ops, key=repr)
    # Inserted before each consumer: a valid schedule, the same once dropped again.
    inserted = named_schedule("nano2-pipe", 64).with_collectives()
    kinds = [o.op for o in inserted.ops]
    assert kinds.count("ar_attn") == kinds.count("ar_mlp") == 2
    assert kinds[kinds.index("ar_mlp") + 1] == "up_gate"
    assert inserted.without_collectives() == named_schedule("nano2-pipe", 64)
    assert sequential(64).with_collectives().is_sequential
    pipe = named_schedule("nano2-pipe-nostreams-ar-min128+graph", 256)
    assert pipe.name == "nano2-pipe-nostreams-ar-min128+graph" and pipe.has_collectives
    spec = ScheduleSpec.parse("nano3-grouped-ar")
    assert spec.collectives and spec.alias == "nano3-grouped-ar"
    with pytest.raises(ValueError, match="collectives applies to kind nano or pipe"):
        ScheduleSpec("sequential", collectives=True)
    with pytest.raises(ValueError, match="runs on stream 0"):
        NanoOp("ar_mlp", 0, 8, stream=1)
    seq = [NanoOp(k, 0, 32) for k in ("ar_attn", "qkv", "attn", "o_proj", "ar_mlp", "up_gate",
                                      "down")]
    assert Schedule("tp", 32, tuple(seq)).is_sequential
    with pytest.raises(ValueError, match="both collectives or neither"):
        Schedule("bad", 32, tuple(o for o in seq if o.op != "ar_attn"))
    with pytest.raises(ValueError, match="ar_mlp.* runs before its tokens' o_proj"):
        Schedule("bad", 32, tuple(seq[:3] + [seq[4], seq[3]] + seq[5:]))


def test_nano_batch_all_reduces_do_not_wait_for_the_other_nano_batch_gemms():
    """Traced with a tensor-parallel axis: every all-reduce of a nano-batch schedule has GEMMs
    that neither feed it nor read it (XLA may run it under them); the sequential schedule's
    all-reduces have none. Nothing here needs several devices."""
    from jax.extend import core as jcore

    from nanoflow_jax.pipeline.executor import inline_nested_jits

    model = nf.load_model("tiny-llama", dtype="float32", seed=1)
    cfg = dataclasses.replace(model.config, tp_axis="tp")  # as a shard sees it
    batch = jax.device_put(_batch("mixed", np.random.default_rng(0), cfg.vocab_size))
    kv = init_kv_cache(cfg, 200, PAGE, jnp.float32)
    x = jnp.zeros((T, cfg.hidden_size))
    free = {}
    for name in ("sequential", "nano2-ar"):
        run = make_layers_fn(named_schedule(name, T))

        def layers(x, kv, batch, run=run):
            return run(model.params["layers"], x, batch.positions, kv, batch.attn, cfg,
                       attention_fn("reference"))

        eqns = jax.make_jaxpr(inline_nested_jits(layers), axis_env=[("tp", 2)])(
            x, kv, batch).jaxpr.eqns
        producer, before = {}, []  # before[i]: every equation equation i depends on
        for i, e in enumerate(eqns):
            deps = set()
            for v in e.invars:
                if not isinstance(v, jcore.Literal) and v in producer:
                    deps |= before[producer[v]] | {producer[v]}
            before.append(deps)
            producer.update((v, i) for v in e.outvars)
        psums = [i for i, e in enumerate(eqns) if e.primitive.name == "psum"]
        dots = [i for i, e in enumerate(eqns) if e.primitive.name == "dot_general"]
        assert len(psums) == 2 * len(model.params["layers"]) * (2 if "nano" in name else 1)
        free[name] = [sum(d not in before[p] and p not in before[d] for d in dots)
                      for p in psums]
    assert all(free["nano2-ar"]) and not any(free["sequential"])
