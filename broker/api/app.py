"""The mTLS API application: ``make_app(deps)`` with typed state and JSON errors everywhere.

Every response, error or not, carries ``Cache-Control: no-store``; every error is
``{"error": CODE, "message": SENTENCE}`` — aiohttp's own 404/405/413 included — so a CI job
always gets something a person can act on.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import MatchInfoError

from broker.api.authz import matching_identity
from broker.api.ratelimit import RateLimiter
from broker.audit import AuditLog, rfc3339
from broker.clock import Clock
from broker.config import ProfileConfig
from broker.errors import describe_bug
from broker.identity import Caller
from broker.jsonerrors import JsonErrorsServer, error_response, quoted, serve_json_errors, unsupported_version
from broker.metrics import Metrics
from broker.tokens.families import FamilyManager
from broker.tokens.model import Token, TokenCache
from broker.tokens.rotator import Rotator

log = logging.getLogger("broker.api")


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


class AcceptPreferences:
    """Whether a request asks for the bare token, remembered per distinct Accept header: a
    fleet's clients send a handful of them, every fetch the same one."""

    LIMIT = 64  # distinct headers kept; a longer header than REMEMBERED_LENGTH is never kept
    REMEMBERED_LENGTH = 256

    def __init__(self) -> None:
        self._remembered = functools.lru_cache(maxsize=self.LIMIT)(prefers_plain)

    def wants_plain(self, headers: Mapping[str, str]) -> bool:
        accept = headers.get("Accept")
        if accept is None:
            return False
        return self._remembered(accept) if len(accept) <= self.REMEMBERED_LENGTH else prefers_plain(accept)


def prefers_plain(accept: str) -> bool:
    """Whether ``accept`` ranks ``text/plain`` above JSON: the bare token only when it is asked
    for with a higher weight than ``application/json`` gets (explicitly or by a wildcard);
    a tie keeps the JSON default (``application/json, text/plain, */*``, axios' default)."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        weights.setdefault(media.lower(), _weight(params))
    plain = weights.get("text/plain", 0.0)
    as_json = max(weights.get(media, 0.0) for media in ("application/json", "application/*", "*/*"))
    return plain > as_json


def _weight(params: list[str]) -> float:
    """The q parameter (RFC 9110 §12.4.2): 0 to 1; 1 when absent, 0 when malformed."""
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0



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
    # Whether the client_crl now in force revokes a caller (None: no client_crl). The handshake
    # checks new connections; this catches those opened before a reload brought the CRL in.
    revoked: Callable[[Caller], bool] | None = None
    token_bodies: TokenBodies = field(default_factory=TokenBodies)
    accept: AcceptPreferences = field(default_factory=AcceptPreferences)
    grants: Grants = field(default_factory=Grants)


DEPS = web.AppKey("deps", ApiDeps)

# aiohttp's default request-line limit (8190 bytes) answers a longer line with a plain-text 400
# before routing, so the caller gets no JSON error. A generous limit lets absurd profile names
# (thousands of characters) reach the handlers and get the usual JSON 403/404; only request
# lines beyond this still get aiohttp's own plain-text 400. Per-connection memory stays small.
MAX_REQUEST_LINE = 32 * 1024

KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this long


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
    404: ("no such endpoint; the API is GET /v1/tokens/{profile}, GET /v1/tokens, GET /v1/whoami, "
          "POST /v1/tokens/{profile}, POST /v1/tokens/{profile}/rotate, POST /v1/tokens/{profile}/revoke, "
          "POST /v1/refresh, GET /v1/families, DELETE /v1/families/{family}"),
    405: "method not allowed for this endpoint",
    413: "request body too large",
}


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The query parameters each route takes; every other route takes none. A typo (?minttl=600)
# must not quietly get a token that lasts less than the caller asked for.
QUERY_PARAMETERS = {("GET", "/v1/tokens/{profile}"): ("min_ttl",)}


def _unknown_query(request: web.Request) -> ApiError | None:
    if isinstance(request.match_info, MatchInfoError):
        return None  # the router's 404 or 405 says more
    route = _route_label(request)
    taken = QUERY_PARAMETERS.get((request.method, route), ())
    unknown = [name for name in request.query if name not in taken]
    if not unknown:
        return None
    takes = f"takes only {', '.join(taken)}" if taken else "takes no query parameters"
    return ApiError(400, f"unknown query parameter {quoted(unknown[0], 40)}; {request.method} {route} {takes}")

def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response``, then close the connection at once. Left to aiohttp, a request whose
    body was not read to the end keeps its connection up to 10 s more ("lingering close"),
    waiting for a body that, after a 408, is not coming: a slow client would hold it 11 s."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # graceful: what was written goes out before the close
    return response


async def read_body(request: web.Request) -> bytes:
    """The whole request body, within the listener's bounds: ``max_body_bytes`` also for a
    chunked body (no Content-Length to refuse it by), and how long it may take to arrive.
    Either way the connection, whose body is left half read, is closed after the answer."""
    deps = request.app[DEPS]
    try:
        async with asyncio.timeout(deps.body_read_timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {deps.body_read_timeout:g}s",
                       close=True) from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is over the limit of {deps.max_body_bytes} bytes", close=True) from None


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
        if request.query_string and (unknown := _unknown_query(request)) is not None:
            raise unknown
        if request.body_exists:
            # Read (and bounded) before any handler acts: a route that takes no body, such as
            # starting a family, would otherwise mint first and leave the body to aiohttp.
            await read_body(request)
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, exc.code, exc.headers)
        if exc.close:
            return await _answer_and_close(request, response)
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


def protocol_factory(runner: web.AppRunner) -> Callable[[], RequestHandler]:
    """What ``loop.create_server`` needs: aiohttp's handler for ``runner``, with JSON errors."""
    server = runner.server
    assert isinstance(server, JsonErrorsServer), "runner.setup() first, on an app from make_app"
    return server


def make_app(deps: ApiDeps) -> web.Application:
    from broker.api import handlers  # late: handlers import this module's helpers

    app = web.Application(middlewares=[errors_middleware], client_max_size=deps.max_body_bytes,
                          handler_args={"max_line_size": MAX_REQUEST_LINE, "keepalive_timeout": KEEPALIVE_TIMEOUT})
    app[DEPS] = deps
    app.on_response_prepare.append(_no_store)
    serve_json_errors(app)
    handlers.add_routes(app)
    return app
