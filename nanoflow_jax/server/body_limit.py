"""Bounds on request bodies, checked before the body is parsed (or even read).

Two bounds, the smaller one applies:
  - `max_bytes` (--max_request_bytes): beyond it, HTTP 413, code "request_too_large";
  - `fit_bytes`: the largest body whose prompt could still fit in the model's context (see
    `prompts.PromptEncoder.max_body_bytes`); beyond it, HTTP 400, code
    "context_length_exceeded", as the prompt's own length check would answer once parsed.
Parsing JSON holds the event loop (tens of ms for 10 MB), so refusing on size keeps a flood
of huge requests from slowing everyone else.

A declared Content-Length over a bound is refused before a byte is read; one under both
passes through untouched (the HTTP parser holds the body to its declared length). A body that
streams without one (chunked) is read here first and refused as soon as the bytes received
pass a bound; FastAPI buffers the whole body anyway. A refusal says `Connection: close`, so the
unread rest of the body is not parsed as a next request.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from nanoflow_jax.server.protocol import error_body

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 fit_bytes: int | None = None, max_model_len: int | None = None):
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.fit_bytes = fit_bytes
        self.max_model_len = max_model_len
        self.limit = max_bytes if fit_bytes is None else min(max_bytes, fit_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                await self._refuse(scope, receive, send, int(declared), "")
            else:
                await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body was in: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send, size, "more than ")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        chunks.reverse()  # popped from the end: the first chunk first

        async def replay():  # the body as it came, then the connection's own messages
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: int, more: str) -> None:
        if size > self.max_bytes:
            status = 413
            body = error_body(f"the request body has {more}{size} bytes; this server takes at "
                              f"most {self.max_bytes} (--max_request_bytes)",
                              "invalid_request_error", code="request_too_large")
        else:
            status = 400
            param = "messages" if scope["path"].endswith("/chat/completions") else "prompt"
            body = error_body(f"this model's maximum context length is {self.max_model_len} "
                              f"tokens, and the request body has {more}{size} bytes: more "
                              f"than any prompt of that many tokens takes (at most "
                              f"{self.fit_bytes})", "invalid_request_error", param,
                              "context_length_exceeded")
        response = JSONResponse(body, status, headers={"Connection": "close"})
        await response(scope, receive, send)
