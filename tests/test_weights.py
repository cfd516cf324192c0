"""HF safetensors loading (single, sharded, dtypes, errors), random init, orbax round trip."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nanoflow_jax as nf
from nanoflow_jax import weights
from nanoflow_jax.config import get_preset
from tests.helpers import golden_path, rel_err


def _copy_with_tensors(tmp_path, tensors, name="llama"):
    """A copy of a golden checkpoint whose tensors are replaced by `tensors` (one file)."""
    out = tmp_path / "ckpt"
    shutil.copytree(golden_path(name), out)
    os.remove(out / "model.safetensors")
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def _golden_tensors(name="llama"):
    return load_file(golden_path(name) + "/model.safetensors")


def test_sharded_checkpoint_equals_single_file(tmp_path):
    tensors = _golden_tensors()
    out = tmp_path / "sharded"
    shutil.copytree(golden_path("llama"), out)
    os.remove(out / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update({n: file for n in part})
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    golden = np.load(golden_path("llama") + "/logits.npz")
    out_logits = nf.load_model(str(out), dtype="float32").logits(golden["token_ids"])
    assert rel_err(out_logits, golden["logits"]) < 1e-4


@pytest.mark.parametrize("stored", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(tmp_path, stored):
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if stored == "bfloat16" else np.float16
    tensors = {n: t.astype(dtype) for n, t in _golden_tensors().items()}
    model = nf.load_model(_copy_with_tensors(tmp_path, tensors), dtype="float32")
    golden = np.load(golden_path("llama") + "/logits.npz")
    tol = 2e-2 if stored == "bfloat16" else 3e-3
    assert rel_err(model.logits(golden["token_ids"]), golden["logits"]) < tol


def test_missing_tensor_is_named(tmp_path):
    tensors = _golden_tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        nf.load_model(_copy_with_tensors(tmp_path, tensors), dtype="float32")


def test_wrong_shape_names_tensor_and_file(tmp_path):
    tensors = _golden_tensors()
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = np.zeros((3, 64), np.float32)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*model\.safetensors.*\(3, 64\)"):
        nf.load_model(_copy_with_tensors(tmp_path, tensors), dtype="float32")


def test_missing_qwen2_bias_is_named(tmp_path):
    tensors = _golden_tensors("qwen2")
    del tensors["model.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(KeyError, match=r"v_proj\.bias"):
        nf.load_model(_copy_with_tensors(tmp_path, tensors, "qwen2"), dtype="float32")


def test_unknown_architecture_in_checkpoint(tmp_path):
    path = _copy_with_tensors(tmp_path, _golden_tensors())
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["FalconForCausalLM"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        nf.load_model(path)


def test_no_safetensors_is_a_clear_error(tmp_path):
    shutil.copy(golden_path("llama") + "/config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        nf.load_model(str(tmp_path))


def test_random_params_deterministic_by_seed():
    cfg = get_preset("tiny-qwen2")
    a, b = weights.random_params(cfg, "bfloat16", 7), weights.random_params(cfg, "bfloat16", 7)
    c = weights.random_params(cfg, "bfloat16", 8)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    assert not bool((a["layers"][0]["wqkv"] == c["layers"][0]["wqkv"]).all())
    shapes = jax.tree.map(lambda x: tuple(x.shape), a)
    assert shapes == weights.param_shapes(cfg) and "lm_head" not in a  # tied embeddings
    assert sum(x.size for x in jax.tree.leaves(a)) == cfg.param_count


def test_orbax_round_trip_is_exact(tmp_path):
    model = nf.load_model("tiny-llama", dtype="bfloat16", seed=5)
    weights.save_checkpoint(str(tmp_path / "ckpt"), model.config, model.params)
    restored = nf.load_model(str(tmp_path / "ckpt"), dtype="bfloat16")
    assert restored.config == model.config
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and bool((x == y).all()),
                        model.params, restored.params)
    assert jax.tree.all(same)
    ids = [5, 9, 200, 3]
    np.testing.assert_array_equal(restored.logits(ids), model.logits(ids))
