"""One sequence being generated: its tokens, its KV pages and where it is in its life."""
from __future__ import annotations

import dataclasses
import enum

from nanoflow_jax.sampling_params import SamplingParams

PENDING = -1  # an output token sampled on the device but not yet read by the host


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV is gone: recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # identity semantics: sequences live in queues and sets
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the sampler's per-sequence seed
    max_tokens: int  # output cap: params.max_tokens, or what the context leaves
    arrival_time: float
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache (or being written by a step)
    pages: list[int] = dataclasses.field(default_factory=list)  # the scheduler changes them
    page_row: int = -1  # its row of the scheduler's PageTable while it holds pages
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0  # of the tokens with logprobs, summed as they land
    first_token_time: float | None = None
    sample_row: int = -1  # row of the in-flight step's samples that holds the pending token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[max(start - n, 0):end - n]

    @property
    def has_pending(self) -> bool:
        # At most the last two: one read after this step, one sampled by the step in flight.
        return PENDING in self.output_token_ids[-2:]

    @property
    def done_generating(self) -> bool:
        """No more tokens need to be scheduled (a pending last one may still finish it)."""
        return len(self.output_token_ids) >= self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
