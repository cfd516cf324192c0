"""A cap on request bodies: beyond `max_bytes`, HTTP 413 with OpenAI's error body.

The body is read here, before the app sees it (FastAPI buffers it whole anyway): a declared
Content-Length over the cap is refused before a byte is read, and a body that streams without
one (chunked) is refused as soon as the bytes received pass the cap. The 413 says
`Connection: close`, so the unread rest of the body is not parsed as a next request.
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
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{int(declared)} bytes")
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
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:  # the whole body at once, then the connection's own messages
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, size: str) -> None:
        response = JSONResponse(
            error_body(f"the request body has {size}; this server takes at most "
                       f"{self.max_bytes} bytes (--max_request_bytes)", "invalid_request_error",
                       code="request_too_large"),
            413, headers={"Connection": "close"})
        await response(scope, receive, send)
