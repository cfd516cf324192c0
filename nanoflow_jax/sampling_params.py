"""`SamplingParams`: how to sample one request's output, with vLLM's names and defaults.

A frozen, validated value: every check happens in `__post_init__`, so a bad request fails with a
`ValueError` naming the field and its allowed range before it reaches the scheduler. Inputs are
normalized there too (top_k=-1 -> 0, `stop` -> tuple of str, `stop_token_ids` -> tuple of int,
numbers -> plain Python float/int), so equal settings compare and hash equal.

The device-side counterpart, one row per sequence, is `engine.sampler.SamplingTensors`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

MAX_N = 64  # most sequences one request may ask for
MAX_LOGPROBS = 20  # most top logprobs returned per token (besides the chosen token's)
MAX_SEED = 2**63  # seeds live in [0, MAX_SEED)
# Temperatures below this are greedy (as vLLM): dividing logits by ~0 would overflow.
SAMPLING_EPS = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # output sequences per prompt, in [1, MAX_N]
    temperature: float = 1.0  # >= 0; below SAMPLING_EPS = greedy (argmax)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = no limit
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1, normalized to 0) = no limit
    seed: int | None = None  # in [0, 2**63); None = the engine draws one
    max_tokens: int | None = 16  # >= 1; None = up to the context limit (the engine decides)
    stop: str | Sequence[str] | None = ()  # stop strings, normalized to a tuple of str
    stop_token_ids: Sequence[int] | None = ()  # normalized to a tuple of int
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs besides the chosen token's; 0 = chosen only
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def fail(field: str, allowed: str):
            got = getattr(self, field)
            raise ValueError(f"SamplingParams.{field} must be {allowed}, got {got!r}")

        def put(field: str, value):  # frozen: normalize through object.__setattr__
            object.__setattr__(self, field, value)

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail("n", f"an int in [1, {MAX_N}]")
        put("n", int(self.n))

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            fail("temperature", "a finite number >= 0")
        put("temperature", float(self.temperature))

        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            fail("top_p", "a number in (0, 1]")
        put("top_p", float(self.top_p))

        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "an int >= 0 (0 or -1 = no limit)")
        put("top_k", 0 if self.top_k == -1 else int(self.top_k))

        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed < MAX_SEED:
                fail("seed", "None or an int in [0, 2**63)")
            put("seed", int(self.seed))

        if self.max_tokens is not None:
            if not _is_int(self.max_tokens) or self.max_tokens < 1:
                fail("max_tokens", "None or an int >= 1")
            put("max_tokens", int(self.max_tokens))

        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                fail("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
            put("logprobs", int(self.logprobs))

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            fail("stop", "None, a non-empty str or a list of non-empty str")
        put("stop", tuple(stop))

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            fail("stop_token_ids", "None or a list of ints >= 0")
        put("stop_token_ids", tuple(int(i) for i in ids))

        for field in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "a bool")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature ~0 (< SAMPLING_EPS) or top_k == 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1
