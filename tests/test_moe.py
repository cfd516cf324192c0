"""Mixture-of-experts models (Mixtral, Qwen2-MoE): HF goldens, HF greedy parity in the engine,
routing and grouped GEMMs against plain references, token slicing, configs, loading."""
import dataclasses
import functools
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nanoflow_jax as nf
from nanoflow_jax import LLM, SamplingParams, weights
from nanoflow_jax.config import ModelConfig, get_preset
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.model_loader import Model
from nanoflow_jax.models import llama, moe
from nanoflow_jax.models.paged_attention import attention_fn
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.schedule import nano_batched, nano_pipelined
from tests.helpers import golden_path, rel_err
from tests.test_pipeline import PAGE, T, _as_calls, _batch, _forward, _prefill_context

MOE_GOLDENS = ("mixtral", "qwen2_moe")


@functools.cache
def _tiny(preset: str):
    """A tiny preset's fp32 model with random weights, loaded once per test run."""
    return nf.load_model(preset, dtype="float32", seed=7)


_moe_block = jax.jit(moe.moe_block, static_argnums=2)


def _hf(name):
    with open(golden_path(name) + "/config.json") as f:
        return json.load(f)


# ---- against HF transformers ------------------------------------------------------------


@pytest.mark.parametrize("name", MOE_GOLDENS)
def test_logits_match_hf_transformers_fp32(name):
    golden = np.load(golden_path(name) + "/logits.npz")
    model = nf.load_model(golden_path(name), dtype="float32")
    out = model.logits(golden["token_ids"])
    assert out.shape == golden["logits"].shape
    assert rel_err(out, golden["logits"]) < 1e-4


@pytest.mark.parametrize("name", MOE_GOLDENS)
def test_goldens_depend_on_the_renormalisation(name):
    """Flipping norm_topk_prob moves the logits far: the goldens check how routing weights
    are normalised, not only which experts run."""
    golden = np.load(golden_path(name) + "/logits.npz")
    model = nf.load_model(golden_path(name), dtype="float32")
    flipped = dataclasses.replace(model.config, norm_topk_prob=not model.config.norm_topk_prob)
    out = Model(flipped, model.params).logits(golden["token_ids"])
    assert rel_err(out, golden["logits"]) > 1e-2


def test_golden_configs_exercise_the_features():
    mixtral = nf.load_config(golden_path("mixtral"))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (4, 2,
                                                                                          True)
    assert mixtral.shared_expert_intermediate_size == 0 and mixtral.sliding_window is None
    qwen = nf.load_config(golden_path("qwen2_moe"))
    assert not qwen.norm_topk_prob and qwen.shared_expert_intermediate_size == 80
    assert qwen.mlp_only_layers == (1,) and qwen.attention_bias
    layers = nf.load_model(golden_path("qwen2_moe"), dtype="float32").params["layers"]
    assert ["router" in layer for layer in layers] == [True, False, True]
    assert "w_gate_up" in layers[1] and "shared_gate" in layers[0]


@pytest.mark.parametrize("name", MOE_GOLDENS)
def test_bf16_close_to_fp32(name):
    """Per token: bf16 rounding of the router logits flips a near tie now and then, and such a
    token takes another expert (as HF's bf16 model would); every other token stays close."""
    golden = np.load(golden_path(name) + "/logits.npz")
    out = nf.load_model(golden_path(name), dtype="bfloat16").logits(golden["token_ids"])
    errs = np.array([rel_err(o, g) for o, g in zip(out, golden["logits"])])
    assert np.median(errs) < 3e-2 and np.mean(errs < 5e-2) >= 0.9


GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("name, engine_args", [
    ("mixtral", dict(max_num_batched_tokens=64, min_bucket=64)),
    ("qwen2_moe", dict(max_num_batched_tokens=32, min_bucket=32)),  # prompts are chunked
])
def test_engine_greedy_equals_hf_generate(name, engine_args):
    g = np.load(golden_path(name) + "/greedy.npz")
    n = len([k for k in g if k.startswith("prompt_")])
    llm = LLM(golden_path(name), dtype="float32", **engine_args)
    outs = llm.generate([{"prompt_token_ids": g[f"prompt_{i}"].tolist()} for i in range(n)],
                        GREEDY, use_tqdm=False)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == g[f"output_{i}"].tolist()


# ---- routing and grouped GEMMs against plain references ----------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_route_is_softmax_then_top_k(normalize):
    rng = np.random.default_rng()
    logits = rng.normal(size=(50, 8)).astype(np.float32) * 3
    weights, experts = moe.route(jnp.asarray(logits), 3, normalize)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want_experts = np.argsort(-probs, axis=-1, kind="stable")[:, :3]
    want = np.take_along_axis(probs, want_experts, -1)
    if normalize:
        want /= want.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(experts), want_experts)
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


def test_sort_by_expert_groups_pairs_stably():
    rng = np.random.default_rng()
    experts = rng.integers(0, 6, (40, 2))
    experts[:, 1] = (experts[:, 0] + 1 + rng.integers(0, 5, 40)) % 6  # distinct per token
    order, sizes = moe.sort_by_expert(jnp.asarray(experts, jnp.int32), 7)
    flat = experts.reshape(-1)
    np.testing.assert_array_equal(np.asarray(order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=7))
    assert int(sizes[6]) == 0


def _grouped_reference(x, w, sizes):
    out, start = np.zeros((x.shape[0], w.shape[2])), 0
    for e, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[e]
        start += n
    return out


def test_grouped_matmul_xla_matches_per_group_products():
    rng = np.random.default_rng()
    x = rng.normal(size=(30, 16)).astype(np.float32)
    w = rng.normal(size=(4, 16, 24)).astype(np.float32)
    sizes = np.array([7, 0, 20, 3])  # an empty group
    out = moe.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32),
                             impl="xla")
    assert rel_err(out, _grouped_reference(x, w, sizes)) < 1e-5
    with pytest.raises(ValueError, match="grouped GEMM impl"):
        moe.grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl="cutlass")


@pytest.fixture
def mosaic_interpreted(monkeypatch):
    """JAX's Mosaic GPU ragged dot through the Mosaic GPU interpreter: its public function has
    no interpret flag, so its `plgpu.kernel` gets one."""
    from jax.experimental.pallas import mosaic_gpu
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    from pallas_kernels._compat import mosaic_gpu_interpret_params

    proxy = types.SimpleNamespace(**{k: getattr(mosaic_gpu, k) for k in dir(mosaic_gpu)
                                     if not k.startswith("__")})
    proxy.kernel = functools.partial(mosaic_gpu.kernel, interpret=mosaic_gpu_interpret_params())
    monkeypatch.setattr(ragged_dot_mgpu, "plgpu", proxy)


def test_mosaic_grouped_matmul_in_interpret_mode(mosaic_interpreted):
    """The GPU path: rows padded to row blocks, empty groups, groups straddling blocks."""
    rng = np.random.default_rng()
    x = rng.normal(size=(90, 64)).astype(np.float32)
    w = rng.normal(size=(3, 64, 128)).astype(np.float32)
    sizes = np.array([41, 0, 49])
    out = moe.mosaic_grouped_matmul(jnp.asarray(x), jnp.asarray(w),
                                    jnp.asarray(sizes, jnp.int32), block_m=64, block_n=64,
                                    block_k=64)
    assert out.shape == (90, 128)
    assert rel_err(out, _grouped_reference(x, w, sizes)) < 1e-5
    with pytest.raises(ValueError, match="N % 64"):
        moe.mosaic_grouped_matmul(jnp.asarray(x), jnp.asarray(w[:, :, :96]),
                                  jnp.asarray(sizes, jnp.int32), block_m=64, block_n=64)


def test_default_gemm_impl_on_the_cpu_is_xla():
    assert moe.default_gemm_impl(jnp.bfloat16, 4096, 28672) == "xla"


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_moe_block_matches_every_expert_on_every_token(preset):
    model = _tiny(preset)
    layer = model.params["layers"][0]
    h = jax.random.normal(jax.random.key(np.random.default_rng().integers(1 << 30)), (45, 64))
    for norm in (True, False):
        config = dataclasses.replace(model.config, norm_topk_prob=norm)
        got = _moe_block(layer, h, config)
        assert rel_err(got, moe.moe_block_reference(layer, h, config)) < 1e-5


def test_moe_block_on_token_slices_equals_whole_batch():
    """Routing is per token: a nano-batch (a slice of the token axis) gets the rows it would
    get in the whole batch."""
    model = _tiny("tiny-qwen2-moe")
    layer = model.params["layers"][2]
    h = jax.random.normal(jax.random.key(3), (64, 64))
    whole = _moe_block(layer, h, model.config)
    parts = [_moe_block(layer, h[s:e], model.config) for s, e in ((0, 16), (16, 40), (40, 64))]
    assert rel_err(jnp.concatenate(parts), whole) < 1e-6


@pytest.mark.parametrize("schedule", [nano_batched(T, 2), nano_pipelined(T, 2, streams=False)],
                         ids=lambda s: s.name)
def test_nano_batch_schedule_matches_sequential(schedule):
    model = _tiny("tiny-qwen2-moe")
    rng = np.random.default_rng()
    batch = jax.device_put(_batch("mixed", rng, model.config.vocab_size))
    kv = _prefill_context(model, init_kv_cache(model.config, 200, PAGE, jnp.float32), rng)
    attention = attention_fn("reference")
    want, _ = _forward(model.params, model.config, kv, batch, attention, llama.run_layers)
    got, _ = _forward(model.params, model.config, kv, batch, attention,
                      make_layers_fn(schedule, use_streams=True, wrap_call=_as_calls))
    rows = np.asarray(batch.attn.slots) >= 0
    assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5


# ---- configs, presets, parameters ----------------------------------------------------------


@pytest.mark.parametrize("name, total, active", [  # published counts, in billions
    ("mixtral-8x7b", 46.70, 12.88), ("qwen1.5-moe-a2.7b", 14.32, 2.69),
    ("qwen2-57b-a14b", 57.41, 14.25)])
def test_presets_have_the_real_shapes(name, total, active):
    cfg = get_preset(name)
    assert cfg.param_count / 1e9 == pytest.approx(total, abs=0.01)
    assert cfg.active_param_count / 1e9 == pytest.approx(active, abs=0.01)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_active_params_of_a_dense_model_are_all():
    cfg = get_preset("llama-3-8b")
    assert cfg.active_param_count == cfg.param_count


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_param_count_counts_the_param_tree(preset):
    cfg = get_preset(preset)
    params = weights.random_params(cfg, "float32", seed=0)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count
    experts = params["layers"][0]["experts_gate_up"]  # [E, D, 2F]: N(0, 1/D), distinct
    assert float(jnp.std(experts)) == pytest.approx(cfg.hidden_size ** -0.5, rel=0.1)
    assert not np.allclose(experts[0], experts[1])


def test_qwen2_moe_sparse_step():
    hf = _hf("qwen2_moe") | {"num_hidden_layers": 6, "decoder_sparse_step": 2,
                             "mlp_only_layers": [3]}
    cfg = ModelConfig.from_hf_dict(hf)
    # HF: layer i is sparse when (i + 1) % step == 0 and i is not in mlp_only_layers.
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_bad_moe_configs_name_the_field():
    hf = _hf("mixtral")
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelConfig.from_hf_dict({k: v for k, v in hf.items() if k != "num_local_experts"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf_dict(hf | {"num_experts_per_tok": 5})


def _checkpoint_copy(tmp_path, name, tensors=None, config_update=None):
    out = tmp_path / name
    shutil.copytree(golden_path(name), out)
    if tensors is not None:
        os.remove(out / "model.safetensors")
        save_file(tensors, str(out / "model.safetensors"))
    if config_update:
        hf = _hf(name) | config_update
        with open(out / "config.json", "w") as f:
            json.dump(hf, f)
    return str(out)


def test_missing_or_misshaped_expert_is_named(tmp_path):
    tensors = load_file(golden_path("mixtral") + "/model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(KeyError, match=r"experts\.3\.w3\.weight"):
        nf.load_model(_checkpoint_copy(tmp_path / "a", "mixtral", missing), dtype="float32")
    qwen_shared = "model.layers.0.mlp.shared_expert_gate.weight"
    qtensors = load_file(golden_path("qwen2_moe") + "/model.safetensors")
    qtensors[qwen_shared] = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match=r"shared_expert_gate\.weight.*\(2, 64\)"):
        nf.load_model(_checkpoint_copy(tmp_path / "b", "qwen2_moe", qtensors), dtype="float32")


def test_bench_moe_script_runs_on_the_cpu(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, "profiling/bench_moe.py", "--model=tiny-mixtral",
                           "--tokens=32", "--repeats=1", "--calls=1"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "bench_moe.jsonl").read_text().splitlines()]
    assert {(r["what"], r["impl"]) for r in rows} == {
        (w, i) for w in ("gate_up", "down", "block") for i in ("xla", "dense")}
    assert all(r["ms"] > 0 and r["err"] < 1e-2 for r in rows)
    grouped = [r for r in rows if r["what"] == "gate_up" and r["impl"] == "xla"][0]
    assert sum(grouped["group_sizes"]) == 32 * 2  # T tokens x top-2
