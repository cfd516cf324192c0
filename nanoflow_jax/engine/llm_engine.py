"""LLMEngine: requests in, text out, one `step()` at a time (what the server and `LLM` drive).

Each `step()` schedules and dispatches iteration i+1, *then* reads iteration i's sampled tokens
(the device is already busy with i+1 while the host processes i), detokenizes them, checks stop
conditions and returns the requests that progressed. A request that finishes by EOS or a stop
string was already given one more decode in iteration i+1; that token is dropped.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import random
import time
from typing import Any

import jax
import numpy as np

from nanoflow_jax.config import EngineConfig
from nanoflow_jax.engine.model_runner import InFlight, ModelRunner
from nanoflow_jax.engine.outputs import CompletionOutput, ListPrefix, RequestOutput
from nanoflow_jax.engine.scheduler import Scheduler
from nanoflow_jax.engine.sequence import PENDING, Sequence, Status
from nanoflow_jax.engine.stats_snapshot import StatsSnapshot
from nanoflow_jax.kv_cache import PageAllocator
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.tokenizer import (IncrementalDetokenizer, Tokenizer, byte_tokenizer,
                                    detokenize_step)

log = logging.getLogger("nanoflow_jax")

_SEED_STRIDE = 0x9E3779B97F4A7C15  # sample i of a seeded request gets seed + i·stride (mod 2^64)


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    arrival_time: float
    finished_time: float | None = None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    # Host time, by part. schedule + build + process is the engine's own (Python) work;
    # launch is the jitted call, which may block when the device runtime throttles launches.
    schedule_s: float = 0.0  # the scheduler
    build_s: float = 0.0  # building the batch and the sampling tensors
    launch_s: float = 0.0  # enqueueing the jitted step
    process_s: float = 0.0  # detokenizing, stop checks, outputs
    wait_s: float = 0.0  # blocked reading a step's tokens

    @property
    def host_s(self) -> float:
        """The engine's own host work (what must stay well under the device's step time)."""
        return self.schedule_s + self.build_s + self.process_s
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    # Steady state: iterations whose batch filled the dense budget, timed dispatch to next
    # dispatch (in steady state that interval is the device step: launches block one step
    # ahead). Excludes an offline run's ramp and its decode-only tail.
    full_steps: int = 0
    full_tokens: int = 0
    full_s: float = 0.0


def _unfreeze_garbage() -> None:
    """Collect what an earlier engine froze (`_freeze_startup_objects`) and since dropped,
    before this one allocates its weights and KV cache."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


def _freeze_startup_objects() -> None:
    """Move every object alive after start-up (JAX's, the compiled programs', the engine's)
    out of the cyclic garbage collector's sight: its full collections, which streaming's
    short-lived outputs trigger every few dozen steps, then walk only what steps create
    (~10 ms a step saved on average at 1000 streamed requests on a 2-core CPU)."""
    gc.collect()
    gc.freeze()


def _load_tokenizer(model: str) -> Tokenizer:
    try:
        return Tokenizer.from_pretrained(model)
    except (FileNotFoundError, NotADirectoryError):
        return byte_tokenizer()  # presets (random weights) have no tokenizer of their own


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 stream_outputs: bool = True):
        """`stream_outputs`: `step()` returns every request that progressed, with its text so
        far (the server); False returns finished requests only and detokenizes once at the end
        unless a stop string needs the text earlier (offline `LLM`, cheaper per token)."""
        self.stream_outputs = stream_outputs
        _unfreeze_garbage()
        self.tokenizer = tokenizer or _load_tokenizer(config.model)
        self._eos_ids = self.tokenizer.eos_token_ids
        self.runner = ModelRunner(config)
        config = self.config = self.runner.config  # the knobs resolved for the backend
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.allocator = PageAllocator(self.runner.num_pages)
        self.scheduler = Scheduler(config, self.allocator, max_running=self.runner.max_num_seqs,
                                   max_pages=self.runner.max_pages)
        self.runner.warmup()
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self._last_dispatch: tuple[float, int] | None = None  # (time, tokens) of the last step
        self._inflight: InFlight | None = None
        self._next_seq_id = 0
        self._rng = random.Random(config.seed)
        _freeze_startup_objects()

    @classmethod
    def from_engine_args(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig(**kwargs))

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | dict[str, Any],
                    params: SamplingParams | None = None, arrival_time: float | None = None
                    ) -> None:
        """Queue a request. Bad input raises ValueError and changes nothing."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params)}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is "
                             f"{self.max_model_len} (prompt + at least one output token)")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        now = arrival_time if arrival_time is not None else time.time()
        seqs = []
        for i in range(params.n):
            seqs.append(Sequence(
                seq_id=self._next_seq_id, request_id=request_id, index=i,
                prompt_token_ids=list(ids), params=params,
                seed=(base_seed + i * _SEED_STRIDE) % 2**64, max_tokens=max_tokens,
                arrival_time=now))
            self._next_seq_id += 1
        detoks = [IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                  for _ in seqs]
        self.requests[request_id] = _Request(request_id, text, list(ids), seqs, detoks,
                                             now)
        for seq in seqs:
            self.scheduler.add(seq)

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple, np.ndarray)) or len(ids) == 0:
                raise ValueError("prompt_token_ids must be a non-empty list of ints")
            vocab = self.model_config.vocab_size
            for t in ids:
                if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                    raise ValueError(f"prompt_token_ids holds a non-integer {t!r}")
                if not 0 <= t < vocab:
                    raise ValueError(f"token id {t} is outside the vocabulary [0, {vocab})")
            return prompt.get("prompt"), [int(t) for t in ids]
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")

    def abort_request(self, request_id: str) -> None:
        """Stop a request wherever it is; its pages are freed at once. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def stats_snapshot(self) -> StatsSnapshot:
        """Queue lengths, KV pages and token counters as a frozen value, for monitors that must
        not read the scheduler or the allocator. O(running + waiting) host work."""
        sched, alloc = self.scheduler, self.allocator
        running_ids = frozenset(s.request_id for s in sched.running)
        return StatsSnapshot(
            running_requests=len(running_ids), running_seqs=len(sched.running),
            waiting_requests=len({s.request_id for s in sched.waiting}),
            waiting_seqs=len(sched.waiting),
            free_seq_slots=max(0, self.runner.max_num_seqs - len(sched.running)),
            kv_pages_used=alloc.num_pages - alloc.num_free, kv_pages_total=alloc.num_pages,
            prompt_tokens=self.stats.prompt_tokens,
            generation_tokens=self.stats.generated_tokens,
            preemptions=self.stats.preemptions, steps=self.stats.steps,
            running_request_ids=running_ids)

    # ---- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Dispatch the next iteration, then process the previous one's tokens."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        self.stats.schedule_s += time.perf_counter() - t0
        dispatched = (None if sched.is_empty
                      else self.runner.dispatch(sched, self.scheduler.page_table))
        if dispatched is not None:
            self._count_full_batch(sched.num_tokens)
            self.stats.steps += 1
            self.stats.prompt_tokens += sum(c.num_tokens for c in sched.prefills)
            self.stats.build_s += dispatched.build_s
            self.stats.launch_s += dispatched.launch_s
        else:
            self._last_dispatch = None  # idle: the next interval is not a step
        previous, self._inflight = self._inflight, dispatched
        if previous is None:
            return []
        t0 = time.perf_counter()
        samples = jax.device_get(previous.samples)
        t1 = time.perf_counter()
        outputs = self._process(previous, samples)
        self.stats.wait_s += t1 - t0
        self.stats.process_s += time.perf_counter() - t1
        return outputs

    def _count_full_batch(self, num_tokens: int) -> None:
        now = time.perf_counter()
        last = self._last_dispatch
        if last is not None and last[1] == self.config.max_num_batched_tokens:
            self.stats.full_steps += 1
            self.stats.full_tokens += last[1]
            self.stats.full_s += now - last[0]
        self._last_dispatch = (now, num_tokens)

    def _process(self, step: InFlight, samples) -> list[RequestOutput]:
        """Land the step's tokens, extend the texts that are kept, check the stops and make
        the outputs. O(1) work per token: nothing here walks a sequence's output."""
        now = time.time()
        tokens = samples.token_ids.tolist()  # [num_rows] ints: one conversion, not one a row
        want_logprobs = any(s.params.logprobs is not None for s, _, _ in step.owners)
        requests, finished = self.requests, Status.FINISHED
        landed = []  # (request, sequence, output index, token)
        for seq, index, row in step.owners:
            out = seq.output_token_ids
            if seq.status is finished or index >= len(out):
                continue  # finished (or aborted) while this step ran: the token is dropped
            if out[index] != PENDING:
                raise AssertionError("a sampled token landed on a known one")
            token = out[index] = tokens[row]
            if seq.first_token_time is None:
                seq.first_token_time = now
            if want_logprobs and seq.params.logprobs is not None:
                _land_logprobs(seq, token, samples, row)
            landed.append((requests[seq.request_id], seq, index, token))
        self.stats.generated_tokens += len(landed)
        # Text now only where it is needed (streaming, stop strings): one batched decode.
        stream = self.stream_outputs
        if stream:
            deltas = detokenize_step([req.detoks[seq.index] for req, seq, _, _ in landed],
                                     [token for _, _, _, token in landed])
        else:
            deltas = [""] * len(landed)
            texted = [i for i, x in enumerate(landed) if x[1].params.stop]
            if texted:
                new = detokenize_step([landed[i][0].detoks[landed[i][1].index] for i in texted],
                                      [landed[i][3] for i in texted])
                for i, delta in zip(texted, new):
                    deltas[i] = delta
        eos, check = self._eos_ids, self._check_stop
        touched: dict[str, _Request] = {}
        for (req, seq, index, token), delta in zip(landed, deltas):
            p = seq.params
            if index + 1 >= seq.max_tokens or token in eos or p.stop or p.stop_token_ids:
                check(req, seq, index, token, delta)
            if stream or req.finished_time is not None:
                touched[req.request_id] = req
        return [self._request_output(req) for req in touched.values()]

    def _check_stop(self, req: _Request, seq: Sequence, index: int, token: int,
                    delta: str) -> None:
        """Finish `seq` if `token` ends it. Its text (if kept) already includes the token's
        `delta`."""
        p = seq.params
        detok = req.detoks[seq.index]
        incremental = self.stream_outputs or bool(p.stop)
        reason, stop_reason = None, None
        if not p.ignore_eos and token in self._eos_ids:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif p.stop:
            # A stop string may straddle the previous text: search the tail that could hold it.
            before = len(detok.text) - len(delta)
            start = max(0, before - max(len(s) for s in p.stop) + 1)
            hits = [(detok.text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                detok.text = detok.text[:i + len(s)] if p.include_stop_str_in_output \
                    else detok.text[:i]
                reason, stop_reason = "stop", s
        if reason is None and index + 1 >= seq.max_tokens:
            reason = "length"
        if reason is None:
            return
        del seq.output_token_ids[index + 1:]  # the token given to a step after this one
        if not incremental:
            detok.text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
        elif stop_reason is None or isinstance(stop_reason, int):
            detok.text += detok.flush()  # characters held back for a possible multi-byte tail
        del seq.logprobs[index + 1:]
        self.scheduler.finish(seq, reason)
        seq.stop_reason = stop_reason
        if all(s.is_finished for s in req.seqs):
            req.finished_time = time.time()

    def _request_output(self, req: _Request) -> RequestOutput:
        """What `req` has so far: views of the engine's lists while it runs (O(1) each), lists
        of its own once finished."""
        seqs = req.seqs
        if len(seqs) == 1:  # the common case, without the loops
            seq = seqs[0]
            finished = seq.finish_reason is not None
            outs = [_completion(seq, req.detoks[0], finished)]
            first = seq.first_token_time
        else:
            finished = all(s.finish_reason is not None for s in seqs)
            outs = [_completion(seq, detok, finished) for seq, detok in zip(seqs, req.detoks)]
            first = min([s.first_token_time for s in seqs if s.first_token_time], default=None)
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             req.arrival_time, first, req.finished_time)


def _land_logprobs(seq: Sequence, token: int, samples, row: int) -> None:
    """Append the chosen token's logprob and the top-N of sample row `row` to `seq`'s."""
    k = seq.params.logprobs
    top = dict(zip(samples.top_ids[row, :k].tolist(), samples.top_logprobs[row, :k].tolist()))
    entry = top if token in top else {token: float(samples.logprob[row]), **top}
    seq.logprobs.append(entry)
    seq.cumulative_logprob += entry[token]


def _completion(seq: Sequence, detok: IncrementalDetokenizer, final: bool) -> CompletionOutput:
    """One sample's output: its known tokens, text and logprobs so far. `final`: lists of its
    own (copies, once); else O(1) views of the engine's lists, which only grow past them."""
    ids = seq.output_token_ids
    end = len(ids)
    while end and ids[end - 1] == PENDING:  # PENDING tokens are the last (at most two)
        end -= 1
    lps = cum = None
    if seq.params.logprobs is not None:
        lps = list(seq.logprobs) if final else ListPrefix(seq.logprobs, len(seq.logprobs))
        cum = seq.cumulative_logprob
    text = detok.text
    if seq.params.stop and seq.finish_reason is None:
        # Hold back a possible stop string's beginning: streamed text is never taken back.
        text = text[:max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]
    return CompletionOutput(seq.index, text, ids[:end] if final else ListPrefix(ids, end), cum,
                            lps, seq.finish_reason, seq.stop_reason)
