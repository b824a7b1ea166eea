"""Limits before work on the REM-S HTTP API: untrusted clients cost bounded time and memory.

- :class:`BodyGuard` (ASGI middleware): a request that carries a body must
  authenticate *before* its body is read (a wrong or missing token is a 401
  with nothing read), and its body is bounded per route while it is read — by
  its Content-Length at once, and by counting when it is chunked — so an
  unauthenticated 300 MB JSON list never reaches the JSON parser.
- :class:`GuardedH11Protocol` (uvicorn's HTTP protocol): at most
  ``max_connections`` connections, and a request must arrive whole (head and
  body) within ``request_timeout_s`` of the connection or of the previous
  response, so half-sent requests cannot hold sockets (slowloris).
- :class:`OncePerInterval` (logging filter): errors a flood repeats per socket
  (``accept`` out of file descriptors) are logged once per interval.

uvicorn has no request-read timeout and counts connections only once a request
arrived (``limit_concurrency``); hence the protocol subclass, built on its
documented ``http`` option.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KIB = 1024
# Body limits by route prefix: enough for the largest legitimate body, far below harm.
BODY_LIMITS: tuple[tuple[str, int], ...] = (
    ("/v1/policies/", 256 * KIB),  # 64 checks, 256 JMESPath rules of 1 KiB
    ("/v1/enroll", 64 * KIB),  # EK certificate, two public areas, a CSR
    ("/v1/attest/", 4 * KIB),
)
DEFAULT_BODY_LIMIT = 16 * KIB


def body_limit(path: str) -> int:
    for prefix, limit in BODY_LIMITS:
        if path.startswith(prefix):
            return limit
    return DEFAULT_BODY_LIMIT


class _TooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException, so the framework answers it as 413
    (FastAPI turns any other error while reading a body into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None
                 ) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyGuard:
    """ASGI middleware: authenticate before reading a body, bound the body while reading.

    ``authenticated(authorization_header)`` answers whether the bearer token is
    one the REM-S knows (any scope; the route checks the scope afterwards).
    It may block (a database lookup), so it runs in a worker thread.
    """

    def __init__(self, app: ASGIApp, authenticated: Callable[[str | None], bool]) -> None:
        self.app = app
        self.authenticated = authenticated

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        limit = body_limit(scope["path"])
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"request body over {limit} bytes")
            return
        ok = await asyncio.to_thread(self.authenticated, headers.get("authorization"))
        if not ok:
            await _reply(send, 401, "authentication required", {"WWW-Authenticate": "Bearer"})
            return
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, tracking)
        except _TooLarge:
            if not started:
                await _reply(send, 413, f"request body over {limit} bytes")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a whole-request deadline.

    Class attributes are set per listener by :func:`guarded_protocol`.
    """

    max_connections = 1000
    request_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.abort()  # over the cap: nothing is read, nothing is held
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        # A request still arriving (head or body) after the deadline is dropped; one the
        # application is answering is left to finish.
        reading = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if self.cycle is None or (reading and not self.cycle.response_started):
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in: the application answers it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(max_connections: int, request_timeout_s: float) -> type[GuardedH11Protocol]:
    """A protocol class for one uvicorn listener with these limits."""
    return type("GuardedListener", (GuardedH11Protocol,),
                {"max_connections": max_connections, "request_timeout_s": request_timeout_s})


class OncePerInterval(logging.Filter):
    """Let a message through once per ``interval_s`` per (logger, message template)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:80])
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            self.suppressed += 1
            return False
        self._last[key] = now
        if len(self._last) > 1024:  # bounded: forget the oldest keys
            for old in sorted(self._last, key=self._last.__getitem__)[:512]:
                del self._last[old]
        return True
