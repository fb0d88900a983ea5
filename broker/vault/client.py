"""The only module that imports hvac.

hvac is blocking, so every call runs on a small dedicated thread pool with a timeout; the event
loop never waits on Vault. Per-job family calls get a pool of their own (``lane``), so a burst of
job starts cannot take the threads the broker's own work needs (shared-profile rotations and
checks, its login and renewal, revocations). A call's timeout starts when a thread picks it up:
waiting behind other slow calls is not Vault being slow. The wait for a thread is bounded too
(``queue_timeout``), so nothing waits forever. Every failure is classified here, once, into the ``VaultError``
tree (retryable ``VaultUnavailable`` / ``VaultPermissionDenied`` vs the fatal rest), and every
call is counted in ``broker_vault_requests_total`` and timed. Responses are reduced to the
fields the broker needs: Vault's lookup answers carry the token itself (``id``), so raw
responses never leave this module. The reduction runs inside the classified call, so an
answer without a needed field is a ``VaultError`` like any other failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hx
import requests

from broker.config import redact_tokens
from broker.errors import (
    AuthRejected,
    TokenInvalid,
    VaultError,
    VaultPermissionDenied,
    VaultRequestRejected,
    VaultUnavailable,
)
from broker.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("broker.vault")


@dataclass(frozen=True)
class Login:
    """The broker's own credential after a login. ``ttl`` 0 means it never expires."""

    token: str = field(repr=False)
    accessor: str = field(repr=False)
    ttl: float
    renewable: bool
    # The auth method's metadata (AppRole: role_name, which no other call tells us).
    meta: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class NewSecretId:
    """A freshly generated AppRole secret_id; both values are credentials, so never shown."""

    secret_id: str = field(repr=False)
    accessor: str = field(repr=False)


@dataclass(frozen=True)
class Minted:
    token: str = field(repr=False)
    accessor: str = field(repr=False)
    ttl: float
    orphan: bool


@dataclass(frozen=True)
class TokenInfo:
    ttl: float
    expire_time: float | None
    renewable: bool
    orphan: bool
    meta: dict[str, str]


@dataclass(frozen=True)
class VaultClientConfig:
    address: str
    timeout: float = 5.0  # per socket operation; a whole call may take 2 * timeout + 1 s
    ca_cert: str | None = None
    workers: int = 4  # threads of the broker's own lane (and of each lane made with ``lane``)
    queue_timeout: float = 30.0  # how long a call may wait for a free thread before it fails

    @property
    def call_timeout(self) -> float:
        """The bound of one call from the moment a thread runs it. The HTTP timeout bounds each
        socket operation; a call has a few (connect, send, a slow answer), hence the margin."""
        return self.timeout * 2 + 1


class _Timing:
    """When a worker thread started and finished one call (perf_counter), for its bound and the
    duration metric; None until then. Written by the thread, read on the event loop."""

    __slots__ = ("started", "ended")

    def __init__(self) -> None:
        self.started: float | None = None
        self.ended: float | None = None


def _start_call_bound(bound: asyncio.Timeout, seconds: float) -> None:
    """On the event loop, once a thread has picked a call up: from now on only the call's own
    bound applies, not what was left of the wait for a thread."""
    if bound.expired():
        return
    try:
        bound.reschedule(asyncio.get_running_loop().time() + seconds)
    except RuntimeError:
        pass  # the caller already stopped waiting (the call ended, or it was cancelled)


# AppRole role_ids and secret_ids are UUIDs; Vault or a proxy in front of it may echo one.
_UUID_IN_TEXT = re.compile(r"(?<![0-9A-Fa-f-])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![0-9A-Fa-f-])")


# hvac appends ", on post http://vault:8200/v1/auth/approle/login": Vault's address and API
# paths, which the operation name already stands for, have no place in a job's 503 or the audit.
_REQUEST_IN_TEXT = re.compile(r",? on (?:get|post|put|patch|delete|list|head) \S+", re.IGNORECASE)


def _message(exc: hx.VaultError) -> str:
    """What Vault (or a proxy before it) answered, fit for logs, audit and HTTP answers: the
    text can echo parts of the request, so anything credential-shaped goes, then the length."""
    text = _REQUEST_IN_TEXT.sub("", " ".join(str(exc).split()))
    text = redact_tokens(text)
    text = _UUID_IN_TEXT.sub("<redacted id>", text)
    return text[:300] or type(exc).__name__


class MalformedAnswer(Exception):
    """Vault answered 2xx, but without a field the broker needs (a proxy's page, a 204...)."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def classify(operation: str, exc: BaseException) -> VaultError:
    """Map any failure of a Vault call to the broker's error tree, in one place.

    Only Vault's own error text is kept (redacted). Any other exception's text is never used:
    requests quotes a bad header value whole, and that header is X-Vault-Token.
    """
    if isinstance(exc, VaultError):
        return exc
    if isinstance(exc, (requests.exceptions.Timeout, TimeoutError)):
        return VaultUnavailable(operation, "timed out waiting for Vault")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return VaultUnavailable(operation, "cannot connect to Vault")
    if isinstance(exc, MalformedAnswer):
        # Retryable: the likely cause is something between us and Vault, not Vault itself.
        return VaultUnavailable(operation, f"unexpected answer from Vault: it has no {exc.field}")
    if not isinstance(exc, hx.VaultError):
        return VaultUnavailable(operation, f"unexpected {type(exc).__name__} (its text is not shown: it may "
                                           "contain a credential)")
    raw = str(exc)
    msg = _message(exc)
    # OpenBao answers 500 for an accessor it does not know; that is "already gone", not an outage.
    if operation == "destroy_secret_id" and "failed to find accessor entry" in raw:
        return TokenInvalid(operation, "secret_id accessor is not known to Vault")
    # Also a 500, and no outage: only a new login helps, so it must not read as retryable.
    if operation == "renew_self" and "past the max TTL" in raw:
        return VaultRequestRejected(operation, "the token is at its max TTL and cannot be renewed")
    if isinstance(exc, (hx.VaultDown, hx.InternalServerError, hx.BadGateway, hx.RateLimitExceeded)):
        return VaultUnavailable(operation, msg)
    is_login = operation.startswith("login")
    if is_login and isinstance(exc, (hx.InvalidRequest, hx.Forbidden, hx.Unauthorized, hx.InvalidPath)):
        return AuthRejected(operation, msg)
    if isinstance(exc, hx.Forbidden) and operation == "lookup_token" and "bad token" in msg:
        return TokenInvalid(operation, "token is not known to Vault")
    if isinstance(exc, (hx.Forbidden, hx.Unauthorized)):
        return VaultPermissionDenied(operation, msg)
    if isinstance(exc, hx.InvalidRequest) and "invalid accessor" in msg:
        return TokenInvalid(operation, "accessor is not known to Vault")
    if isinstance(exc, (hx.InvalidRequest, hx.InvalidPath, hx.ParamValidationError, hx.UnsupportedOperation)):
        return VaultRequestRejected(operation, msg)
    return VaultUnavailable(operation, f"{type(exc).__name__}: {msg}")


def _expire_time(value: Any) -> float | None:
    if not value:
        return None
    text = str(value)
    # Vault gives nanoseconds ("...:42.570176361Z"); fromisoformat takes at most microseconds.
    if "." in text:
        head, _, frac = text.partition(".")
        digits = "".join(ch for ch in frac if ch.isdigit())
        tail = frac[len(digits):]
        text = f"{head}.{digits[:6]}{tail}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _field(answer: Any, *path: str) -> Any:
    """``answer[path[0]][path[1]]...``; MalformedAnswer (classified like any failure of the
    call) when a level is missing or null, so an odd answer cannot surface as a KeyError."""
    value = answer
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            raise MalformedAnswer(".".join(path))
        value = value[key]
    return value


def _login(answer: Any) -> Login:
    auth = _field(answer, "auth")
    return Login(token=str(_field(answer, "auth", "client_token")), accessor=str(auth.get("accessor") or ""),
                 ttl=float(auth.get("lease_duration") or 0), renewable=bool(auth.get("renewable")),
                 meta=dict(auth.get("metadata") or {}))


def _token_info(data: dict[str, Any]) -> TokenInfo:
    return TokenInfo(
        ttl=float(data.get("ttl") or 0),
        expire_time=_expire_time(data.get("expire_time")),
        renewable=bool(data.get("renewable")),
        orphan=bool(data.get("orphan")),
        meta=dict(data.get("meta") or {}),
    )


# Every Vault worker thread's name starts so: at exit, the ones still in a call are told apart
# from the broker's other threads by it (service.stuck_vault_calls).
WORKER_THREAD_PREFIX = "vault-worker:"


def not_orphan(role: str) -> VaultRequestRejected:
    """For a minted token whose ``orphan`` is false: a token role without orphan=true mints
    children of the broker's own login, and each dies when that login is revoked (every
    re-login, every clean stop), under the jobs using it. The caller revokes the token."""
    return VaultRequestRejected("create_token", f"token role {role} minted a token that is not an orphan; set "
                                f"orphan=true on it (bao write auth/token/roles/{role} orphan=true), or every token "
                                "it mints is revoked with the broker's own login")


class VaultClient:
    def __init__(self, config: VaultClientConfig, metrics: Metrics, *, name: str = "vault",
                 shared: hvac.Client | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix=WORKER_THREAD_PREFIX + name)
        # A lane shares its owner's hvac client, and so its token: a login is seen by every lane.
        self._owns_hvac = shared is None
        self._hvac = shared if shared is not None else self._new_hvac()
        self._lanes: list[VaultClient] = []

    def lane(self, name: str, workers: int) -> VaultClient:
        """The same Vault, the same token, threads of its own: for callers (per-job family
        starts) whose bursts must not make the broker's own calls wait."""
        lane = VaultClient(replace(self._config, workers=workers), self._metrics, name=name, shared=self._hvac)
        self._lanes.append(lane)
        return lane

    def _new_hvac(self, cert: tuple[str, str] | None = None) -> hvac.Client:
        return hvac.Client(url=self._config.address, timeout=self._config.timeout, session=self._session(cert))

    def _session(self, cert: tuple[str, str] | None) -> requests.Session:
        """A requests session that reads the environment once, here, not on every request.

        With ``trust_env`` on, requests scans the whole environment twice for proxy variables
        and reads ~/.netrc for every Vault call: about a fifth of a call's CPU, spent on a
        worker thread holding the GIL that the event loop needs to answer fetches. The same
        variables are honoured — HTTP(S)_PROXY / NO_PROXY for the Vault address,
        REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE when ``ca_cert`` is not set — as of start.
        """
        session = requests.Session()
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(self._config.address)
        session.verify = (self._config.ca_cert or os.environ.get("REQUESTS_CA_BUNDLE")
                          or os.environ.get("CURL_CA_BUNDLE") or True)
        session.cert = cert
        return session

    @property
    def address(self) -> str:
        return self._config.address

    def use_token(self, token: str) -> None:
        self._hvac.token = token

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_hvac:
            self._hvac.adapter.close()

    async def _call(self, operation: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        timing = _Timing()
        bound = asyncio.timeout(self._config.queue_timeout)
        outcome = "error"

        def timed() -> T:
            timing.started = time.perf_counter()
            loop.call_soon_threadsafe(_start_call_bound, bound, self._config.call_timeout)
            try:
                return fn()
            finally:
                timing.ended = time.perf_counter()

        try:
            # First the wait for a thread is bounded, then (from ``timed``) the call itself. A
            # call that times out while still queued is cancelled and never runs.
            # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that arrives as
            # the call completes, and shutdown would wait on a task that never saw it.
            async with bound:
                result = await loop.run_in_executor(self._executor, timed)
            outcome = "success"
            return result
        except Exception as exc:  # noqa: BLE001 - classified right here, once
            if isinstance(exc, TimeoutError) and timing.started is None:
                log.warning("vault_queue_timeout operation=%s pool=%s waited=%ss", operation, self._name,
                            f"{self._config.queue_timeout:g}")
                error: VaultError = VaultUnavailable(
                    operation, f"no free Vault worker within {self._config.queue_timeout:g}s "
                               "(every worker is busy with slower calls)")
            else:
                error = classify(operation, exc)
            outcome = "unavailable" if isinstance(error, VaultUnavailable) else type(error).__name__
            raise error from None
        finally:
            self._metrics.vault_requests.labels(operation, outcome).inc()
            # Time at Vault: from when a thread started the call to its answer (or to giving up
            # on it), never the wait for a thread. A call that never started has none.
            if timing.started is not None:
                ended = timing.ended if timing.ended is not None else time.perf_counter()
                self._metrics.vault_duration.labels(operation).observe(ended - timing.started)

    # --- the broker's own credential -------------------------------------------------

    async def login_approle(self, mount: str, role_id: str, secret_id: str) -> Login:
        def call() -> Login:
            return _login(self._hvac.auth.approle.login(role_id, secret_id, use_token=False, mount_point=mount))

        return await self._call("login_approle", call)

    async def login_cert(self, mount: str, cert_file: str, key_file: str, role: str | None) -> Login:
        def call() -> Login:
            client = self._new_hvac(cert=(cert_file, key_file))
            try:
                # The adapter takes the full API path; without /v1 OpenBao answers 404.
                path = f"/v1/auth/{mount}/login"
                return _login(client.adapter.post(path, json={"name": role} if role else {}))
            finally:
                client.adapter.close()

        return await self._call("login_cert", call)

    def _as(self, token: str, use: Callable[[hvac.Client], T]) -> T:
        """``use`` on a client of its own that holds ``token`` (not the broker's current one);
        runs on a worker thread, inside ``_call``."""
        client = self._new_hvac()
        client.token = token
        try:
            return use(client)
        finally:
            client.adapter.close()

    async def lookup_self_with(self, token: str) -> Login:
        """Treat a given token as a login: check it works and learn its TTL."""

        def call() -> Login:
            data = _field(self._as(token, lambda client: client.auth.token.lookup_self()), "data")
            return Login(token=token, accessor=str(data.get("accessor") or ""),
                         ttl=float(data.get("ttl") or 0), renewable=bool(data.get("renewable")),
                         meta=dict(data.get("meta") or {}))

        return await self._call("login_token", call)

    async def token_is_valid(self, token: str) -> bool:
        """Whether Vault still knows ``token`` (a lookup-self with it, which Vault's default
        policy allows): after a 403, this tells a token that is gone from a policy that lacks
        the capability. Any 403 here counts as gone."""

        try:
            await self._call("lookup_self", lambda: self._as(token, lambda client: client.auth.token.lookup_self()))
        except (VaultPermissionDenied, TokenInvalid):
            return False
        return True

    async def revoke_self_with(self, token: str) -> None:
        """Revoke ``token`` (one of the broker's own logins, no longer used) with itself:
        revoke-self is in Vault's default policy, so no extra capability is needed."""

        await self._call("revoke_self", lambda: self._as(token, lambda client: client.auth.token.revoke_self()))

    async def renew_self(self) -> float:
        """Renew the broker's own token; returns the new TTL in seconds."""
        return await self._call("renew_self", lambda: float(_field(self._hvac.auth.token.renew_self(),
                                                                   "auth", "lease_duration")))

    # --- rotating the broker's own AppRole secret_id ----------------------------------

    async def create_secret_id(self, mount: str, role: str) -> NewSecretId:
        def call() -> NewSecretId:
            answer = self._hvac.auth.approle.generate_secret_id(role, mount_point=mount)
            return NewSecretId(secret_id=str(_field(answer, "data", "secret_id")),
                               accessor=str(_field(answer, "data", "secret_id_accessor")))

        return await self._call("create_secret_id", call)

    async def secret_id_accessor(self, mount: str, role: str, secret_id: str) -> str | None:
        """The accessor of ``secret_id``, or None when Vault does not know it (any more)."""

        def call() -> str | None:
            answer = self._hvac.auth.approle.read_secret_id(role, secret_id, mount_point=mount)
            # An unknown secret_id is an empty 204, which hvac hands back as a bare Response.
            if not isinstance(answer, dict) or not answer.get("data"):
                return None
            return str(_field(answer, "data", "secret_id_accessor"))

        return await self._call("lookup_secret_id", call)

    async def destroy_secret_id_accessor(self, mount: str, role: str, accessor: str) -> None:
        """Raises TokenInvalid when the secret_id is already gone."""

        def call() -> None:
            self._hvac.auth.approle.destroy_secret_id_accessor(role, accessor, mount_point=mount)

        await self._call("destroy_secret_id", call)

    # --- tokens the broker hands out -----------------------------------------------

    async def create_token(self, role: str, policies: tuple[str, ...], ttl: float, meta: dict[str, str]) -> Minted:
        def call() -> Minted:
            answer = self._hvac.auth.token.create(
                role_name=role, policies=list(policies) or None, ttl=f"{int(ttl)}s",
                renewable=False, meta=meta,
            )
            auth = _field(answer, "auth")
            return Minted(token=str(_field(answer, "auth", "client_token")),
                          accessor=str(_field(answer, "auth", "accessor")),
                          ttl=float(auth.get("lease_duration") or 0), orphan=bool(auth.get("orphan")))

        return await self._call("create_token", call)

    async def lookup_token(self, token: str) -> TokenInfo:
        def call() -> TokenInfo:
            return _token_info(_field(self._hvac.auth.token.lookup(token), "data"))

        return await self._call("lookup_token", call)

    async def lookup_accessor(self, accessor: str) -> TokenInfo:
        def call() -> TokenInfo:
            return _token_info(_field(self._hvac.auth.token.lookup_accessor(accessor), "data"))

        return await self._call("lookup_accessor", call)

    async def revoke_accessor(self, accessor: str) -> None:
        await self._call("revoke_accessor", lambda: self._hvac.auth.token.revoke_accessor(accessor))
