"""The model against HF transformers (goldens), and packing on the token axis."""
import jax.numpy as jnp
import numpy as np
import pytest

import nanoflow_jax as nf
from nanoflow_jax.models import llama
from nanoflow_jax.models.attention import dense_attention, dense_metadata
from tests.helpers import GOLDEN_MODELS, golden_path, rel_err


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_logits_match_hf_transformers_fp32(name):
    golden = np.load(golden_path(name) + "/logits.npz")
    model = nf.load_model(golden_path(name), dtype="float32")
    out = model.logits(golden["token_ids"])
    assert out.dtype == np.float32 and out.shape == golden["logits"].shape
    assert rel_err(out, golden["logits"]) < 1e-4


def test_golden_configs_exercise_the_features():
    assert nf.load_config(golden_path("llama")).rope_scaling is not None
    qwen = nf.load_config(golden_path("qwen2"))
    assert qwen.attention_bias and qwen.tie_word_embeddings
    assert nf.load_config(golden_path("mistral")).num_kv_heads == 1


def test_bf16_close_to_fp32():
    golden = np.load(golden_path("llama") + "/logits.npz")
    out = nf.load_model(golden_path("llama"), dtype="bfloat16").logits(golden["token_ids"])
    assert rel_err(out, golden["logits"]) < 3e-2


def test_prefix_logits_do_not_depend_on_later_tokens():
    model = nf.load_model("tiny-llama", dtype="float32", seed=3)
    ids = np.random.default_rng().integers(0, model.config.vocab_size, 30)
    full = model.logits(ids)
    assert rel_err(model.logits(ids[:11]), full[:11]) < 1e-5


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_packed_sequences_equal_each_alone(preset):
    model = nf.load_model(preset, dtype="float32", seed=1)
    cfg = model.config
    rng = np.random.default_rng()
    lens = [int(n) for n in rng.integers(1, 20, 4)]
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lens]
    pad_to = sum(lens) + 5  # padding tokens at the end must not disturb anything
    tokens = np.concatenate(seqs + [np.zeros(5, np.int64)]).astype(np.int32)
    meta = dense_metadata(lens, pad_to=pad_to)
    logits, _ = llama.forward(
        model.params, cfg, jnp.asarray(tokens), meta.positions, None, meta, None, dense_attention
    )
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    start = 0
    for seq, n in zip(seqs, lens):
        assert rel_err(logits[start:start + n], model.logits(seq)) < 1e-5
        start += n


def test_logits_only_where_asked():
    model = nf.load_model("tiny-mistral", dtype="float32")
    ids = np.arange(12) % model.config.vocab_size
    meta = dense_metadata([12])
    picked, _ = llama.forward(
        model.params, model.config, jnp.asarray(ids, jnp.int32), meta.positions, None, meta,
        jnp.asarray([3, 11]), dense_attention,
    )
    assert picked.shape == (2, model.config.vocab_size)
    assert rel_err(picked, model.logits(ids)[[3, 11]]) < 1e-6


def test_logits_rejects_bad_ids():
    model = nf.load_model("tiny-llama", dtype="float32")
    with pytest.raises(ValueError, match="token ids"):
        model.logits([0, model.config.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        model.logits([])
