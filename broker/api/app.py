"""The mTLS API application: ``make_app(deps)`` with typed state and JSON errors everywhere.

Every response, error or not, carries ``Cache-Control: no-store``; every error is
``{"error": CODE, "message": SENTENCE}`` — aiohttp's own 404/405/413 included — so a CI job
always gets something a person can act on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker.api.authz import matching_identity
from broker.api.ratelimit import RateLimiter
from broker.audit import AuditLog, rfc3339
from broker.clock import Clock
from broker.config import ProfileConfig
from broker.errors import describe_bug
from broker.identity import Caller
from broker.metrics import Metrics
from broker.tokens.families import FamilyManager
from broker.tokens.model import Token, TokenCache
from broker.tokens.rotator import Rotator

log = logging.getLogger("broker.api")

ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
    417: "expectation_failed", 429: "rate_limited", 431: "headers_too_large", 500: "internal", 503: "unavailable",
}


class TokenBodies:
    """The JSON answer to a shared-profile fetch changes only with the token and the whole
    seconds it has left: render it once per second per profile, not once per request."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, int, bytes]] = {}

    def render(self, profile: str, token: Token, now: float) -> bytes:
        ttl = max(0, int(token.expires_at - now))
        last = self._last.get(profile)
        if last is not None and last[0] == token.fp and last[1] == ttl:
            return last[2]
        body = json.dumps({
            "profile": profile, "token": token.value, "expires_at": rfc3339(token.expires_at),
            "issued_at": rfc3339(token.issued_at), "ttl": ttl, "generation": token.generation,
        }).encode()
        self._last[profile] = (token.fp, ttl, body)
        return body


class Grants:
    """Which of a caller's identities the allow-list of a profile admits, remembered per
    certificate: the glob matching is pure, and a job asks for the same profile again and again."""

    LIMIT = 10_000  # distinct (certificate, profile) pairs kept before starting over

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], str | None] = {}

    def identity(self, caller: Caller, profile: ProfileConfig) -> str | None:
        key = (caller.fingerprint, profile.name)
        if key not in self._known:
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            self._known[key] = matching_identity(caller.identities, profile.allow)
        return self._known[key]


# aiohttp bounds an idle keep-alive connection but not a request whose body never finishes
# arriving: without this, any certificate holder could pin connections (and their tasks) for
# ever by declaring a Content-Length and sending a byte now and then. A refresh body is well
# under 1 KiB; 10 s is ample for it on a slow link.
BODY_READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class ApiDeps:
    profiles: Mapping[str, ProfileConfig]
    admin_allow: tuple[str, ...]
    cache: TokenCache
    rotators: Mapping[str, Rotator]
    audit: AuditLog
    metrics: Metrics
    clock: Clock
    max_body_bytes: int = 64 * 1024
    body_read_timeout: float = BODY_READ_TIMEOUT
    rate_limiter: RateLimiter | None = None
    families: FamilyManager | None = None
    token_bodies: TokenBodies = field(default_factory=TokenBodies)
    grants: Grants = field(default_factory=Grants)


DEPS = web.AppKey("deps", ApiDeps)

# aiohttp's default request-line limit (8190 bytes) answers a longer line with a plain-text 400
# before routing, so the caller gets no JSON error. A generous limit lets absurd profile names
# (thousands of characters) reach the handlers and get the usual JSON 403/404; only request
# lines beyond this still get aiohttp's own plain-text 400. Per-connection memory stays small.
MAX_REQUEST_LINE = 32 * 1024

KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this long


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": code or ERROR_CODES.get(status, "error"), "message": message}).encode()


def error_response(status: int, message: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code), headers=headers,
                        content_type="application/json", charset="utf-8")


class ApiError(Exception):
    """Raised by handlers; turned into the JSON error body by the middleware. ``close``: the
    connection cannot carry another request after this answer (e.g. a body left half read)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.close = close


_DEFAULT_MESSAGES = {
    404: "no such endpoint; the API is GET /v1/tokens/{profile}, GET /v1/tokens, GET /v1/whoami",
    405: "method not allowed for this endpoint",
    413: "request body too large",
}


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SERVED_VERSIONS = (HttpVersion10, HttpVersion11)


def unsupported_version(request: web.BaseRequest) -> web.Response | None:
    """A JSON 400 for a request that is not HTTP/1.0 or 1.1, else None. aiohttp's parser reads
    ``HTTP/2.0`` and a bare HTTP/0.9 request line without complaint, and both would be served."""
    if request.version in _SERVED_VERSIONS:
        return None
    response = error_response(400, "only HTTP/1.0 and HTTP/1.1 are served", headers={"Cache-Control": "no-store"})
    response.force_close()
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    deps = request.app[DEPS]
    started = time.perf_counter()
    try:
        if (refused := unsupported_version(request)) is not None:
            return refused
        length = request.content_length
        if length is not None and length > deps.max_body_bytes:
            return error_response(413, f"request body of {length} bytes is over the limit of {deps.max_body_bytes}")
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, exc.code, exc.headers)
        if exc.close:
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _DEFAULT_MESSAGES.get(exc.status) or exc.text or exc.reason
        if exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            message = f"method {request.method} not allowed here" + (f"; use {allowed}" if allowed else "")
        return error_response(exc.status, message, headers={k: v for k, v in exc.headers.items()
                                                               if k in ("Allow", "Retry-After")})
    except Exception as exc:
        if isinstance(exc, ConnectionError) and _client_gone(request):
            # Not a bug, and any certificate holder can do it at will: no ERROR line. The answer
            # is never written; it only ends the request.
            log.debug("client_gone route=%s", _route_label(request))
            return error_response(400, "the client closed the connection before the request was complete")
        log.error("internal_error route=%s error=%s", _route_label(request), describe_bug(exc))
        return error_response(500, "internal error; the broker logged the details")
    finally:
        deps.metrics.observe_request(_route_label(request), time.perf_counter() - started)


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-store"


_PROTOCOL_ERRORS = {
    "LineTooLong": "a header or the request line is too long",
    "BadStatusLine": "the request line is not valid HTTP/1.x",
    "BadHttpMethod": "the request method is not valid",
    "InvalidHeader": "a header is malformed",
    "InvalidURLError": "the request target is not a valid URL",
    "TransferEncodingError": "the transfer encoding is malformed",
    "ContentLengthError": "the Content-Length is malformed",
}


class JsonErrorsRequestHandler(RequestHandler):
    """aiohttp answers malformed HTTP (oversized headers, bad request line) itself, before any
    middleware, in plain text, and logs it as an ERROR with a traceback. Give those callers the
    same JSON error shape and no-store as everyone else, and log one line. The parser's message
    is never echoed: it quotes the raw bytes the client sent, which may hold a credential."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        reason = _PROTOCOL_ERRORS.get(type(exc).__name__, "the request could not be parsed")
        if status >= 500:
            log.error("internal_error while parsing a request error=%s", describe_bug(exc) if exc else "?")
            text = "internal error; the broker logged the details"
        else:
            log.info("http_rejected status=%d reason=%s", status, reason)
            text = f"malformed HTTP request: {reason}"
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        response = error_response(status, text, headers={"Cache-Control": "no-store"})
        response.force_close()
        return response


class JsonErrorsServer(web.Server):
    """aiohttp's server, with :class:`JsonErrorsRequestHandler` on every connection."""

    def __call__(self) -> RequestHandler:
        return JsonErrorsRequestHandler(self, loop=self._loop, **self._kwargs)


def serve_json_errors(app: web.Application) -> None:
    """Every runner of ``app`` serves it with :class:`JsonErrorsServer`, whichever site it is
    started on (the ops listener uses aiohttp's own ``SockSite``). aiohttp has no public hook for
    the handler class, so wrap the method its runner calls to build the server."""
    make_handler = app._make_handler  # noqa: SLF001

    def make(**kwargs: object) -> web.Server:
        plain = make_handler(**kwargs)  # type: ignore[arg-type]
        return JsonErrorsServer(plain.request_handler, request_factory=plain.request_factory,
                                handler_cancellation=plain.handler_cancellation, loop=plain._loop,  # noqa: SLF001
                                **plain._kwargs)  # noqa: SLF001

    app._make_handler = make  # type: ignore[method-assign]  # noqa: SLF001


def protocol_factory(runner: web.AppRunner) -> Callable[[], RequestHandler]:
    """What ``loop.create_server`` needs: aiohttp's handler for ``runner``, with JSON errors."""
    server = runner.server
    assert isinstance(server, JsonErrorsServer), "runner.setup() first, on an app from make_app"
    return server


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """The routes' Expect handler. aiohttp's default answers any expectation but 100-continue
    with a plain-text 417 that quotes the header, before any middleware runs."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no Expect (RFC 9110 10.1.1): ignored, as aiohttp does
    if request.headers.get("Expect", "").lower() != "100-continue":
        response = error_response(417, "the only Expect header this API supports is 100-continue",
                                  headers={"Cache-Control": "no-store"})
        response.force_close()  # the client may or may not send the body it announced
        return response
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own handler: the answer proper has not started
    return None


def make_app(deps: ApiDeps) -> web.Application:
    from broker.api import handlers  # late: handlers import this module's helpers

    app = web.Application(middlewares=[errors_middleware], client_max_size=deps.max_body_bytes,
                          handler_args={"max_line_size": MAX_REQUEST_LINE, "keepalive_timeout": KEEPALIVE_TIMEOUT})
    app[DEPS] = deps
    app.on_response_prepare.append(_no_store)
    serve_json_errors(app)
    handlers.add_routes(app)
    return app
