"""A cap on request bodies: beyond `max_bytes`, HTTP 413 with OpenAI's error body.

A declared Content-Length over the cap is refused before a byte is read; one under it passes
through untouched (the HTTP parser holds the body to its declared length). A body that streams
without one (chunked) is read here first, and refused as soon as the bytes received pass the
cap; FastAPI buffers the whole body anyway. The 413 says `Connection: close`, so the unread
rest of the body is not parsed as a next request.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from nanoflow_jax.server.protocol import error_body

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send, f"{int(declared)} bytes")
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
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
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

    async def _refuse(self, scope, receive, send, size: str) -> None:
        response = JSONResponse(
            error_body(f"the request body has {size}; this server takes at most "
                       f"{self.max_bytes} bytes (--max_request_bytes)", "invalid_request_error",
                       code="request_too_large"),
            413, headers={"Connection": "close"})
        await response(scope, receive, send)
