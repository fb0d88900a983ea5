"""The ops listener: /healthz, /readyz, /metrics (plain HTTP, loopback by default)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.jsonerrors import error_response, serve_json_errors, unsupported_version
from broker.clock import Clock
from broker.metrics import Metrics
from broker.ops.health import readiness
from broker.tokens.model import TokenCache


@dataclass(frozen=True)
class OpsDeps:
    cache: TokenCache
    metrics: Metrics
    clock: Clock
    audit_ok: Callable[[], bool]
    audit_required: bool
    vault_status: Callable[[], tuple[bool, str | None]]
    state_error: Callable[[], str | None] = lambda: None
    per_job_profiles: tuple[str, ...] = ()
    family_state_error: Callable[[], str | None] = lambda: None
    tls_error: Callable[[float], str | None] = lambda now: None
    tls_reload_error: Callable[[], str | None] = lambda: None


OPS = web.AppKey("ops", OpsDeps)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[OPS]
    authenticated, vault_error = deps.vault_status()
    now = deps.clock.now()
    result = readiness(now, deps.cache.all(), deps.audit_ok(), authenticated, vault_error,
                       deps.audit_required, state_error=deps.state_error(),
                       per_job=deps.per_job_profiles, family_state_error=deps.family_state_error(),
                       tls_error=deps.tls_error(now), tls_reload_error=deps.tls_reload_error())
    return web.json_response(result.details, status=200 if result.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    deps = request.app[OPS]
    body = generate_latest(deps.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-store"


OPS_ROUTES = "GET /healthz, GET /readyz, GET /metrics"


@web.middleware
async def _http_1x_only(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """HTTP/1.x only, and the router's 404 and 405 in the JSON shape the rest of both listeners use."""
    refused = unsupported_version(request)
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(404, f"no such endpoint; the ops listener serves {OPS_ROUTES}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(405, f"method {request.method} not allowed here; use GET",
                              headers={"Allow": exc.headers.get("Allow", "GET")})


def make_ops_app(deps: OpsDeps) -> web.Application:
    app = web.Application(middlewares=[_http_1x_only])
    app[OPS] = deps
    app.on_response_prepare.append(_no_store)  # health and metrics are of this moment
    # A misdirected client may send a Vault token in a header here: malformed requests get the
    # API listener's JSON error, which never quotes the request, and no traceback in the log.
    serve_json_errors(app)
    for path, handler in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics)):
        app.router.add_get(path, handler)
    return app
