"""The OpenAI-compatible HTTP API (FastAPI) over an `AsyncEngine`.

    POST /v1/completions        prompt: str | [int] | [str] | [[int]] (batches of one)
    POST /v1/chat/completions   messages with string (or text-part) content, chat template
    GET  /v1/models
    GET  /health                200 while the engine thread lives; 503 if dead or draining
    GET  /metrics               Prometheus text format

Both generation endpoints stream with `stream: true` (server-sent events ending in
`data: [DONE]`). Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`:
400 for bad input (FastAPI's 422 included), 401 for a missing or wrong API key, 413 for a body
over `max_request_bytes`, 503 with Retry-After when the queue is full or the server is
draining, 500 if the engine dies. A client that disconnects aborts its request, which frees
its KV pages at once.

No request can stall the others: bodies are capped, and one too large to hold a prompt that
fits is refused before it is read (`body_limit`); a prompt longer than any context could hold
is refused before tokenizing (`prompts.PromptEncoder`); tokenizing runs in a worker thread
(detokenizing runs on the engine thread), so the event loop only parses JSON.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow_jax.engine.outputs import CompletionOutput, RequestOutput
from nanoflow_jax.sampling_params import SamplingParams
from nanoflow_jax.server import metrics as metrics_lib
from nanoflow_jax.server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimitMiddleware
from nanoflow_jax.server.engine_loop import (AsyncEngine, DrainingError, EngineDeadError,
                                             QueueFullError, RequestStream)
from nanoflow_jax.server.protocol import (SSE_DONE, APIError, ChatCompletionRequest,
                                          CompletionRequest, bad_request, error_body, sse,
                                          usage)
from nanoflow_jax.server.prompts import PromptEncoder

RETRY_AFTER_S = 1


def create_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The app; its lifespan starts the engine thread and stops it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="nanoflow-jax", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    api = _API(engine, served_model_name)
    _install_error_handlers(app)
    app.add_middleware(_V1Middleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes,  # the outermost
                       fit_bytes=api.prompts.max_body_bytes, max_model_len=api.max_model_len)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "dead", "error": repr(engine.error)}, 503)
        if engine.draining:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=metrics_lib.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": api.created,
            "owned_by": "nanoflow-jax", "max_model_len": api.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    return app


# ---- errors and auth --------------------------------------------------------------------------


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        # FastAPI answers 422 by default; OpenAI clients expect 400 and an error body.
        errors = err.errors() or [{}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx", {}).get("error", "")
            return _error_response(bad_request(f"the body is not valid JSON: {ctx}", None,
                                               "json_invalid"))
        parts = []
        for e in errors:
            part = f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg', '')}"
            if part not in parts:
                parts.append(part)
        return _error_response(bad_request("; ".join(parts[:5]), _param(first.get("loc", ())),
                                           first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}",
                                       "server_error", code="internal_error"), 500)


def _param(loc) -> str | None:
    """A pydantic error location as OpenAI's `param` ("messages.0.content"): without "body"
    and the union member tags pydantic adds ("str", "list[int]")."""
    out = []
    for p in loc:
        if p == "body" and not out:
            continue
        if isinstance(p, str) and (not p.isidentifier() or p in _TYPE_TAGS):
            break
        out.append(str(p))
    return ".".join(out) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class _V1Middleware:
    """On /v1/*: `Authorization: Bearer <key>` when the server has a key (/health and /metrics
    stay open, as in vLLM), and request bodies read as JSON whatever their Content-Type says
    (`curl -d` sends form-urlencoded)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
            got = dict(scope["headers"]).get(b"authorization", b"")
            if self.expected and not secrets.compare_digest(got.strip(), self.expected):
                resp = JSONResponse(
                    error_body("missing or incorrect API key: send 'Authorization: Bearer "
                               "<key>'", "invalid_request_error", code="invalid_api_key"),
                    401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the generation endpoints ----------------------------------------------------------------


class _API:
    def __init__(self, engine: AsyncEngine, served_model_name: str):
        self.engine = engine
        self.model_name = served_model_name
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size
        self.prompts = PromptEncoder(self.tokenizer, self.max_model_len)
        self.created = int(time.time())
        self._token_strs: dict[int, str] = {}

    # -- shared steps --

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise bad_request(f"the model {model!r} does not exist; this server serves "
                              f"{self.model_name!r}", "model", "model_not_found")

    def _check_length(self, ids: list[int], params: SamplingParams, param: str,
                      max_tokens_param: str) -> None:
        if len(ids) >= self.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens, and the "
                f"prompt has {len(ids)} tokens (at least one output token must fit)", param,
                "context_length_exceeded")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {len(ids)} tokens and {max_tokens_param}={params.max_tokens} "
                f"asks for {len(ids) + params.max_tokens} in all", max_tokens_param,
                "context_length_exceeded")

    async def _submit(self, rid: str, prompt: dict[str, Any], params: SamplingParams,
                      arrival: float) -> RequestStream:
        try:
            stream = self.engine.submit(rid, prompt, params, prompt["prompt_token_ids"], arrival)
        except QueueFullError as e:
            self.engine.metrics.count_rejected("queue_full")
            raise APIError(503, f"the server is overloaded: {e}; retry later", "server_error",
                           None, "queue_full", {"Retry-After": str(RETRY_AFTER_S)}) from None
        except DrainingError:
            self.engine.metrics.count_rejected("draining")
            raise APIError(503, "the server is shutting down", "server_error", None,
                           "draining", {"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineDeadError as e:
            self.engine.metrics.count_rejected("engine_dead")
            raise APIError(503, str(e), "server_error", None, "engine_dead") from None
        try:
            await stream.wait_accepted()
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None
        except (EngineDeadError, RuntimeError) as e:
            raise APIError(500, str(e), "server_error", None, "internal_error") from None
        except asyncio.CancelledError:
            self.engine.abort(rid)
            raise
        return stream

    async def _collect(self, stream: RequestStream, request: Request) -> RequestOutput | None:
        """The final output; None if the client went away (the request is then aborted)."""

        async def consume():
            final = None
            async for out in stream:
                final = out
            return final

        task = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                try:
                    return task.result()
                except EngineDeadError as e:
                    raise APIError(500, str(e), "server_error", None, "engine_dead") from None
            task.cancel()
            return None
        finally:
            gone.cancel()
            if not stream.done:
                task.cancel()
                self.engine.abort(stream.request_id)

    def _token_str(self, token_id: int) -> str:
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = s
        return s

    def _stream_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # -- /v1/completions --

    async def _completion_prompt(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(f"batched prompts are not supported: send one prompt per "
                                  f"request (got {len(prompt)})", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("the prompt is empty", "prompt")
            self.prompts.check_chars(len(prompt), "prompt")
            return await asyncio.to_thread(self.prompts.completion, prompt), prompt
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if len(prompt) >= self.max_model_len:  # before looking at every id
            self._check_length(prompt, SamplingParams(max_tokens=None), "prompt", "max_tokens")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                              f"[0, {self.vocab_size})", "prompt")
        return list(prompt), None

    async def completions(self, req: CompletionRequest, request: Request):
        arrival = time.time()
        self._check_model(req.model)
        params = req.to_sampling_params(self.vocab_size)
        ids, text = await self._completion_prompt(req.prompt)
        self._check_length(ids, params, "prompt", "max_tokens")
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._submit(rid, {"prompt_token_ids": ids, "prompt": text}, params,
                                    arrival)
        created = int(arrival)
        if req.stream:
            return self._stream_response(
                self._completion_events(stream, params, created, req.include_usage))
        final = await self._collect(stream, request)
        if final is None:
            return Response(status_code=499)
        choices = []
        for c in final.outputs:
            choices.append({
                "index": c.index, "text": c.text,
                "logprobs": self._completion_logprobs(c, 0, len(c.token_ids), 0, params),
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": rid, "object": "text_completion", "created": created,
                "model": self.model_name, "choices": choices,
                "usage": usage(len(ids), sum(len(c.token_ids) for c in final.outputs))}

    def _completion_logprobs(self, c: CompletionOutput, start: int, end: int,
                             text_offset: int, params: SamplingParams) -> dict | None:
        if params.logprobs is None or c.logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for t, lps in zip(c.token_ids[start:end], c.logprobs[start:end]):
            s = self._token_str(t)
            tokens.append(s)
            token_lps.append(lps.get(t))
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:params.logprobs]
            tops.append({self._token_str(k): v for k, v in top})
            offsets.append(text_offset)
            text_offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": offsets}

    async def _stream_events(self, stream: RequestStream, head: dict, include_usage: bool,
                             first: list[dict], choice) -> AsyncIterator[str]:
        """SSE for one request: the `first` events, then a chunk per new piece of each sample
        (`choice(c, delta, sent_tokens, sent_chars)` -> that chunk's choice), usage if asked,
        `[DONE]`. A client that goes away aborts the request."""
        n = stream.n
        sent_chars, sent_tokens, done, num_tokens = [0] * n, [0] * n, [False] * n, [0] * n
        try:
            for event in first:
                yield sse(event)
            async for out in stream:
                for c in out.outputs:
                    i = c.index
                    num_tokens[i] = len(c.token_ids)
                    if done[i]:
                        continue
                    delta = c.text[sent_chars[i]:]
                    if (not delta and c.finish_reason is None
                            and len(c.token_ids) == sent_tokens[i]):
                        continue  # nothing new. A token whose text is held back (a partial
                        # character, a stop-string prefix) still gets its chunk, as in vLLM.
                    event = {**head, "choices": [choice(c, delta, sent_tokens[i], sent_chars[i])]}
                    sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    done[i] = c.finish_reason is not None
                    yield sse(event)
            if include_usage:
                yield sse({**head, "choices": [],
                           "usage": usage(len(stream.prompt_token_ids), sum(num_tokens))})
            yield SSE_DONE
        except EngineDeadError as e:
            yield sse(error_body(str(e), "server_error", code="engine_dead"))
            yield SSE_DONE
        finally:
            if not stream.done:  # the client went away (or the server stops): free the pages
                self.engine.abort(stream.request_id)

    def _completion_events(self, stream: RequestStream, params: SamplingParams, created: int,
                           include_usage: bool) -> AsyncIterator[str]:
        head = {"id": stream.request_id, "object": "text_completion", "created": created,
                "model": self.model_name}

        def choice(c, delta, sent_tokens, sent_chars):
            return {"index": c.index, "text": delta,
                    "logprobs": self._completion_logprobs(c, sent_tokens, len(c.token_ids),
                                                          sent_chars, params),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        return self._stream_events(stream, head, include_usage, [], choice)

    # -- /v1/chat/completions --

    async def chat(self, req: ChatCompletionRequest, request: Request):
        arrival = time.time()
        self._check_model(req.model)
        params = req.to_sampling_params(self.vocab_size)
        self.prompts.check_chars(self.prompts.chat_chars(req.messages), "messages")
        ids, text = await asyncio.to_thread(self.prompts.chat, req.messages,
                                            req.add_generation_prompt)
        self._check_length(ids, params, "messages", "max_completion_tokens"
                           if req.max_completion_tokens is not None else "max_tokens")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._submit(rid, {"prompt_token_ids": ids, "prompt": text}, params,
                                    arrival)
        created = int(arrival)
        if req.stream:
            return self._stream_response(
                self._chat_events(stream, params, created, req.include_usage))
        final = await self._collect(stream, request)
        if final is None:
            return Response(status_code=499)
        choices = [{
            "index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": self._chat_logprobs(c, 0, len(c.token_ids), params),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            for c in final.outputs]
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": choices,
                "usage": usage(len(ids), sum(len(c.token_ids) for c in final.outputs))}

    def _chat_logprobs(self, c: CompletionOutput, start: int, end: int,
                       params: SamplingParams) -> dict | None:
        if params.logprobs is None or c.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            s = self._token_str(token_id)
            return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

        content = []
        for t, lps in zip(c.token_ids[start:end], c.logprobs[start:end]):
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:params.logprobs]
            content.append({**entry(t, lps.get(t)),
                            "top_logprobs": [entry(k, v) for k, v in top]})
        return {"content": content}

    def _chat_events(self, stream: RequestStream, params: SamplingParams, created: int,
                     include_usage: bool) -> AsyncIterator[str]:
        head = {"id": stream.request_id, "object": "chat.completion.chunk", "created": created,
                "model": self.model_name}
        roles = [{**head, "choices": [{  # the role first, as OpenAI does
            "index": i, "delta": {"role": "assistant", "content": ""},
            "logprobs": None, "finish_reason": None}]} for i in range(stream.n)]

        def choice(c, delta, sent_tokens, _sent_chars):
            return {"index": c.index, "delta": {"content": delta} if delta else {},
                    "logprobs": self._chat_logprobs(c, sent_tokens, len(c.token_ids), params),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        return self._stream_events(stream, head, include_usage, roles, choice)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
