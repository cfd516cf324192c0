"""SamplingParams: vLLM defaults, normalization, and a clear ValueError for every bad field."""
import dataclasses

import numpy as np
import pytest

from nanoflow_jax.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k) == (1, 1.0, 1.0, 0)
    assert p.seed is None and p.max_tokens == 16
    assert p.stop == () and p.stop_token_ids == ()
    assert (p.ignore_eos, p.logprobs, p.skip_special_tokens, p.include_stop_str_in_output) == (
        False, None, True, False)
    assert not p.greedy


def test_normalization():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[2, np.int64(7)], temperature=1,
                       top_p=np.float32(0.5), seed=np.int64(3))
    assert p.top_k == 0 and p.stop == ("###",) and p.stop_token_ids == (2, 7)
    assert type(p.temperature) is float and type(p.top_p) is float and type(p.seed) is int
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(n=MAX_N, logprobs=MAX_LOGPROBS, seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(logprobs=0).logprobs == 0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy  # below SAMPLING_EPS, as vLLM
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", MAX_N + 1), ("n", 1.5), ("n", True), ("n", "2"),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")),
    ("temperature", float("inf")), ("temperature", None), ("temperature", True),
    ("top_p", 0), ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("top_p", "1"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", None),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", True), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", True), ("max_tokens", 16.0),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.5), ("logprobs", False),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5), ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", 3), ("stop_token_ids", "12"),
    ("ignore_eos", 1), ("skip_special_tokens", None), ("include_stop_str_in_output", "yes"),
])
def test_invalid_field_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_error_message_gives_the_allowed_range():
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=rf"n must be an int in \[1, {MAX_N}\]"):
        SamplingParams(n=0)
    msg = rf"logprobs must be None or an int in \[0, {MAX_LOGPROBS}\]"
    with pytest.raises(ValueError, match=msg):
        SamplingParams(logprobs=21)
