"""Run the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

The first signal does not close the listening socket (uvicorn's default): the server keeps
answering, refuses new generation requests with 503 (and /health says 503, so a load balancer
stops routing here), waits up to `drain_timeout_s` for the requests already accepted, aborts
the rest, then shuts down through uvicorn's usual path (lifespan shutdown stops the engine
thread) and the process exits with status 0. A second signal skips the rest of the drain: the
requests still running are aborted through the engine at once, so each client still gets a
complete answer (finish_reason "abort"; a stream's last chunk and `[DONE]`), as at the drain
timeout, before the connections close.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from nanoflow_jax.server.engine_loop import AsyncEngine

log = logging.getLogger("nanoflow_jax.server")

ABORT_TIMEOUT_S = 2.0  # at shutdown, how long the engine thread gets to deliver the aborts


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout_s: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in uvicorn's _captured_signals: uvicorn would re-raise it after the
        # shutdown, and the process would die of SIGTERM instead of exiting with status 0.
        if self._drain_requested or sig not in (signal.SIGTERM, signal.SIGINT):
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True
        self.engine.draining = True  # from now on new requests get 503

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        await self._abort_remaining()
        await super().shutdown(sockets)

    async def _abort_remaining(self, timeout_s: float = ABORT_TIMEOUT_S) -> None:
        """Abort what is still running and let the handlers write their last chunks."""
        self.engine.draining = True
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        if not (self.engine.num_active and self.engine.is_alive):
            return
        log.warning("stopping: aborting %d request(s)", self.engine.num_active)
        self.engine.abort_all()
        deadline = time.monotonic() + timeout_s
        while self.engine.num_active and self.engine.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the handlers' turn: final chunks, [DONE], JSON bodies

    async def _drain(self) -> None:
        log.info("signal received: draining (up to %.1fs)", self.drain_timeout_s)
        try:
            await self.engine.drain(self.drain_timeout_s)
        finally:
            self.should_exit = True


def run_server(app, engine: AsyncEngine, host: str = "127.0.0.1", port: int = 8000,
               drain_timeout_s: float = 30.0, log_level: str = "info",
               access_log: bool = True) -> None:
    # log_config=None: uvicorn's loggers go through the root logger, in the project's format.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=5, timeout_keep_alive=5)
    DrainingServer(config, engine, drain_timeout_s).run()
