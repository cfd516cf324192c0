"""Tensor parallelism on 8 CPU devices: TP 2, 4 and 8 give TP 1's logits and tokens, weights
load straight into their shards, the sharded step has exactly Megatron's all-reduces, and
multi-host start-up forms a mesh over two processes.

Tests marked `eight_devices` run in a child process with 8 CPU devices unless this one has
them (conftest.py): `XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest <this file>`
runs them all in one process."""
import functools
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import nanoflow_jax as nf
from nanoflow_jax import LLM, SamplingParams, parallel, weights
from nanoflow_jax.config import EngineConfig, ModelConfig
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.spec import named_schedule
from tests.helpers import golden_path, rel_err
from tests.test_pipeline import T, _as_calls, _batch, _prefill_context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
eight_devices = pytest.mark.eight_devices


def _config(kv_heads: int, qwen: bool = False) -> ModelConfig:
    """8 query heads (so TP 8 is possible); 8 KV heads split, 2 duplicated at TP 4 and 8.
    The Qwen2 flavour adds q/k/v biases and a tied LM head."""
    return ModelConfig("Qwen2ForCausalLM" if qwen else "LlamaForCausalLM", vocab_size=256,
                       hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                       num_kv_heads=kv_heads, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                       max_position_embeddings=512, attention_bias=qwen,
                       tie_word_embeddings=qwen)


CONFIGS = {"llama-kv8": _config(8), "qwen2-kv2": _config(2, qwen=True)}


@eight_devices
def test_the_test_process_has_eight_devices():
    assert jax.device_count() >= 8, "conftest.py must set --xla_force_host_platform_device_count=8"


@eight_devices
def test_layout_gives_each_shard_its_heads_and_duplicates_few_kv_heads():
    c = _config(2)  # q heads 0..7 use KV head h // 4
    cols = parallel.fused_columns(c, 8, "wqkv").reshape(8, -1)  # [shard, (1 q + 1 k + 1 v)·Dh]
    for shard in range(8):
        q, k, v = cols[shard].reshape(3, 8)
        assert (q == np.arange(8) + 8 * shard).all()
        assert (k == c.q_size + 8 * (shard // 4) + np.arange(8)).all()
        assert (v == k + c.kv_size).all()
    gate_up = parallel.fused_columns(c, 4, "w_gate_up").reshape(4, 2, 32)
    assert (gate_up[:, 1] - gate_up[:, 0] == 128).all()
    assert (gate_up[1, 0] == np.arange(32, 64)).all()
    local = parallel.local_config(c, 4)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 32)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the 8 attention"):
        parallel.check_divisible(c, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=16 exceeds"):
        parallel.make_mesh(16)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    assert parallel.make_mesh(1) is None


@pytest.mark.parametrize("preset", ["llama-2-70b", "llama-3-70b", "qwen2-72b"])
def test_70b_presets_split_eight_ways_into_an_eighth_each(preset):
    config = nf.config.get_preset(preset)
    for tp in (2, 4, 8):
        local = parallel.local_config(config, tp)
        assert local.num_heads * tp == 64 and local.num_kv_heads * tp == 8
        assert parallel.vocab_is_sharded(config, tp)
    per_device = 0
    for path, shape in jax.tree_util.tree_leaves_with_path(
            weights.param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)):
        name = path[-1].key
        shape = list(parallel.tp_shape(name, shape, config, 8))
        for axis, part in enumerate(parallel.leaf_spec(name, config, 8)):
            if part == parallel.TP_AXIS:
                shape[axis] //= 8
        per_device += int(np.prod(shape))
    # Exactly an eighth, but for the norms (whole on every device).
    norms = (2 * config.num_layers + 1) * config.hidden_size
    assert per_device == (config.param_count - norms) // 8 + norms


@eight_devices
@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("name", CONFIGS)
def test_dense_logits_equal_tp1_and_no_device_holds_the_model(name, tp):
    config = CONFIGS[name]
    full = weights.random_params(config, "float32", seed=1)
    mesh = parallel.make_mesh(tp)
    params = weights.random_params(config, "float32", seed=1, mesh=mesh)
    # Generated in shards = the unsharded values laid out.
    for got, want in zip(jax.tree.leaves(params),
                         jax.tree.leaves(parallel.shard_params(full, config, mesh))):
        np.testing.assert_array_equal(got, want)
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(params)
                     for s in x.addressable_shards if s.device == mesh.devices[0])
    total = sum(x.nbytes for x in jax.tree.leaves(full))
    assert per_device < total * (1.6 / tp + 0.1)  # the norms (and duplicated KV heads) aside
    tokens = np.random.default_rng(tp).integers(0, config.vocab_size, 37)
    want = nf.model_loader.Model(config, full).logits(tokens)
    got = nf.model_loader.Model(config, params, mesh).logits(tokens)
    assert rel_err(got, want) < 1e-5


@eight_devices
def test_vocab_that_does_not_split_keeps_embedding_and_head_whole():
    config = ModelConfig("LlamaForCausalLM", vocab_size=250, hidden_size=64,
                         intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=2,
                         head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=512)
    full = weights.random_params(config, "float32", seed=5)
    mesh = parallel.make_mesh(4)
    params = weights.random_params(config, "float32", seed=5, mesh=mesh)
    assert params["embed"].sharding.is_fully_replicated
    assert params["lm_head"].sharding.is_fully_replicated
    tokens = np.arange(0, 250, 7)
    want = nf.model_loader.Model(config, full).logits(tokens)
    assert rel_err(nf.model_loader.Model(config, params, mesh).logits(tokens), want) < 1e-5


@functools.partial(jax.jit, static_argnums=(1, 4, 5, 6))
def _paged_forward(params, config, kv, batch, attention, layers_fn, mesh):
    return parallel.forward_fn(mesh)(params, config, batch.token_ids, batch.positions, kv,
                                     batch.attn, jnp.arange(T), attention, layers_fn)


def _kv_heads_of(cache, config, tp):
    """A tp cache [tp·Hkv', ...] -> the natural [Hkv, ...] (each shard's first KV head)."""
    starts = [parallel.kv_head_start(config, tp, i) for i in range(tp)]
    per = parallel.kv_heads_per_shard(config, tp)
    heads = {starts[i] + j: np.asarray(cache[i * per + j]) for i in range(tp) for j in range(per)}
    return np.stack([heads[h] for h in range(config.num_kv_heads)])


@eight_devices
@pytest.mark.parametrize("name, tp, schedule, impl", [
    ("llama-kv8", 8, "sequential", "reference"),
    ("qwen2-kv2", 4, "sequential", "reference"),
    ("qwen2-kv2", 8, "nano2-pipe", "reference"),  # pipelined TP = sequential TP 1
    ("llama-kv8", 4, "nano2", "reference"),  # all-reduces inserted before their consumers
    ("llama-kv8", 2, "nano2-ar", "reference"),  # all-reduces placed by the family
    ("qwen2-kv2", 4, "nano2-pipe-ar", "reference"),
    ("qwen2-kv2", 2, "sequential", "interpret"),  # the Pallas kernels, per shard
])
def test_paged_step_equals_tp1(name, tp, schedule, impl):
    config = CONFIGS[name]
    rng = np.random.default_rng(tp)
    batch = _batch("mixed", rng, config.vocab_size)
    full = weights.random_params(config, "float32", seed=2)
    kv = _prefill_context(None, init_kv_cache(config, 64, 4, jnp.float32), rng)
    attention = attention_fn(impl)
    want, want_kv = _paged_forward(full, config, kv, batch, attention, llama.run_layers, None)

    mesh = parallel.make_mesh(tp)
    params = parallel.shard_params(full, config, mesh)
    # The same prior context, each shard holding its KV heads.
    heads = [parallel.kv_head_start(config, tp, i) + j for i in range(tp)
             for j in range(parallel.kv_heads_per_shard(config, tp))]
    kv_tp = [tuple(jax.device_put(np.asarray(a)[heads], parallel.kv_sharding(mesh)) for a in l)
             for l in kv]
    sched = named_schedule(schedule, T)
    # Each stream call its own jit (as test_pipeline does): calls inside the shard_map.
    layers_fn = (llama.run_layers if sched.is_sequential
                 else make_layers_fn(sched, use_streams=True, wrap_call=_as_calls))
    got, got_kv = _paged_forward(params, config, kv_tp, batch, attention, layers_fn, mesh)
    assert got.sharding.spec == parallel.P(None, parallel.TP_AXIS)
    assert rel_err(got, want) < 1e-5
    for (k, v), (k1, v1) in zip(got_kv, want_kv):
        assert k.sharding.spec == parallel.P(parallel.TP_AXIS)
        np.testing.assert_allclose(_kv_heads_of(k, config, tp), k1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_kv_heads_of(v, config, tp), v1, rtol=1e-5, atol=1e-5)


@eight_devices
@pytest.mark.parametrize("schedule, per_layer", [("sequential", 2), ("nano2", 4)])
def test_sharded_step_has_megatron_collectives_only(schedule, per_layer):
    """Per layer and nano-batch one all-reduce after o_proj and one after down (fused into
    the norm that follows, or the schedule's collective ops), plus the final norm's; nothing
    gathers weights. A nano-batch schedule gives each nano-batch its own. The step compiles
    with `parallel.compiler_options` (XLA knows every option's name)."""
    config = CONFIGS["qwen2-kv2"]
    mesh = parallel.make_mesh(4)
    params = weights.random_params(config, "float32", mesh=mesh)
    kv = init_kv_cache(config, 16, 4, jnp.float32, mesh)
    batch = _batch("mixed", np.random.default_rng(0), config.vocab_size)
    sched = named_schedule(schedule, T)
    layers_fn = llama.run_layers if sched.is_sequential else make_layers_fn(sched)
    lowered = _paged_forward.lower(params, config, kv, batch, attention_fn("reference"),
                                   layers_fn, mesh)
    text = lowered.as_text()
    assert text.count("all_reduce") == per_layer * config.num_layers + 1
    assert "all_gather" not in text and "all_to_all" not in text
    options = parallel.compiler_options(mesh, sched)
    assert bool(options) == (not sched.is_sequential)
    hlo = lowered.compile(options).as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_tp1_step_is_the_unsharded_program():
    """tensor_parallel_size=1 builds no mesh and the step lowers to llama.forward's program."""
    config = CONFIGS["llama-kv8"]
    assert parallel.forward_fn(None) is llama.forward
    params = weights.random_params(config, "float32")
    kv = init_kv_cache(config, 16, 4, jnp.float32)
    batch = _batch("mixed", np.random.default_rng(0), config.vocab_size)
    args = (params, config, kv, batch, attention_fn("reference"), llama.run_layers, None)
    text = _paged_forward.lower(*args).as_text()
    plain = jax.jit(lambda p, kv, b: llama.forward(
        p, config, b.token_ids, b.positions, kv, b.attn, jnp.arange(T),
        attention_fn("reference"), llama.run_layers)).lower(params, kv, batch).as_text()
    strip = lambda t: t.split("func.func", 1)[1]
    assert strip(text) == strip(plain)
    assert "sharding" not in text and "all_reduce" not in text


def _save_hf(path, config: ModelConfig, params) -> str:
    """Our natural param tree as an HF checkpoint (the inverse of weights.load_hf_params)."""
    p = {k: np.asarray(v) for k, v in params.items() if k != "layers"}
    t = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = p["lm_head"].T
    cuts = [config.q_size, config.q_size + config.kv_size]
    for i, layer in enumerate(params["layers"]):
        w = {k: np.asarray(v) for k, v in layer.items()}
        pre = f"model.layers.{i}."
        for x, part in zip("qkv", np.split(w["wqkv"], cuts, axis=1)):
            t[pre + f"self_attn.{x}_proj.weight"] = part.T
        if "bqkv" in w:
            for x, part in zip("qkv", np.split(w["bqkv"], cuts)):
                t[pre + f"self_attn.{x}_proj.bias"] = part
        gate, up = np.split(w["w_gate_up"], 2, axis=1)
        t.update({pre + "self_attn.o_proj.weight": w["wo"].T,
                  pre + "mlp.gate_proj.weight": gate.T, pre + "mlp.up_proj.weight": up.T,
                  pre + "mlp.down_proj.weight": w["w_down"].T,
                  pre + "input_layernorm.weight": w["attn_norm"],
                  pre + "post_attention_layernorm.weight": w["mlp_norm"]})
    os.makedirs(path, exist_ok=True)
    names = sorted(t)  # two files and an index, as big checkpoints come
    files = {"model-00001-of-00002.safetensors": names[::2],
             "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in files.items():
        save_file({n: np.ascontiguousarray(t[n]) for n in part}, os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: file for file, part in files.items() for n in part}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    return str(path)


@eight_devices
@pytest.mark.parametrize("name, tp", [("llama", 2), ("llama", 4), ("qwen2", 2), ("mistral", 4)])
def test_hf_checkpoint_loads_into_shards_and_matches_hf_logits(name, tp):
    """The golden checkpoints (made by transformers) loaded sharded: each leaf equals the
    unsharded load laid out, and the logits equal HF's."""
    config = ModelConfig.from_pretrained(golden_path(name))
    mesh = parallel.make_mesh(tp)
    params = weights.load_hf_params(golden_path(name), config, "float32", mesh=mesh)
    natural = weights.load_hf_params(golden_path(name), config, "float32")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(natural)):
        np.testing.assert_array_equal(got, parallel.tp_layout(path[-1].key, np.asarray(want),
                                                              config, tp))
        assert got.sharding.spec == parallel.leaf_spec(path[-1].key, config, tp)
    golden = np.load(golden_path(name) + "/logits.npz")
    logits = nf.load_model(golden_path(name), "float32", tensor_parallel_size=tp).logits(
        golden["token_ids"])
    assert rel_err(logits, golden["logits"]) < 1e-4


@eight_devices
def test_orbax_checkpoint_restores_into_its_shards(tmp_path):
    """An orbax checkpoint restored at TP 4: every leaf's per-device block has the sharded
    shape and TP 1's values laid out; each device reads only its block (the restore target is
    sharded: `parallel.natural_shardings`) before the fused leaves' columns move."""
    config = CONFIGS["qwen2-kv2"]  # biases, tied head, KV heads duplicated at TP 4
    natural = weights.random_params(config, "float32", seed=6)
    weights.save_checkpoint(str(tmp_path / "ckpt"), config, natural)
    tp, mesh = 4, parallel.make_mesh(4)
    one = weights.restore_params(str(tmp_path / "ckpt"), config, "float32")
    params = weights.restore_params(str(tmp_path / "ckpt"), config, "float32", mesh=mesh)
    half = weights.restore_params(str(tmp_path / "ckpt"), config, "bfloat16", mesh=mesh)
    assert half["layers"][0]["wqkv"].dtype == jnp.bfloat16  # cast as it is read
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(one)):
        name = path[-1].key
        assert got.sharding.spec == parallel.leaf_spec(name, config, tp)
        block = list(parallel.tp_shape(name, want.shape, config, tp))
        for axis, part in enumerate(got.sharding.spec):
            if part == parallel.TP_AXIS:
                block[axis] //= tp
        assert {s.data.shape for s in got.addressable_shards} == {tuple(block)}, name
        np.testing.assert_array_equal(got, parallel.tp_layout(name, np.asarray(want), config,
                                                              tp))
    shardings = parallel.natural_shardings(weights.param_shapes(config), config, mesh)
    assert shardings["layers"][0]["wqkv"].spec == parallel.P(parallel.TP_AXIS, None)
    assert shardings["layers"][0]["w_down"].spec == parallel.P(parallel.TP_AXIS, None)
    logits = nf.model_loader.Model(config, params, mesh).logits(np.arange(9))
    assert rel_err(logits, nf.model_loader.Model(config, one).logits(np.arange(9))) < 1e-5


@eight_devices
def test_fused_leaves_are_never_whole_on_a_device():
    """Random init of a fused column-parallel leaf at TP 8: generated by rows, then laid out.
    Per device each program's arguments, temporaries and outputs (XLA's count) stay under
    half the leaf; generating and laying out in one program would make the whole leaf."""
    config = ModelConfig("LlamaForCausalLM", vocab_size=256, hidden_size=256,
                         intermediate_size=1024, num_layers=1, num_heads=8, num_kv_heads=2,
                         head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=512)
    tp, mesh = 8, parallel.make_mesh(8)
    key = jax.random.key(0)

    def used(program, arg):
        m = program.lower(arg).compile().memory_analysis()
        return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes

    for name in ("w_gate_up", "wqkv"):
        shape = weights.param_shapes(config)["layers"][0][name]
        leaf_bytes = 4 * int(np.prod(parallel.tp_shape(name, shape, config, tp)))
        spec = parallel.natural_spec(name, shape, config, tp)
        generate = parallel._random_program(parallel.NamedSharding(mesh, spec), shape,
                                            jnp.dtype("float32"), 0.1)
        natural = generate(key)
        assert used(generate, key) < 0.6 * leaf_bytes
        assert used(parallel._layout_program(mesh, config, name), natural) < 0.6 * leaf_bytes
        at_once = jax.jit(lambda k, shape=shape, name=name: parallel.tp_layout(
            name, weights._random_leaf(k, shape, jnp.float32, 0.1), config, tp),
            out_shardings=parallel.NamedSharding(mesh, parallel.leaf_spec(name, config, tp)))
        assert used(at_once, key) > leaf_bytes
        got = parallel.sharded_random_leaf(mesh, config, name, key, shape, jnp.float32, 0.1)
        np.testing.assert_array_equal(got, at_once(key))


@eight_devices
def test_profiler_times_the_all_reduce_at_nano_batch_sizes():
    from nanoflow_jax.pipeline import autosearch
    from nanoflow_jax.pipeline.profile import Profile, profile_ops

    config = CONFIGS["llama-kv8"]
    prof = profile_ops(config, 64, "float32", token_step=32, shares=(1.0,), contexts=(8,),
                       page_size=4, calls=1, repeats=1, progress=False, tensor_parallel_size=2)
    assert prof.tensor_parallel_size == 2 and len(prof.all_reduce) == 2
    assert all(ms > 0 for ms in prof.all_reduce) and Profile.from_json(prof.to_json()) == prof
    result = autosearch.search(prof, config.num_layers, autosearch.Workload(8, 16),
                               autosearch.SearchOptions(num_nano=(2,), granularity=32,
                                                        time_limit_s=10))
    assert result.sequential_period_ms > 2 * prof.all_reduce_ms(64)
    assert result.schedule.num_tokens == 64  # whichever wins, a valid schedule


@eight_devices
def test_sharded_load_names_a_missing_or_misshaped_tensor(tmp_path):
    import shutil

    from safetensors.numpy import load_file

    config = ModelConfig.from_pretrained(golden_path("llama"))
    tensors = load_file(golden_path("llama") + "/model.safetensors")
    mesh = parallel.make_mesh(2)
    for name, change, error in (("model.layers.1.mlp.up_proj.weight", "drop", KeyError),
                                ("model.layers.0.self_attn.k_proj.weight", "cut", ValueError)):
        out = tmp_path / change
        shutil.copytree(golden_path("llama"), out)
        bad = dict(tensors)
        if change == "drop":
            del bad[name]
        else:
            bad[name] = bad[name][:-1]
        save_file(bad, str(out / "model.safetensors"))
        with pytest.raises(error, match=re.escape(name)):
            weights.load_hf_params(str(out), config, "float32", mesh=mesh)


def _golden_greedy(name):
    g = np.load(golden_path(name) + "/greedy.npz")
    n = len([k for k in g if k.startswith("prompt_")])
    return [g[f"prompt_{i}"].tolist() for i in range(n)], [g[f"output_{i}"].tolist()
                                                           for i in range(n)]


@eight_devices
@pytest.mark.parametrize("name, tp, args", [
    ("llama", 4, {"max_num_batched_tokens": 64, "min_bucket": 64}),
    ("qwen2", 2, {"max_num_batched_tokens": 16}),  # every prompt is chunked
])
def test_engine_greedy_equals_hf_generate(name, tp, args):
    prompts, expected = _golden_greedy(name)
    llm = LLM(golden_path(name), dtype="float32", tensor_parallel_size=tp, **args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=len(expected[0]),
                                       ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@eight_devices
def test_engine_tp8_tokens_equal_tp1_without_recompiles(tmp_path):
    config = _config(2)
    path = _save_hf(tmp_path / "ckpt", config, weights.random_params(config, "float32", 3))
    prompts = [np.random.default_rng(i).integers(0, 256, n).tolist()
               for i, n in enumerate((5, 23, 40, 9))]
    args = {"dtype": "float32", "max_num_batched_tokens": 32, "min_bucket": 32,
            "max_num_seqs": 8, "page_size": 4, "num_pages": 128, "max_model_len": 96}
    outs = {}
    for tp in (1, 8):
        llm = LLM(path, tensor_parallel_size=tp, **args)  # compiles every step program
        compiled = llm.engine.runner.num_compiled
        outs[tp] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
        assert llm.engine.runner.num_compiled == compiled
    assert outs[8] == outs[1]
    kv = llm.engine.runner.kv[0][0]
    assert kv.shape[0] == 8 and kv.addressable_shards[0].data.shape[0] == 1


@eight_devices
def test_engine_rejects_a_split_the_model_cannot_take():
    with pytest.raises(ValueError, match="tensor_parallel_size=8 does not divide the 4 attention"):
        LLM("tiny-llama", tensor_parallel_size=8)


# ---- multi-host: two processes of 2 CPU devices each -----------------------------------------

_WORKER = textwrap.dedent("""
    import sys, numpy as np
    from nanoflow_jax import parallel
    addr, pid = sys.argv[1], int(sys.argv[2])
    assert parallel.maybe_initialize_distributed(addr, 2, pid)
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    from nanoflow_jax import weights
    from nanoflow_jax.config import ModelConfig
    from nanoflow_jax.models.attention import dense_attention, dense_metadata
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh(4)
    P = parallel.P
    # A psum over all four devices of both processes.
    x = jax.make_array_from_callback((4,), jax.sharding.NamedSharding(mesh, P("tp")),
                                     lambda i: np.arange(4.0)[i] + 1)
    total = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "tp"), mesh=mesh, in_specs=P("tp"),
                                  out_specs=P()))(x)
    assert float(multihost_utils.process_allgather(total, tiled=True)[0]) == 10.0
    # A TP 4 forward over both processes = TP 1 on this process's first device.
    config = ModelConfig("Qwen2ForCausalLM", 256, 64, 128, 2, 8, 2, 8, 1e-5, 1e4, 512,
                         attention_bias=True, tie_word_embeddings=True)
    params = weights.random_params(config, "float32", seed=4, mesh=mesh)
    meta = dense_metadata([16])
    tokens = np.arange(16, dtype=np.int32) * 7 % config.vocab_size
    run = lambda p, m, f: f(p, config, jnp.asarray(tokens), m.positions, None, m, None,
                            dense_attention)[0]
    tp = jax.jit(lambda p: run(p, meta, parallel.forward_fn(mesh)))(params)
    tp = multihost_utils.process_allgather(tp, tiled=True)
    with jax.default_device(jax.local_devices()[0]):
        full = weights.random_params(config, "float32", seed=4)
        one = np.asarray(jax.jit(lambda p: run(p, meta, parallel.forward_fn(None)))(full))
    err = np.linalg.norm(tp - one) / np.linalg.norm(one)
    assert err < 1e-5, err
    print("ok", pid, err)
""")


def test_two_processes_form_one_mesh_and_run_a_tp_forward():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, f"127.0.0.1:{port}", str(pid)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for pid, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {pid}" in out, out[-3000:]


def test_distributed_flags_are_checked():
    assert parallel.maybe_initialize_distributed(None) is False
    with pytest.raises(ValueError, match="need coordinator_address"):
        parallel.maybe_initialize_distributed(None, num_processes=2)
    with pytest.raises(ValueError, match="process_id must be in"):
        parallel.maybe_initialize_distributed("127.0.0.1:1", 2, 2)
    import dataclasses

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(parallel.DistributedConfig)}
    assert set(helps) == {"coordinator_address", "num_processes", "process_id"}
