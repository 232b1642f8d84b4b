"""Request limits, enforced before a route parses anything: body size (413), path and query string
length (414). Each answer has the API's JSON error shape.

Why here and not in the route: a 20 MB body used to be read and parsed in full before its 422,
slowing every other request. The declared Content-Length is refused at once; a body sent without
one (chunked) is counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException

MAX_SHOWN = 100  # characters of a client-supplied id echoed back in an error message


def shown(value: str, limit: int = MAX_SHOWN) -> str:
    """A client's id for an error message: quoted, and cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + f"... ({len(value)} characters)"


async def _send_json(send: Any, status: int, error: str, detail: str) -> None:
    body = orjson.dumps({"error": error, "detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """Pure ASGI middleware (cheap on the hot path: a few length checks per request)."""

    def __init__(self, app: Any, max_body_bytes: int, max_path_bytes: int, max_query_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_path = max_path_bytes
        self.max_query = max_query_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path_bytes = len(scope.get("raw_path") or scope["path"].encode())
        if path_bytes > self.max_path:
            await _send_json(send, 414, "uri_too_long", f"path: {path_bytes} bytes, the limit is {self.max_path}")
            return
        query_bytes = len(scope.get("query_string", b""))
        if query_bytes > self.max_query:
            await _send_json(
                send, 414, "uri_too_long", f"query string: {query_bytes} bytes, the limit is {self.max_query}"
            )
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, "invalid_request", "header Content-Length: not a number")
                return
            if int(declared) > self.max_body:
                await _send_json(send, 413, "payload_too_large", self._too_large(int(declared)))
                return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # FastAPI re-raises HTTPException from body reading; the app renders it as JSON.
                    raise HTTPException(413, self._too_large(received, at_least=True))
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        return f"body: {'over ' if at_least else ''}{size} bytes, the limit is {self.max_body} bytes"
