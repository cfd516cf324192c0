"""`server.body_limit` in-process: both bounds, with and without a Content-Length, and bodies
under them reach the app whole."""
from __future__ import annotations

import asyncio

import httpx

from nanoflow_jax.server.body_limit import BodyLimitMiddleware


async def _echo(scope, receive, send):
    """Answers with the body it read and how many messages it took."""
    body, messages = b"", 0
    while True:
        message = await receive()
        body += message.get("body", b"")
        messages += 1
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-messages", str(messages).encode())]})
    await send({"type": "http.response.body", "body": body})


def _post(app, path: str, body: bytes, chunked: bool) -> httpx.Response:
    async def chunks():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=chunks() if chunked else body)

    return asyncio.run(main())


def test_bounds_with_and_without_content_length():
    app = BodyLimitMiddleware(_echo, max_bytes=100, fit_bytes=50, max_model_len=8)
    for chunked in (False, True):
        ok = _post(app, "/v1/completions", b"x" * 50, chunked)
        assert ok.status_code == 200 and ok.content == b"x" * 50
        if chunked:  # replayed as it came, not joined
            assert int(ok.headers["x-messages"]) > 1

        too_long = _post(app, "/v1/chat/completions", b"x" * 51, chunked)
        assert too_long.status_code == 400, too_long.text
        err = too_long.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        assert too_long.headers["connection"] == "close"
        assert _post(app, "/v1/completions", b"x" * 51, chunked).json()["error"]["param"] \
            == "prompt"

    assert _post(app, "/v1/completions", b"x" * 101, False).status_code == 413
    # Without a fit bound (or with one above the cap) the cap answers, with 413.
    capped = BodyLimitMiddleware(_echo, max_bytes=100)
    for chunked in (False, True):
        r = _post(capped, "/v1/completions", b"x" * 101, chunked)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        assert _post(capped, "/v1/completions", b"x" * 100, chunked).status_code == 200
