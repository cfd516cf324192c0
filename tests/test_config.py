"""ModelConfig from HF config.json dicts and the presets."""
import json

import pytest

from nanoflow_jax.config import PRESETS, ModelConfig, get_preset
from tests.helpers import golden_path


def _hf(name):
    with open(golden_path(name) + "/config.json") as f:
        return json.load(f)


def test_reads_llama3_rope_scaling_old_and_new_style():
    new = ModelConfig.from_hf_dict(_hf("llama"))  # transformers 5: rope_parameters
    old_style = {k: v for k, v in _hf("llama").items() if k != "rope_parameters"}
    old_style["rope_theta"] = 500000.0
    old_style["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    old = ModelConfig.from_hf_dict(old_style)
    assert new == old
    assert new.rope_theta == 500000.0 and new.rope_scaling.factor == 8.0
    assert new.head_dim == 16 and new.num_kv_heads == 2


def test_unknown_architecture_is_a_clear_error():
    hf = _hf("llama") | {"architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_dict(hf)


def test_missing_field_is_named():
    hf = _hf("qwen2")
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf_dict(hf)


def test_unsupported_rope_scaling_is_rejected():
    hf = _hf("mistral") | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict(hf)


@pytest.mark.parametrize(
    "name, billions",  # published parameter counts of the checkpoints
    [("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-2-70b", 68.98),
     ("llama-3-8b", 8.03), ("llama-3-70b", 70.55), ("mistral-7b", 7.24),
     ("qwen2-7b", 7.62), ("qwen2-72b", 72.71)],
)
def test_presets_have_the_real_shapes(name, billions):
    assert get_preset(name).param_count / 1e9 == pytest.approx(billions, abs=0.01)


def test_hf_dict_round_trip_for_every_preset():
    for cfg in PRESETS.values():
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("llama-9-1t")
