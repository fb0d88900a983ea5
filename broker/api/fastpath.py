"""The hot route below aiohttp's request handler: ``GET /v1/tokens/{profile}`` from the cache.

Nearly every request a CI fleet sends is this one, and its answer is already rendered
(``TokenBodies``). aiohttp's per-request machinery (a task per connection, request and
response objects, routing, middleware, signals) costs several times what serving it does, and
an idle keep-alive connection holds a task and a parser. So every connection on the mTLS
listener starts here, in a small protocol that parses each request head with aiohttp's own
HTTP parser and answers the common case itself: a bodiless HTTP/1.1 ``GET /v1/tokens/<name>``
without a query, for a shared profile this certificate may fetch, whose current token can be
served now (``handlers.served_from_cache``: the same allow-list, rate limit, audit event and
metrics as the full handler). A job's client sends the same bytes for every fetch, so each
distinct head is parsed once (``HotRoute.parse``); who may fetch is still decided for every
request from its own connection's certificate.

Anything else — another route, a body, a query, an upgrade, HTTP/1.0, a request the full
handler words an error for, bytes the parser rejects — hands the connection, with every byte
not yet answered, to aiohttp's ``RequestHandler`` for good. There is one implementation of
every other behaviour, and a connection is in exactly one of the two states.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import time
from collections.abc import Callable
from email.utils import formatdate

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

from broker.api.app import KEEPALIVE_TIMEOUT, MAX_REQUEST_LINE, ApiDeps, ApiError
from broker.jsonerrors import error_body
from broker.api.handlers import served_from_cache, verified_caller
from broker.identity import Caller

log = logging.getLogger("broker.api")

ROUTE = "/v1/tokens/{profile}"  # the metric label aiohttp's router gives the same route
_PREFIX = b"GET /v1/tokens/"
_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = MAX_REQUEST_LINE + 16 * 1024  # a longer head goes to aiohttp, which words the error
_REMEMBERED_HEAD = 2048  # heads up to this long are remembered parsed (a fetch's is ~100-300 bytes)


class HotRoute:
    """Answers one parsed request head with the whole HTTP response, or None to hand it on."""

    OK_CACHE_LIMIT = 64  # distinct 200 responses kept within one second
    HEADS_LIMIT = 256  # distinct request heads remembered parsed

    def __init__(self, deps: ApiDeps) -> None:
        self.deps = deps
        self._second = -1
        self._date = ""
        self._ok: dict[tuple[str, bytes, bool], bytes] = {}
        self._remembered = functools.lru_cache(maxsize=self.HEADS_LIMIT)(parse_hot_head)

    def parse(self, head: bytes) -> RawRequestMessage | None:
        """:func:`parse_hot_head`, once per distinct head: a job's client sends the same bytes
        for every fetch, and aiohttp's parser (~7 µs) was the largest single cost of one."""
        return self._remembered(head) if len(head) <= _REMEMBERED_HEAD else parse_hot_head(head)

    def answer(self, caller: Caller, message: RawRequestMessage) -> bytes | None:
        name = message.path[len("/v1/tokens/"):]
        if "/" in name:
            return None  # /v1/tokens/x/rotate and the like (a query never gets here: see _answerable)
        started = time.perf_counter()
        try:
            result = served_from_cache(self.deps, caller, name, message.headers)
        except ApiError as exc:
            response = self.render(exc.status, "application/json; charset=utf-8",
                                   error_body(exc.status, exc.message, exc.code), exc.headers, message.should_close)
        else:
            if result is None:
                return None
            response = self._render_ok(result[0], result[1], message.should_close)
        self.deps.metrics.observe_request(ROUTE, time.perf_counter() - started)
        return response

    def render(self, status: int, content_type: str, body: bytes, headers: dict[str, str], close: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            f"Date: {self._http_date()}",
            f"Server: {SERVER_SOFTWARE}",
        ]
        lines += [f"{key}: {value}" for key, value in headers.items()]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _render_ok(self, content_type: str, body: bytes, close: bool) -> bytes:
        """Within a second every fetch of a profile gets the same bytes (the body changes with
        the whole seconds left, the Date header with the second): render them once."""
        self._tick()
        key = (content_type, body, close)
        response = self._ok.get(key)
        if response is None:
            if len(self._ok) >= self.OK_CACHE_LIMIT:
                self._ok.clear()
            response = self._ok[key] = self.render(200, content_type, body, {}, close)
        return response

    def _http_date(self) -> str:
        self._tick()
        return self._date

    def _tick(self) -> None:
        second = int(self.deps.clock.now())
        if second != self._second:
            self._second, self._date = second, formatdate(second, usegmt=True)
            self._ok.clear()


def parse_hot_head(head: bytes) -> RawRequestMessage | None:
    """One complete request head parsed by aiohttp's parser, if it is a request this route may
    answer; None if not (or malformed: aiohttp's handler parses it again and answers the 400).
    A pure function of the bytes: a fresh parser each time, so no state carries over."""
    loop = asyncio.get_running_loop()
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, max_line_size=MAX_REQUEST_LINE)
    try:
        messages, upgraded, _tail = parser.feed_data(head)
    except HttpProcessingError:
        return None
    if upgraded or len(messages) != 1 or not _answerable(*messages[0]):
        return None
    return messages[0][0]


def _answerable(message: RawRequestMessage, payload: object) -> bool:
    """The only requests served here: bodiless HTTP/1.1 GETs without a query or an upgrade."""
    return (message.method == "GET" and message.version == HttpVersion11 and payload is EMPTY_PAYLOAD
            and not message.upgrade and "?" not in message.path and "#" not in message.path
            and "Expect" not in message.headers)


def _bare_lf(data: bytes, start: int) -> bool:
    """Whether ``data[start:]`` has an LF that does not end a CRLF."""
    return data.count(b"\n", start) != data.count(b"\r\n", start)


class FastPathProtocol(asyncio.Protocol):
    """One API connection: hot requests answered here until the first other one, then
    aiohttp's handler (``fallback()``) owns the connection."""

    __slots__ = ("_route", "_fallback", "_open", "_loop", "_transport", "_caller", "_pending",
                 "_handler", "_last_active", "_idle_timer", "_writing_paused")

    def __init__(self, route: HotRoute, fallback: Callable[[], asyncio.Protocol],
                 open_connections: set[FastPathProtocol]) -> None:
        self._route = route
        self._fallback = fallback
        self._open = open_connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._caller: Caller | None = None
        self._pending = b""
        self._handler: asyncio.Protocol | None = None
        self._last_active = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._writing_paused = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        try:
            self._caller = verified_caller(transport)
        except ApiError:
            self._caller = None  # no usable certificate: the full handler words the 403
        self._open.add(self)
        self._last_active = self._loop.time()
        self._idle_timer = self._loop.call_at(self._last_active + KEEPALIVE_TIMEOUT, self._close_if_idle)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
            return
        self._pending = self._pending + data if self._pending else data
        self._serve_pending()

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_tracking()
        self._transport = None
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._handler is not None:
            self._handler.pause_writing()
        elif self._transport is not None:
            self._transport.pause_reading()  # a client that does not read its answers sends no more

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._handler is not None:
            self._handler.resume_writing()
        elif self._transport is not None:
            self._transport.resume_reading()
            self._serve_pending()

    # --- the hot route --------------------------------------------------------------------

    def _serve_pending(self) -> None:
        """Answer the complete hot requests in ``_pending`` in order (pipelining), keep an
        incomplete head for the next read, hand over at the first request that is not hot."""
        pending, start, hot = self._pending, 0, True
        while hot and start < len(pending) and not self._writing_paused and self._transport is not None:
            end = pending.find(_HEAD_END, start)
            if not pending.startswith(_PREFIX[:len(pending) - start], start):
                hot = False
            elif end < 0:
                # Wait for the rest, unless it cannot become a head served here: too long for a
                # fetch, or a line ended by a bare LF, which would never be followed by CRLFCRLF
                # (aiohttp's handler answers it at once). Looked at only while a head is incomplete.
                hot = len(pending) - start <= _MAX_HEAD and not _bare_lf(pending, start)
                break
            elif (answered := self._answer(pending[start:end + 4])) is None:
                hot = False
            else:
                start = end + 4
                response, close = answered
                self._last_active = self._loop.time()
                self._transport.write(response)
                if close:
                    self._transport.close()
                    start = len(pending)  # nothing after a Connection: close is answered
        self._pending = pending[start:]
        if not hot:
            self._hand_over()

    def _answer(self, head: bytes) -> tuple[bytes, bool] | None:
        """(the response, whether to close after it) for one request head, or None."""
        if self._caller is None:
            return None
        message = self._route.parse(head)
        if message is None:
            return None
        response = self._route.answer(self._caller, message)
        return None if response is None else (response, message.should_close)

    def _hand_over(self) -> None:
        """From now on aiohttp's handler owns the connection, starting with the unanswered bytes."""
        self._stop_tracking()
        handler = self._handler = self._fallback()
        handler.connection_made(self._transport)  # type: ignore[arg-type]
        if self._writing_paused:
            handler.pause_writing()
        pending, self._pending = self._pending, b""
        handler.data_received(pending)

    # --- idle connections and shutdown ------------------------------------------------------

    def _close_if_idle(self) -> None:
        if self._transport is None or self._handler is not None:
            return
        idle_until = self._last_active + KEEPALIVE_TIMEOUT
        if self._loop.time() >= idle_until:
            self.close()
        else:
            self._idle_timer = self._loop.call_at(idle_until, self._close_if_idle)

    def close(self) -> None:
        """Close an idle connection (shutdown, keep-alive timeout): no request is ever half
        answered here, so there is nothing to wait for."""
        if self._transport is not None and self._handler is None:
            self._transport.close()

    def _stop_tracking(self) -> None:
        self._open.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class FastPathConnections:
    """The listener's protocol factory, and the connections still on the fast path, so that
    shutdown can close them (aiohttp's server closes the ones its handler owns)."""

    def __init__(self, deps: ApiDeps, fallback: Callable[[], asyncio.Protocol]) -> None:
        self._route = HotRoute(deps)
        self._fallback = fallback
        self.open: set[FastPathProtocol] = set()

    def __call__(self) -> FastPathProtocol:
        return FastPathProtocol(self._route, self._fallback, self.open)

    def close_all(self) -> None:
        for connection in list(self.open):
            connection.close()
