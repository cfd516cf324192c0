"""What the engine returns per request (vLLM's `RequestOutput` / `CompletionOutput` shape).

Slotted: a streaming engine makes one of each per running request every step."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # everything generated so far (stop strings removed)
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per token: {token id: logprob}, chosen + top-N
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
