"""The engine thread: one loop owns the `LLMEngine`; the web server talks to it through an inbox.

    handler (event loop)                      engine thread
    ---------------------                     ------------------------------------------------
    stream = engine.submit(id, prompt, p) --> inbox --> engine.add_request --> ACCEPTED / error
    await stream.wait_accepted()               while there is work: engine.step()
    async for out in stream: ...         <--  RequestOutputs, one call_soon_threadsafe per step
    engine.abort(id) (client gone)       -->  inbox --> engine.abort_request (pages freed)

The thread blocks on a condition variable while idle (no busy spin) and steps back to back
while any request is unfinished. The thread learns the engine's state from
`engine.stats_snapshot()` after each step, never from its scheduler or allocator.

The queue is bounded: `submit` refuses (QueueFullError) when `max_queue` requests already wait
for a sequence slot, i.e. are not yet scheduled and are beyond what the engine's free slots
(`max_num_seqs` less the running sequences) take in arrival order. A burst on an idle server
fills its free slots first. When a request is first scheduled, its queue time (arrival to the
step that admitted it) goes to the metrics.

If `engine.step()` raises, the thread records the error, fails every pending request with
EngineDeadError and exits; `is_alive` turns False (the server's /health then says 503).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from nanoflow_jax.engine.outputs import CompletionOutput, RequestOutput
from nanoflow_jax.engine.stats_snapshot import StatsSnapshot
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.server.metrics import ServerMetrics, Snapshot

log = logging.getLogger("nanoflow_jax.server")


class EngineDeadError(RuntimeError):
    """The engine loop has died; the request cannot complete."""


class QueueFullError(RuntimeError):
    """max_queue requests are already waiting for a slot."""


class DrainingError(RuntimeError):
    """The server is shutting down and takes no new requests."""


_ACCEPTED = object()  # first item of a stream once add_request succeeded


class RequestStream:
    """The outputs of one request: filled by the engine thread, read by one coroutine.

    Outputs are cumulative (each holds all text so far), so a consumer that falls behind
    reads only the newest one: `__aiter__` coalesces whatever has piled up.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int,
                 arrival_time: float):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.n = n
        self.arrival_time = arrival_time
        self.done = False  # the consumer has seen the final output or an error
        self._queue: asyncio.Queue = asyncio.Queue()
        # Engine-thread bookkeeping.
        self._last: RequestOutput | None = None
        self._first_token_seen = False

    def _put(self, item: Any) -> None:  # on the event loop
        self._queue.put_nowait(item)

    async def wait_accepted(self) -> None:
        """Returns once the engine queued the request; raises what add_request raised."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        assert item is _ACCEPTED, item

    async def __aiter__(self):
        while not self.done:
            item = await self._queue.get()
            while not self._queue.empty():  # only the newest cumulative output matters
                item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if item.finished:
                self.done = True
            yield item


@dataclasses.dataclass
class _Add:
    stream: RequestStream
    prompt: Any
    params: SamplingParams


@dataclasses.dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Runs an LLMEngine (or anything with its interface) on a thread of its own."""

    def __init__(self, engine, max_queue: int = 256, metrics: ServerMetrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.draining = False  # set on the event loop (or a signal handler): refuse new work
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._inbox: list[_Add | _Abort] = []
        self._inbox_adds = 0
        self._streams: dict[str, RequestStream] = {}  # accepted (or about to be), not finished
        # Submitted and not yet scheduled, in arrival order: request id -> sequences (n); and
        # how many of those sequences the engine already holds (in its scheduler's queue).
        self._unscheduled: dict[str, int] = {}
        self._handed: set[str] = set()  # the unscheduled ones add_request took
        self._unscheduled_in_engine = 0  # their sequences
        self._stats: StatsSnapshot = engine.stats_snapshot()  # the engine's, after the last step
        self._stop = False
        self._abort_all = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event-loop side -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanoflow-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_active(self) -> int:
        """Requests accepted (or being accepted) and not finished."""
        with self._cond:
            return len(self._streams)

    @property
    def num_queued(self) -> int:
        """What max_queue limits: requests waiting for a sequence slot."""
        with self._cond:
            return self._waiting_for_slot()

    def _waiting_for_slot(self) -> int:  # with _cond held
        """Unscheduled requests beyond what the free slots take, first come first served.
        Sequences already waiting in the engine that are not theirs (preempted ones, the rest
        of a request partly admitted) are ahead of them."""
        ahead = max(0, self._stats.waiting_seqs - self._unscheduled_in_engine)
        room = self._stats.free_seq_slots - ahead
        for i, n in enumerate(self._unscheduled.values()):
            if n > room:
                return len(self._unscheduled) - i
            room -= n
        return 0

    def submit(self, request_id: str, prompt: str | dict[str, Any], params: SamplingParams,
               prompt_token_ids: list[int], arrival_time: float | None = None
               ) -> RequestStream:
        """Hands a request to the engine thread; raises QueueFullError / DrainingError /
        EngineDeadError instead of queueing. Errors of add_request itself (ValueError) come
        out of `stream.wait_accepted()`."""
        if self.draining:
            raise DrainingError("the server is shutting down")
        stream = RequestStream(request_id, list(prompt_token_ids), params.n,
                               time.time() if arrival_time is None else arrival_time)
        with self._cond:
            if self.error is not None or not self.is_alive:
                raise EngineDeadError(f"the engine is not running ({self.error!r})")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._waiting_for_slot() >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting for a "
                                     f"slot")
            self._streams[request_id] = stream
            self._unscheduled[request_id] = params.n
            self._inbox.append(_Add(stream, prompt, params))
            self._inbox_adds += 1
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone); its pages are freed. Finished ids are ignored."""
        with self._cond:
            if request_id in self._streams:
                self._inbox.append(_Abort(request_id))
                self._cond.notify()

    def abort_all(self) -> None:
        with self._cond:
            self._abort_all = True
            self._cond.notify()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests, wait up to timeout_s for the accepted ones, abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        if self.num_active:
            log.info("draining: waiting up to %.1fs for %d request(s)", timeout_s,
                     self.num_active)
        while self.num_active and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.num_active and self.is_alive:
            log.warning("drain timeout: aborting %d request(s)", self.num_active)
            self.abort_all()
            deadline = time.monotonic() + 5.0
            while self.num_active and self.is_alive and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the handlers see their final outputs

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort everything and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # ---- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._publish()
            while True:
                deliveries: list[tuple[RequestStream, Any]] = []
                with self._cond:
                    while not (self._inbox or self._stop or self._abort_all
                               or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    commands, self._inbox, self._inbox_adds = self._inbox, [], 0
                    for cmd in commands:
                        if isinstance(cmd, _Add):
                            self._add(cmd, deliveries)
                        else:
                            self._abort(cmd.request_id, deliveries)
                    stop, abort_all = self._stop, self._abort_all
                    if stop or abort_all:
                        self._abort_all = False
                        for rid in list(self._streams):
                            self._abort(rid, deliveries)
                    if commands or stop or abort_all:
                        self._stats = self.engine.stats_snapshot()
                        self._note_scheduled(self._stats.running_request_ids, time.time())
                self._deliver(deliveries)
                self._publish()
                if stop:
                    return
                if self.engine.has_unfinished_requests():
                    scheduled_at = time.time()  # step() schedules first, then waits and reads
                    outputs = self.engine.step()
                    stats = self.engine.stats_snapshot()
                    deliveries = []
                    with self._cond:
                        self._stats = stats
                        self._note_scheduled(stats.running_request_ids, scheduled_at)
                        now = time.time()
                        for out in outputs:
                            self._on_output(out, now, deliveries)
                    self._deliver(deliveries)
                self._publish()
        except BaseException as e:  # noqa: BLE001 -- anything from step() kills the engine
            log.exception("the engine loop failed; failing all pending requests")
            with self._cond:
                self.error = e
                streams = list(self._streams.values())
                self._streams.clear()
                self._unscheduled.clear()
                self._handed.clear()
                self._unscheduled_in_engine = 0
                self._inbox, self._inbox_adds = [], 0
            err = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
            for s in streams:
                self.metrics.observe_finished(time.time() - s.arrival_time, None,
                                              ["error"] * s.n)
            self._deliver([(s, err) for s in streams])

    def _add(self, cmd: _Add, deliveries: list) -> None:
        stream = cmd.stream
        rid = stream.request_id
        if self._streams.get(rid) is not stream:
            return  # aborted before it got here
        try:
            self.engine.add_request(rid, cmd.prompt, cmd.params, arrival_time=stream.arrival_time)
        except ValueError as e:
            del self._streams[rid]
            self._unscheduled.pop(rid, None)  # not in the engine: nothing to subtract
            deliveries.append((stream, e))
            return
        except Exception as e:  # noqa: BLE001 -- a bad request must not take the engine down
            log.exception("add_request(%s) failed", rid)
            del self._streams[rid]
            self._unscheduled.pop(rid, None)  # not in the engine: nothing to subtract
            deliveries.append((stream, RuntimeError(f"{type(e).__name__}: {e}")))
            return
        if rid in self._unscheduled:
            self._handed.add(rid)
            self._unscheduled_in_engine += self._unscheduled[rid]
        deliveries.append((stream, _ACCEPTED))

    def _abort(self, rid: str, deliveries: list) -> None:
        stream = self._streams.pop(rid, None)
        self._forget_unscheduled(rid)
        self.engine.abort_request(rid)
        if stream is None:
            return
        last = stream._last
        if last is None:
            outs = [CompletionOutput(i, "", [], None, None, "abort") for i in range(stream.n)]
            final = RequestOutput(rid, None, stream.prompt_token_ids, outs, True,
                                  stream.arrival_time)
        else:
            outs = [dataclasses.replace(c, finish_reason=c.finish_reason or "abort")
                    for c in last.outputs]
            final = dataclasses.replace(last, outputs=outs, finished=True,
                                        finished_time=time.time())
        self.metrics.observe_finished(time.time() - stream.arrival_time, None,
                                      [c.finish_reason for c in final.outputs])
        deliveries.append((stream, final))

    def _on_output(self, out: RequestOutput, now: float, deliveries: list) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return  # aborted while its last step ran
        if not stream._first_token_seen and any(c.token_ids for c in out.outputs):
            stream._first_token_seen = True
            self.metrics.observe_first_token((out.first_token_time or now) - stream.arrival_time)
        stream._last = out
        if out.finished:
            del self._streams[out.request_id]
            self._forget_unscheduled(out.request_id)
            end = out.finished_time or now
            longest = max(len(c.token_ids) for c in out.outputs)
            tpot = None
            if longest > 1 and out.first_token_time is not None:
                tpot = (end - out.first_token_time) / (longest - 1)
            self.metrics.observe_finished(end - stream.arrival_time, tpot,
                                          [c.finish_reason or "stop" for c in out.outputs])
        deliveries.append((stream, out))

    def _note_scheduled(self, running_ids: frozenset[str], scheduled_at: float) -> None:
        """Requests now running leave the unscheduled set; their queue time is observed."""
        if not self._unscheduled or not running_ids:
            return
        for rid in [r for r in self._unscheduled if r in running_ids]:
            self._forget_unscheduled(rid)
            stream = self._streams.get(rid)
            if stream is not None:
                self.metrics.observe_queue_time(scheduled_at - stream.arrival_time)

    def _forget_unscheduled(self, rid: str) -> None:
        """`rid` was scheduled, aborted or finished."""
        n = self._unscheduled.pop(rid, 0)
        if rid in self._handed:
            self._handed.remove(rid)
            self._unscheduled_in_engine -= n

    def _publish(self) -> None:
        with self._cond:
            s, inbox = self._stats, self._inbox_adds
        self.metrics.publish(Snapshot(
            running=s.running_requests, waiting=s.waiting_requests + inbox,
            kv_pages_used=s.kv_pages_used, kv_pages_total=s.kv_pages_total,
            prompt_tokens=s.prompt_tokens, generation_tokens=s.generation_tokens,
            preemptions=s.preemptions))

    def _deliver(self, items: list[tuple[RequestStream, Any]]) -> None:
        if not items or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver_now, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver_now(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream._put(item)
