"""Slow, short and aborted requests in the HTTP feature service: timeouts and per-client limits.

A connection costs the server a socket and a coroutine; what starves other clients is a cap on connections
filled by clients that never finish their request. So:

- every request's headers must arrive within ``read_timeout`` of the connection opening (or of the previous
  response on a keep-alive connection): :class:`TimedH11Protocol`, uvicorn's h11 protocol with that one
  timer added, since uvicorn itself has none (a connection that sends half a header line is held forever);
- the body must arrive within ``read_timeout`` of the headers (:func:`read_body`): 408 and the connection
  closed otherwise, which also answers a body shorter than its ``Content-Length`` on a socket held open;
- a client that disconnects mid-body is one log line (:class:`ClientGone`), not a ``ClientDisconnect``
  traceback;
- one client address may have at most ``per_client`` requests in progress (:class:`PerClientLimit`, 429
  beyond), and uvicorn's ``limit_concurrency`` caps connections for all clients together well above that,
  so a few slow clients fill neither.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import h11
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_PER_CLIENT = 100
DEFAULT_MAX_CONNECTIONS = 1000

log = logging.getLogger("uvicorn.error")  # uvicorn's own handler and format, whatever --log-level says


class ClientGone(Exception):
    """The client disconnected before sending its whole body (logged as one line, no answer possible)."""


def _client(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else "client"


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body: 413 past ``max_bytes``, 408 (connection closed) if not all in within ``timeout_s``.

    ``max_bytes`` is enforced on the bytes streamed in (a missing or lying ``Content-Length`` does not help)
    and early from a declared ``Content-Length``.

    Raises:
        HTTPException: 400 (bad ``Content-Length``), 408, 413.
        ClientGone: the client disconnected mid-body.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length header {declared!r}")
        if n > max_bytes:
            raise HTTPException(413, f"request body of {n} bytes exceeds this server's limit of {max_bytes} bytes")
    buf = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > max_bytes:
                    raise HTTPException(413, f"request body exceeds this server's limit of {max_bytes} bytes")
    except TimeoutError:
        of = f" of {declared}" if declared is not None else ""
        log.warning("%s - body not received within %g s (%d%s bytes); answered 408 and closed",
                    _client(request), timeout_s, len(buf), of)
        # Connection: close makes uvicorn drop the socket after the answer instead of reading on.
        raise HTTPException(408, f"the request body did not arrive within {timeout_s:g} s "
                                 f"({len(buf)}{of} bytes received)", headers={"Connection": "close"})
    except ClientDisconnect:
        of = f" of {declared}" if declared is not None else ""
        raise ClientGone(f"{_client(request)} - client disconnected after {len(buf)}{of} body bytes "
                         f"({request.method} {request.url.path})") from None
    return bytes(buf)


class PerClientLimit:
    """ASGI middleware: at most ``per_client`` requests in progress per client address (429 beyond).

    Counts requests, not connections: an idle keep-alive connection costs nothing here (uvicorn closes it
    after ``timeout_keep_alive``). Behind a proxy every client has the proxy's address; raise the limit there.
    """

    def __init__(self, app: ASGIApp, per_client: int = DEFAULT_PER_CLIENT) -> None:
        self.app = app
        self.per_client = per_client
        self.active: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = (scope.get("client") or ("?", 0))[0]
        if self.active.get(host, 0) >= self.per_client:
            await _send_json(send, 429, f"more than {self.per_client} requests in progress from {host}; retry later",
                             {"Retry-After": "1"})
            return
        self.active[host] = self.active.get(host, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.active[host] - 1
            if left:
                self.active[host] = left
            else:
                del self.active[host]


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout: a connection whose request line and headers have not
    all arrived ``header_timeout`` seconds after it opened (or after its last response) is closed.

    uvicorn's keep-alive timer is cancelled by any byte received, so one byte every few seconds would
    otherwise hold a connection, and a connection slot, forever. Subclass and set ``header_timeout``.
    """

    header_timeout: float = DEFAULT_READ_TIMEOUT_S
    _header_timer: Any = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # No HTTP answer: without a request head there is nothing to answer (nginx closes too).
            log.info("%s - no request head within %g s; connection closed",
                     "%s:%d" % self.client if self.client else "client", self.header_timeout)
            self.transport.close()


def timed_h11(header_timeout: float) -> type[TimedH11Protocol]:
    """A :class:`TimedH11Protocol` class with ``header_timeout`` set (uvicorn takes a class, not an object)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})


__all__ = ["ClientGone", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_PER_CLIENT", "DEFAULT_READ_TIMEOUT_S",
           "PerClientLimit", "TimedH11Protocol", "read_body", "timed_h11"]
