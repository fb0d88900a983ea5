"""The routes of DESIGN §3 on the mTLS listener."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping

from aiohttp import web

from broker.api.app import DEPS, ApiDeps, ApiError, read_body
from broker.api.authz import is_admin
from broker.audit import rfc3339
from broker.config import ProfileConfig
from broker.errors import AuditUnavailable, CertError, FamilyLimitReached, FamilyNotFound, RefreshRejected, VaultError
from broker.identity import Caller
from broker.jsonerrors import quoted
from broker.tls import peer_der, require_client_auth_eku
from broker.tokens import policy
from broker.tokens.families import MAX_REFRESH_TOKEN_LENGTH, FamilyManager, Issued
from broker.tokens.model import Token
from broker.tokens.revocations import RevocationPending
from broker.tokens.rotator import BeyondGrant, Rotator


def verified_caller(transport: asyncio.BaseTransport | None) -> Caller:
    """The client behind ``transport``, from its verified certificate; ApiError 403 if unusable."""
    known = transport.get_extra_info("broker_caller") if transport is not None else None
    if known is not None:
        return known  # type: ignore[no-any-return]  # the openssl engine verified it in the handshake
    der = peer_der(transport)
    if der is None:
        raise ApiError(403, "a client certificate is required")
    try:
        require_client_auth_eku(der)
    except CertError as exc:
        raise ApiError(403, str(exc)) from None
    return Caller.from_der(der)


def within_rate(deps: ApiDeps, caller: Caller) -> None:
    """ApiError 429 unless ``caller`` is within its rate; spends one request of its budget."""
    if deps.rate_limiter is None:
        return
    wait = deps.rate_limiter.check(caller.fingerprint, deps.clock.monotonic())
    if wait > 0:
        deps.metrics.count_request("_any", "rate_limited")
        seconds = max(1, math.ceil(wait))
        raise ApiError(429, f"too many requests from this client certificate; retry in {seconds}s",
                       headers={"Retry-After": str(seconds)})


def caller_of(request: web.Request) -> Caller:
    """Who is calling (from the verified client certificate), once they are within their rate."""
    deps = request.app[DEPS]
    caller = verified_caller(request.transport)
    if deps.revoked is not None and deps.revoked(caller):
        _refuse_revoked(deps, caller)
    within_rate(deps, caller)
    return caller


REVOKED = ("this client certificate is revoked (the broker's client_crl lists it); ask for a new one. "
           "The connection is closed")


def _refuse_revoked(deps: ApiDeps, caller: Caller) -> None:
    """A connection opened before the client_crl that lists its certificate was loaded: no
    handshake will check it again, so every request on it is refused and it is closed."""
    deps.metrics.count_request("_any", "revoked_certificate")
    _audit(deps, "token_denied", identity=caller.primary, outcome="denied", reason="certificate revoked",
           certificate_fp=caller.fingerprint[:16])
    raise ApiError(403, REVOKED, close=True)


FORBIDDEN = "this client certificate may not fetch that profile (unknown profiles look the same)"


def _profile_for(deps: ApiDeps, caller: Caller, name: str) -> tuple[ProfileConfig, str]:
    """The profile and the identity that grants it; the same 403 for unknown and forbidden."""
    profile = deps.profiles.get(name)
    identity = deps.grants.identity(caller, profile) if profile else None
    if profile is None or identity is None:
        deps.metrics.count_request(profile.name if profile else "_unknown", "forbidden")
        _audit(deps, "token_denied", profile=name if profile else None, identity=caller.primary,
               outcome="denied", reason="not in allow-list" if profile else "unknown profile")
        raise ApiError(403, FORBIDDEN)
    return profile, identity


def _audit(deps: ApiDeps, event: str, **fields: object) -> None:
    try:
        deps.audit.event(event, **fields)  # type: ignore[arg-type]
    except AuditUnavailable:
        profile = fields.get("profile")
        raise _audit_unavailable(deps, profile if isinstance(profile, str) else "_unknown") from None


def _audit_unavailable(deps: ApiDeps, profile: str) -> ApiError:
    """Counted, so that jobs refused for this show on dashboards, not only in /readyz."""
    deps.metrics.count_request(profile, "audit_unavailable")
    return ApiError(503, "the broker cannot write its audit log, so it hands out no tokens; ops must fix it",
                    code="audit_unavailable", headers={"Retry-After": "5"})


MIN_TTL_DIGITS = 9  # over 31 years: more than any profile's ttl, and a bounded int to print


def _min_ttl(request: web.Request, profile: ProfileConfig) -> float:
    if not request.query_string:
        return 0.0  # the common case: no query to parse
    given = request.query.getall("min_ttl", [])
    if not given:
        return 0.0
    if len(given) > 1:
        raise ApiError(400, f"min_ttl is given {len(given)} times; give it once")
    raw = given[0]
    # ASCII digits only: int() and float() also take " 10", "1_0", "-0", "1.5", "1e3" and
    # non-ASCII digits, none of which is the "whole number of seconds" the message promises.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= MIN_TTL_DIGITS):
        raise ApiError(400, f"min_ttl must be a whole number of seconds (at most {MIN_TTL_DIGITS} digits 0-9), "
                            f"got {quoted(raw, 20)}")
    value = int(raw)
    limit = policy.max_min_ttl(profile.ttl)
    if value > limit:
        raise ApiError(400, f"min_ttl {value}s is more than profile {profile.name} can ever give "
                            f"(ttl {int(profile.ttl)}s; at most {int(limit)}s)")
    return float(value)


def _retry_after(deps: ApiDeps, rotator: Rotator) -> str:
    retry_at = rotator.retry_at
    seconds = retry_at - deps.clock.now() if retry_at is not None else 1.0
    return str(max(1, math.ceil(seconds)))


def _unavailable(deps: ApiDeps, rotator: Rotator, detail: str, min_ttl: float = 0.0) -> ApiError:
    deps.metrics.count_request(rotator.name, "unavailable")
    return ApiError(503, _unavailable_message(deps, rotator, detail, min_ttl),
                    headers={"Retry-After": _retry_after(deps, rotator)})


def _unavailable_message(deps: ApiDeps, rotator: Rotator, detail: str, min_ttl: float) -> str:
    """Why there is no token to serve. A min_ttl fetch whose early rotation failed while a
    shorter token is still valid is told so: "no valid token" would send the caller looking for
    an outage that has not hit them."""
    current, now = rotator.state.current, deps.clock.now()
    if min_ttl > 0 and current is not None and policy.is_servable(now, current):
        return (f"no token of profile {rotator.name} with at least {int(min_ttl)}s left right now: "
                f"the early rotation failed ({detail}); the current token has "
                f"{int(current.expires_at - now)}s left; retry later or ask for a smaller min_ttl")
    return f"no valid token for profile {rotator.name} right now ({detail}); retry later"


async def get_token(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    profile, identity = _profile_for(deps, caller, request.match_info["profile"])
    if profile.mode != "shared":
        raise ApiError(400, f"profile {profile.name} is per-job; "
                            f"start a token family with POST /v1/tokens/{profile.name}")
    min_ttl = _min_ttl(request, profile)
    rotator = deps.rotators[profile.name]
    try:
        token = await rotator.token_with(min_ttl)
    except BeyondGrant as exc:
        raise ApiError(400, str(exc)) from None
    except VaultError as exc:
        raise _unavailable(deps, rotator, exc.detail, min_ttl) from None
    now = deps.clock.now()
    if not policy.is_servable(now, token, min_ttl):
        raise _unavailable(deps, rotator, "the last token expired and Vault has not given a new one")
    content_type, body = served(deps, profile, identity, token, now, plain=deps.accept.wants_plain(request.headers))
    return web.Response(body=body, headers={"Content-Type": content_type})


def served(deps: ApiDeps, profile: ProfileConfig, identity: str, token: Token, now: float,
           plain: bool) -> tuple[str, bytes]:
    """Audit and count a token handed out; its (Content-Type, body). The one place a shared
    token leaves the broker, whichever path the request took."""
    _audit(deps, "token_served", profile=profile.name, identity=identity, generation=token.generation,
           token_fp=token.fp)
    deps.metrics.count_request(profile.name, "served")
    if plain:
        return "text/plain; charset=utf-8", token.value.encode()
    return "application/json", deps.token_bodies.render(profile.name, token, now)


def served_from_cache(deps: ApiDeps, caller: Caller, name: str,
                      headers: Mapping[str, str]) -> tuple[str, bytes] | None:
    """``GET /v1/tokens/{name}`` without a query, answered synchronously when it is the common
    case — a shared profile this caller may fetch, with a current token servable now — as
    (content type, body); None when the request needs :func:`get_token`. Checks that have
    side effects (the rate limit, audit) come after every reason to return None, so a request
    handed on to get_token is not counted twice. Raises ApiError like get_token."""
    profile = deps.profiles.get(name)
    if profile is None or profile.mode != "shared" or (deps.revoked is not None and deps.revoked(caller)):
        return None
    identity = deps.grants.identity(caller, profile)
    token = deps.rotators[name].state.current
    now = deps.clock.now()
    if identity is None or not policy.is_servable(now, token):
        return None
    assert token is not None
    within_rate(deps, caller)
    return served(deps, profile, identity, token, now, plain=deps.accept.wants_plain(headers))


async def list_tokens(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    now = deps.clock.now()
    listed = []
    for profile in deps.profiles.values():
        if deps.grants.identity(caller, profile) is None:
            continue
        state = deps.cache.get(profile.name)
        current = state.current if state else None
        listed.append({
            "name": profile.name,
            "mode": profile.mode,  # per-job profiles have no shared token: generation 0, no times
            "generation": current.generation if current else 0,
            "expires_at": rfc3339(current.expires_at) if current else None,
            "rotates_at": rfc3339(current.rotate_at) if current else None,
            "healthy": profile.mode == "per-job" or bool(
                state and not state.unhealthy and policy.is_servable(now, current)),
        })
    return web.json_response({"profiles": listed})


async def whoami(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    allowed = [p.name for p in deps.profiles.values() if deps.grants.identity(caller, p)]
    return web.json_response({
        "identities": list(caller.identities), "profiles": allowed,
        "admin": is_admin(caller.identities, deps.admin_allow),
    })


def _admin_caller(request: web.Request) -> tuple[ApiDeps, Caller, str]:
    deps = request.app[DEPS]
    caller = caller_of(request)
    name = request.match_info["profile"]
    if not is_admin(caller.identities, deps.admin_allow):
        # Only a known name goes to audit: the path is the caller's to fill (up to 32 KiB).
        _audit(deps, "token_denied", profile=name if name in deps.profiles else None, identity=caller.primary,
               outcome="denied", reason="admin action by a non-admin")
        raise ApiError(403, "admin actions need a certificate matching [admin].allow")
    return deps, caller, name


def _rotator_of(deps: ApiDeps, name: str, per_job_hint: str) -> Rotator:
    rotator = deps.rotators.get(name)
    if rotator is not None:
        return rotator
    profile = deps.profiles.get(name)
    if profile is not None and profile.mode == "per-job":
        raise ApiError(404, f"profile {profile.name} is per-job: {per_job_hint}")
    known = ", ".join(sorted(deps.profiles)) or "none"
    raise ApiError(404, f"no profile named {name[:64]!r}; known: {known}")


def _admin_body(rotator: Rotator) -> dict[str, object]:
    current = rotator.state.current
    return {"profile": rotator.name, "generation": current.generation if current else 0,
            "expires_at": rfc3339(current.expires_at) if current else None}


async def admin_rotate(request: web.Request) -> web.Response:
    deps, caller, name = _admin_caller(request)
    rotator = _rotator_of(deps, name, "it has no shared token to rotate (each job's family rotates its own); "
                                      "revoke ends all its families")
    try:
        await rotator.rotate("admin")
    except VaultError as exc:
        raise _rotation_failed(deps, rotator, exc.detail) from None
    _audit(deps, "admin_rotate", profile=rotator.name, identity=caller.primary, generation=rotator.state.generation)
    return web.json_response(_admin_body(rotator))


def _rotation_failed(deps: ApiDeps, rotator: Rotator, detail: str) -> ApiError:
    """An admin rotation that failed; not a token request, so not counted as one. The admin
    is told whether jobs are still being served, not sent looking for an outage."""
    current, now = rotator.state.current, deps.clock.now()
    if current is not None and policy.is_servable(now, current):
        message = (f"rotating profile {rotator.name} failed ({detail}); the current token (generation "
                   f"{current.generation}, {int(current.expires_at - now)}s left) is still served; retry later")
    else:
        message = f"rotating profile {rotator.name} failed ({detail}) and no valid token is served; retry later"
    return ApiError(503, message, headers={"Retry-After": _retry_after(deps, rotator)})


async def admin_revoke(request: web.Request) -> web.Response:
    deps, caller, name = _admin_caller(request)
    profile = deps.profiles.get(name)
    if profile is not None and profile.mode == "per-job" and deps.families is not None:
        return await _revoke_families(deps, caller, profile.name, deps.families)
    rotator = _rotator_of(deps, name, "")
    _audit(deps, "admin_revoke", profile=rotator.name, identity=caller.primary, generation=rotator.state.generation,
           reason="requested")
    try:
        await rotator.revoke_all()
    except RevocationPending as exc:
        raise _revocation_pending(rotator.name, exc.detail) from None
    except VaultError as exc:
        raise _unavailable(deps, rotator, exc.detail) from None
    return web.json_response(_admin_body(rotator))


async def _revoke_families(deps: ApiDeps, caller: Caller, profile: str, families: FamilyManager) -> web.Response:
    """Incident response for a per-job profile: every live family of it ends now, each of its
    Vault tokens revoked (or queued, due now). New families can start again at once."""
    _audit(deps, "admin_revoke", profile=profile, identity=caller.primary, reason="requested")
    ended, unconfirmed = await families.end_profile(profile, "admin_revoke")
    if unconfirmed:
        raise _revocation_pending(profile, f"{ended} families ended, {unconfirmed} of their tokens not yet "
                                           "confirmed revoked by Vault")
    return web.json_response({"profile": profile, "families_revoked": ended, "pending_revocations": 0})


def _revocation_pending(profile: str, detail: str) -> ApiError:
    # Not 503: the client retries those, and a retry that finds nothing left to revoke and
    # mints would answer 200 while a leaked token may still be valid at Vault.
    return ApiError(502, f"revocation of profile {profile}'s tokens is queued but not confirmed: "
                         f"{detail}; watch broker_revocations_pending and token_revoked in the audit log",
                    code="revocation_pending")


# --- per-job token families --------------------------------------------------------------------

def _families(deps: ApiDeps) -> FamilyManager:
    if deps.families is None:  # only when no profile is per-job: then no route can reach one
        raise ApiError(400, "this broker has no per-job profiles")
    return deps.families


def _issued_body(issued: Issued) -> dict[str, object]:
    family, token = issued.family, issued.token
    return {
        "profile": family.profile, "token": token.value, "expires_at": rfc3339(token.expires_at),
        "refresh_token": issued.refresh_token, "refresh_expires_at": rfc3339(family.expires_at),
        "family": family.id, "generation": family.generation,
    }


def _family_unavailable(deps: ApiDeps, profile: str, exc: VaultError) -> ApiError:
    deps.metrics.count_request(profile, "unavailable")
    return ApiError(503, f"cannot mint a token right now ({exc.detail}); retry later", headers={"Retry-After": "2"})


async def create_family(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    profile, identity = _profile_for(deps, caller, request.match_info["profile"])
    if profile.mode != "per-job":
        raise ApiError(400, f"profile {profile.name} is shared; fetch its token with GET /v1/tokens/{profile.name}")
    try:
        issued = await _families(deps).create(profile.name, caller, identity)
    except VaultError as exc:
        raise _family_unavailable(deps, profile.name, exc) from None
    except AuditUnavailable:
        raise _audit_unavailable(deps, profile.name) from None
    except FamilyLimitReached as exc:
        _audit(deps, "token_denied", profile=profile.name, identity=identity, outcome="denied",
               reason="family limit reached")
        raise ApiError(409, str(exc), code="too_many_families") from None
    return web.json_response(_issued_body(issued))


async def _refresh_token_from(request: web.Request) -> str:
    if request.content_type != "application/json":
        raise ApiError(415, 'send the refresh token as JSON: Content-Type: application/json, {"refresh_token": "..."}')
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, 'the body is not valid JSON; send {"refresh_token": "..."}') from None
    except RecursionError:  # json recurses per nesting level: 64 KiB of "[" is far too deep
        raise ApiError(400, 'the body is JSON nested too deeply; send {"refresh_token": "..."}') from None
    token = body.get("refresh_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise ApiError(400, 'the body must be a JSON object with a string "refresh_token"')
    if len(token) > MAX_REFRESH_TOKEN_LENGTH or not token.isascii():  # ours are URL-safe base64
        request.app[DEPS].metrics.count_request("_any", "refresh_invalid")
        raise ApiError(401, "unknown refresh token, or its family has ended", code="refresh_token_invalid")
    return token


async def refresh(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    refresh_token = await _refresh_token_from(request)
    try:
        issued = await _families(deps).refresh(refresh_token, caller)
    except RefreshRejected as exc:
        if exc.code == "refresh_token_invalid":  # reuse is counted where it is detected, with its revocations
            deps.metrics.count_request(exc.profile or "_any", "refresh_invalid")
        raise ApiError(401, str(exc), code=exc.code) from None
    except VaultError as exc:  # the family's profile is not known here: the caller's guess is no label
        raise _family_unavailable(deps, "_any", exc) from None
    except AuditUnavailable:
        raise _audit_unavailable(deps, "_any") from None
    return web.json_response(_issued_body(issued))


async def release_family(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    caller = caller_of(request)
    try:
        family, unconfirmed = await _families(deps).release(request.match_info["family"], caller)
    except FamilyNotFound as exc:
        raise ApiError(404, str(exc)) from None
    deps.metrics.count_request(family.profile, "released")
    # 200 either way: the family is over and nothing the job does can make Vault answer sooner;
    # "revoked" says whether Vault has confirmed it yet.
    return web.json_response({"family": family.id, "profile": family.profile, "revoked": unconfirmed == 0,
                              "pending_revocations": unconfirmed})


async def list_families(request: web.Request) -> web.Response:
    """The caller's own live families (ids and times, never a token): what a job, or a runner
    whose certificate reached max_families_per_client, needs to release them."""
    deps = request.app[DEPS]
    caller = caller_of(request)
    owned = _families(deps).owned_by(caller.fingerprint) if deps.families is not None else []
    return web.json_response({"families": [
        {"family": f.id, "profile": f.profile, "generation": f.generation, "created_at": rfc3339(f.created_at),
         "refresh_expires_at": rfc3339(f.expires_at)} for f in owned]})


def add_routes(app: web.Application) -> None:
    # No implicit HEAD: a HEAD fetch would mint (min_ttl) and audit token_served for a token
    # that is never delivered.
    routes = [
        ("GET", "/v1/tokens", list_tokens),
        ("GET", "/v1/whoami", whoami),
        ("GET", "/v1/tokens/{profile}", get_token),
        ("POST", "/v1/tokens/{profile}", create_family),
        ("POST", "/v1/tokens/{profile}/rotate", admin_rotate),
        ("POST", "/v1/tokens/{profile}/revoke", admin_revoke),
        ("POST", "/v1/refresh", refresh),
        ("GET", "/v1/families", list_families),
        ("DELETE", "/v1/families/{family}", release_family),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
