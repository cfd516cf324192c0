"""OpenAI API shapes: request bodies (pydantic), error bodies, and the SSE framing.

Requests are validated in two layers: pydantic checks types (strict: "5" is not an int and
`true` is not a number), then `to_sampling_params` checks ranges: OpenAI's documented limits
first, then `SamplingParams`, whose ValueError names the offending field. Either way the client
gets a 400 with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

The API's limits (OpenAI's, as vLLM's server applies them):
    temperature   in [0, MAX_TEMPERATURE] = [0, 2]
    top_p         in (0, 1]
    top_k         -1 or 0 (no limit), or in [1, vocabulary size]   (vLLM's extra)
    stop          at most MAX_STOP_STRINGS = 16 strings (OpenAI documents 4; more is accepted,
                  as clients such as evaluation harnesses send longer lists)
    logprobs      /v1/completions: in [0, MAX_COMPLETION_LOGPROBS] = [0, 5]
    top_logprobs  /v1/chat/completions: in [0, MAX_TOP_LOGPROBS] = [0, 20]
    n             in [1, MAX_N] = [1, 64]
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from nanoflow_jax.sampling_params import MAX_LOGPROBS, SamplingParams

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take JSON integers (1 -> 1.0)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
MAX_TOP_LOGPROBS = min(20, MAX_LOGPROBS)  # chat completions


class APIError(Exception):
    """An error the client sees as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_FIELD = re.compile(r"SamplingParams\.(\w+)")


def sampling_error(err: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """A SamplingParams ValueError as a 400 whose `param` is the request's field name."""
    m = _FIELD.search(str(err))
    param = m.group(1) if m else None
    if param and renames:
        param = renames.get(param, param)
    message = str(err).replace("SamplingParams.", "") if m else str(err)
    return bad_request(message, param)


# ---- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share (OpenAI's names, plus vLLM's extras: top_k, ignore_eos, ...)."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI does

    model: Str
    max_tokens: Int | None = None
    temperature: Float | None = None  # None = 1.0
    top_p: Float | None = None  # None = 1.0
    top_k: Int | None = None  # None = no limit
    n: Int = 1
    stop: Str | list[Str] | None = None
    seed: Int | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    user: Str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, vocab_size: int,
                         renames: dict[str, str] | None = None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (only 0 or null)", name)
        t = self.temperature
        if t is not None and not 0 <= t <= MAX_TEMPERATURE:  # NaN fails too
            raise bad_request(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {t!r}",
                              "temperature")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings, got "
                              f"{len(self.stop)}", "stop")
        if self.top_k is not None and self.top_k > vocab_size:
            raise bad_request(f"top_k must be -1 or 0 (no limit) or in [1, {vocab_size}] (the "
                              f"vocabulary size), got {self.top_k}", "top_k")
        try:
            return SamplingParams(
                n=self.n,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                seed=self.seed,
                max_tokens=max_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
            )
        except ValueError as e:
            raise sampling_error(e, renames) from None


class CompletionRequest(_SamplingFields):
    # A string, a list of token ids, or a batch of one of those (batches > 1 are refused).
    prompt: Str | list[Int] | list[Str] | list[list[Int]]
    max_tokens: Int | None = 16  # the legacy API's default
    logprobs: Int | None = None  # top-N logprobs per token (0 = the chosen token only)
    echo: Bool = False
    suffix: Str | None = None

    def to_sampling_params(self, vocab_size: int) -> SamplingParams:
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got "
                              f"{self.logprobs}", "logprobs")
        return self._sampling_params(self.max_tokens, self.logprobs, vocab_size)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[TextPart] | None = None
    name: Str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None  # the newer name; wins over max_tokens
    logprobs: Bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: Bool = True

    def to_sampling_params(self, vocab_size: int) -> SamplingParams:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                              f"{self.top_logprobs}", "top_logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            if self.top_logprobs:
                raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        renames = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        return self._sampling_params(max_tokens, lp, vocab_size, renames)


# ---- responses ------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
