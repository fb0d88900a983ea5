"""JSON errors for both HTTP listeners (the mTLS API and the ops endpoint).

aiohttp answers some requests before any route or middleware sees them — malformed HTTP, an
unsupported HTTP version — in plain text that can quote the client's bytes. Both listeners give
every caller the same ``{"error": CODE, "message": SENTENCE}`` shape instead, and never repeat
what the client sent: a misdirected client may have put a credential in a header.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker.errors import describe_bug

log = logging.getLogger("broker.http")

ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
    417: "expectation_failed", 429: "rate_limited", 431: "headers_too_large", 500: "internal", 503: "unavailable",
}


# Where a token could start: quoting a caller's input from there on would repeat part of it.
_TOKEN_START = re.compile(r"(?<![A-Za-z0-9])(?:hvs|hvb|hvr|s|b|r)\.")


def quoted(text: str, limit: int) -> str:
    """A caller's input for an error message: at most ``limit`` characters, and never anything
    that may be (the start of) a Vault token."""
    if _TOKEN_START.search(text):
        return "(a value shaped like a Vault token, not repeated)"
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": code or ERROR_CODES.get(status, "error"), "message": message}).encode()


def error_response(status: int, message: str, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, code), headers=headers,
                        content_type="application/json", charset="utf-8")


_SERVED_VERSIONS = (HttpVersion10, HttpVersion11)


def unsupported_version(request: web.BaseRequest) -> web.Response | None:
    """A JSON 400 for a request that is not HTTP/1.0 or 1.1, else None. aiohttp's parser reads
    ``HTTP/2.0`` and a bare HTTP/0.9 request line without complaint, and both would be served."""
    if request.version in _SERVED_VERSIONS:
        return None
    response = error_response(400, "only HTTP/1.0 and HTTP/1.1 are served", headers={"Cache-Control": "no-store"})
    response.force_close()
    return response


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
    started on (the ops listener uses aiohttp's own ``SockSite``), and refuses an unmet
    ``Expect`` before routing (:func:`refuse_unmet_expectation`). aiohttp has no public hook for
    the handler class, so wrap the method its runner calls to build the server."""
    make_handler = app._make_handler  # noqa: SLF001

    def make(**kwargs: object) -> web.Server:
        plain = make_handler(**kwargs)  # type: ignore[arg-type]
        return JsonErrorsServer(_meeting_expectations(plain.request_handler), request_factory=plain.request_factory,
                                handler_cancellation=plain.handler_cancellation, loop=plain._loop,  # noqa: SLF001
                                **plain._kwargs)  # noqa: SLF001

    app._make_handler = make  # type: ignore[method-assign]  # noqa: SLF001


def _meeting_expectations(handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]]
                          ) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    async def handle(request: BaseRequest) -> web.StreamResponse:
        return refuse_unmet_expectation(request) or await handler(request)

    return handle


def refuse_unmet_expectation(request: BaseRequest) -> web.Response | None:
    """A JSON 417 for an ``Expect`` other than 100-continue, else None. It runs before routing
    because aiohttp's own answer — a plain-text 417 quoting the header — comes from the route's
    Expect handler, which a path or method that does not exist has no way to replace.
    100-continue is left to aiohttp, which answers it once a route takes the request."""
    expectation = request.headers.get("Expect")
    if expectation is None or request.version != HttpVersion11 or expectation.lower() == "100-continue":
        return None  # HTTP/1.0 has no Expect (RFC 9110 10.1.1): ignored, as aiohttp does
    response = error_response(417, "the only Expect header served here is 100-continue",
                              headers={"Cache-Control": "no-store"})
    response.force_close()  # the client may or may not send the body it announced
    return response
