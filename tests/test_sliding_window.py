"""Sliding-window attention: which layers get a window (transformers' rules), the nano-batch
schedules and kernels that take one, and HF transformers run live (heavy).

The kernels are checked against their references in test_decode_attention.py and
test_prefill_attention.py, the paged model against the dense one in test_paged_model.py, and
the goldens `mistral` (window 16 on every layer) and `qwen2` (window 16 on layer 1) against
HF in test_model.py (logits) and test_engine.py (greedy tokens of generations that cross the
window).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.config import ModelConfig, get_preset
from nanoflow_jax.kv_cache import init_kv_cache
from nanoflow_jax.model_loader import Model
from nanoflow_jax.models import llama
from nanoflow_jax.models.paged_attention import PagedMetadata, attention_fn, paged_attention
from nanoflow_jax.pipeline.executor import make_layers_fn
from nanoflow_jax.pipeline.schedule import nano_pipelined
from tests.helpers import golden_path, rel_err
from tests.test_pipeline import PAGE, T, _as_calls, _batch, _forward, _prefill_context

BASE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}


def _windows(arch, **hf):
    cfg = ModelConfig.from_hf_dict(BASE | {"architectures": [arch]} | hf)
    return [cfg.layer_window(i) for i in range(cfg.num_layers)]


def test_which_layers_get_the_window():
    none, w = [None] * 6, 8
    assert _windows("MistralForCausalLM", sliding_window=w) == [w] * 6
    assert _windows("MistralForCausalLM", sliding_window=None) == none
    assert _windows("MixtralForCausalLM", sliding_window=w, num_local_experts=4,
                    num_experts_per_tok=2) == [w] * 6
    # Qwen2: only with use_sliding_window, on the layers from max_window_layers on.
    assert _windows("Qwen2ForCausalLM", sliding_window=w) == none
    assert _windows("Qwen2ForCausalLM", sliding_window=w, use_sliding_window=True,
                    max_window_layers=4) == [None] * 4 + [w] * 2
    assert _windows("Qwen2ForCausalLM", sliding_window=w, use_sliding_window=True,
                    max_window_layers=6) == none
    # Qwen2-MoE (transformers 5): the even layers below max_window_layers.
    assert _windows("Qwen2MoeForCausalLM", sliding_window=w, use_sliding_window=True,
                    max_window_layers=3, **MOE) == [w, None, w, None, None, None]
    # A config.json that names the layer types is read as written.
    types = ["sliding_attention", "full_attention"] * 3
    assert _windows("Qwen2ForCausalLM", sliding_window=w, use_sliding_window=True,
                    layer_types=types) == [w, None] * 3
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        _windows("MistralForCausalLM", sliding_window=w, layer_types=types[:2])


def test_windowed_configs_round_trip_and_presets():
    cfg = ModelConfig.from_hf_dict(BASE | {"architectures": ["Qwen2ForCausalLM"],
                                           "sliding_window": 8, "use_sliding_window": True,
                                           "max_window_layers": 2})
    assert cfg.full_attention_layers == (0, 1)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ValueError, match="full_attention_layers"):
        dataclasses.replace(cfg, full_attention_layers=(6,))
    mistral = get_preset("mistral-7b")  # Mistral-7B-v0.1
    assert [mistral.layer_window(i) for i in (0, 31)] == [4096, 4096]
    assert get_preset("mixtral-8x7b").sliding_window is None  # as HF's config.json has it


def test_golden_configs_have_windows():
    mistral, qwen = nf.load_config(golden_path("mistral")), nf.load_config(golden_path("qwen2"))
    assert [mistral.layer_window(i) for i in range(2)] == [16, 16]
    assert [qwen.layer_window(i) for i in range(2)] == [None, 16]


def _tiny_windowed(full_attention_layers=()):
    model = nf.load_model("tiny-mistral", dtype="float32", seed=5)
    config = dataclasses.replace(model.config, sliding_window=6,
                                 full_attention_layers=full_attention_layers)
    return model.params, config


@pytest.mark.parametrize("full_attention_layers", [(), (0,)])
def test_nano_batch_schedule_with_windows_matches_sequential(full_attention_layers):
    """The executor binds each layer's own window (every layer's, or layer 0 attending to the
    whole context): decodes with up to 40 tokens of context, chunks with prior context."""
    params, config = _tiny_windowed(full_attention_layers)
    rng = np.random.default_rng()
    batch = jax.device_put(_batch("mixed", rng, config.vocab_size))
    kv = _prefill_context(Model(config, params),
                          init_kv_cache(config, 200, PAGE, jnp.float32), rng)
    attention = attention_fn("reference")
    want, _ = _forward(params, config, kv, batch, attention, llama.run_layers)
    got, _ = _forward(params, config, kv, batch, attention,
                      make_layers_fn(nano_pipelined(T, 2, streams=False), use_streams=True,
                                     wrap_call=_as_calls))
    rows = np.asarray(batch.attn.slots) >= 0
    assert rel_err(np.asarray(got)[rows], np.asarray(want)[rows]) < 1e-5


def test_mosaic_gpu_decode_on_an_sm_share_refuses_a_window():
    cache = (jnp.zeros((1, 4, 16, 64), jnp.bfloat16),) * 2  # shapes that kernel takes
    q = jnp.zeros((2, 4, 64), jnp.bfloat16)
    k = v = jnp.zeros((2, 1, 64), jnp.bfloat16)
    meta = PagedMetadata(
        slots=jnp.array([0, 1]), decode_page_tables=jnp.zeros((2, 4), jnp.int32),
        decode_lengths=jnp.array([1, 1]), prefill_page_tables=jnp.zeros((1, 4), jnp.int32),
        prefill_query_start=jnp.array([2, 2]), prefill_seq_lens=jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="sliding_window=8: the Mosaic GPU decode kernel"):
        paged_attention(q, k, v, cache, meta, impl="interpret", sm_share=0.5, window=8)


# ---- HF transformers, run live ---------------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_logits_match_hf_transformers_past_the_window(name):
    """A fresh 90-token prompt (the window is 16) through HF and through our dense and paged
    paths; and HF still gives the committed goldens (make_golden.py is current)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(golden_path(name)).eval().float()
    golden = np.load(golden_path(name) + "/logits.npz")
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, 90)
    with torch.no_grad():
        want = hf(torch.tensor(ids)[None]).logits[0].numpy()
        committed = hf(torch.tensor(golden["token_ids"])[None]).logits[0].numpy()
    assert rel_err(committed, golden["logits"]) < 1e-5
    model = nf.load_model(golden_path(name), dtype="float32")
    assert rel_err(model.logits(ids), want) < 1e-4
    llm = nf.LLM(golden_path(name), dtype="float32", max_num_batched_tokens=32, page_size=4)
    out = llm.generate([{"prompt_token_ids": ids.tolist()}],
                       nf.SamplingParams(temperature=0.0, max_tokens=1),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [int(want[-1].argmax())]


@pytest.mark.heavy
def test_layer_rules_match_transformers():
    """Our fallback rules (no layer_types in config.json) against the layer_types that the
    installed transformers derives."""
    import transformers

    cases = [("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
             ("Qwen2Config", "Qwen2ForCausalLM", {"sliding_window": 8,
                                                  "use_sliding_window": True,
                                                  "max_window_layers": 4}),
             ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"sliding_window": 8,
                                                        "use_sliding_window": True,
                                                        "max_window_layers": 3, **MOE})]
    for hf_name, arch, kw in cases:
        hf = getattr(transformers, hf_name)(**BASE, **kw)
        types = getattr(hf, "layer_types", None) or ["sliding_attention"] * 6  # Mistral
        ours = _windows(arch, **kw)
        assert [w is not None for w in ours] == [t == "sliding_attention" for t in types], arch
