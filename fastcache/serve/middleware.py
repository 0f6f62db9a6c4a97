"""The ASGI layers around the app: request metrics, the body size cap, and API-key authentication.

Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which gets in the way of the handlers'
disconnect detection); authentication is Starlette's own AuthenticationMiddleware with a bearer
backend.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from fastapi import HTTPException
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServeMetrics
from .protocol import error_response


class RequestMetrics:
    """Counts every response of `path` by status (whichever layer answered: auth, size cap, app)
    and observes the latency of successful ones, arrival to the last byte handed to the server."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, path: str) -> None:
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(str(status)).inc()
            if status == 200:
                self.metrics.latency.observe(time.perf_counter() - started)


class BodyLimit:
    """413 for bodies over `max_bytes`: at once from Content-Length, else while they stream in; 408
    for a body still incomplete `timeout_s` after the request began (uvicorn has no body timeout).
    Both are an HTTPException from `receive`, which FastAPI's body reading lets through to the
    handler. After the body, `receive` waits untimed (the handlers wait on it for a disconnect)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (--max-body-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, self._message())(scope, receive, send)
            return
        received, complete = 0, False
        give_up = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, give_up - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(status_code=408, detail=f"the request body did not arrive within "
                                    f"{self.timeout_s:g} s (--body-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


class BearerKey(AuthenticationBackend):
    """``Authorization: Bearer <key>`` on /v1/*, compared in constant time; other paths are open
    (health and readiness probes, Prometheus)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        if not conn.url.path.startswith("/v1/"):
            return None
        header = conn.headers.get("authorization")
        if header is None:
            raise AuthenticationError("no API key: send the header `Authorization: Bearer <key>`")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise AuthenticationError("invalid API key")
        return AuthCredentials(["api"]), SimpleUser("api")


def unauthorized(conn: HTTPConnection, error: Exception) -> Response:
    return error_response(401, str(error), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
