"""What the engine returns per request (vLLM's `RequestOutput` / `CompletionOutput` shape).

Slotted: a streaming engine makes one of each per running request every step. A running
request's outputs hold `ListPrefix` views of the engine's token and logprob lists (O(1) to
make, where a copy is O(length) every step); a finished request's hold lists of their own.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence


class ListPrefix(Sequence):
    """The first `n` items of a list that its owner only appends to (or cuts after `n`): a
    read-only view that stays what it was when made. Indexing and `len` are O(1); slicing
    and `list()` copy; `==` compares items with any sequence."""

    __slots__ = ("_items", "_n")

    def __init__(self, items: list, n: int):  # 0 <= n <= len(items): unchecked, made per step
        self._items, self._n = items, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)  # bounded by n when step > 0
            return self._items[start:stop:step] if step > 0 else self._items[:self._n][i]
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} of a sequence of {self._n}")
        return self._items[i % self._n]

    def __iter__(self):
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ListPrefix):
            other = other._items[:other._n]
        if isinstance(other, (list, tuple)):
            return len(other) == self._n and self._items[:self._n] == list(other)
        return NotImplemented

    __hash__ = None  # a view compares by value, like the list it stands for

    def __repr__(self) -> str:
        return repr(self._items[:self._n])


@dataclasses.dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # everything generated so far (stop strings removed)
    token_ids: Sequence[int]  # a list once finished; a ListPrefix view while running
    cumulative_logprob: float | None
    # Per token: {token id: logprob}, chosen + top-N; a list once finished, else a view.
    logprobs: Sequence[dict[int, float]] | None
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
