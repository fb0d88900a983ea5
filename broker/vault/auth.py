"""How the broker logs in to Vault, and keeps its own token alive.

One small interface per boundary: an ``AuthMethod`` turns a credential on disk into a
``Login``. The ``Authenticator`` tries the configured methods in order (primary, then
fallbacks), renews the resulting token, logs in again near its max TTL or when Vault says our
token is gone, and is the only place that knows whether the broker is authenticated. A login is
kept until it expires or Vault refuses it: a renewal or re-login that fails during an outage does
not throw away a token that still works.

A 403 alone does not mean our token is gone: Vault gives the same answer when the broker's
policy lacks a capability, and logging in again cannot fix that. So a 403 is followed by a
lookup-self (in Vault's default policy): only a token Vault no longer knows is replaced. Every
login that replaces another revokes the old token (revoke-self, in the background, best effort),
and a clean shutdown revokes the last one: logins do not pile up at Vault until their TTL. A
token the operator configured (``method = "token"``) is theirs, and never revoked here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.config import AuthConfig, credential_problem, credential_text
from broker.errors import (
    AuditUnavailable,
    AuthRejected,
    TokenInvalid,
    VaultError,
    VaultPermissionDenied,
    VaultUnavailable,
    describe_bug,
)
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.model import fingerprint
from broker.files import write_atomic
from broker.vault.client import Login, VaultClient

log = logging.getLogger("broker.vault")
T = TypeVar("T")

RENEW_FRACTION = 2 / 3  # renew when a third of the login's lifetime is left
LOGIN_RETRY_FLOOR = 1.0  # seconds: request-driven logins after a failure, at most one per this
PREFERRED_RETRY_BASE = 30.0  # on a fallback, first retry of the better methods; doubles from here
NO_EXPIRY_RETRY_CAP = 3600.0  # retry cap on a fallback token that never expires (no renewal interval)
IDLE_REPLAN = 60.0  # nothing is due (a token without expiry): look again this often
EXPIRY_MARGIN = 1.0  # seconds (at most a tenth of the TTL): a login this close to its end is gone


class AuthMethod(Protocol):
    name: str

    async def login(self, vault: VaultClient) -> Login: ...


def _read_secret(path: Path, what: str) -> str:
    """The credential in ``path``. Anything but one line of it is refused here, in words that
    never quote the file: a second line would otherwise reach an HTTP header, and the error
    requests raises for that quotes the header whole."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthRejected("login", f"cannot read {what} file {path}: {exc.strerror}") from None
    problem = credential_problem(data, what)
    if problem is not None:
        raise AuthRejected("login", f"{what} file {path} {problem}")
    return credential_text(data)


class TokenAuth:
    name = "token"

    def __init__(self, token_file: Path | None, token_env: str | None) -> None:
        self._file = token_file
        self._env = token_env

    async def login(self, vault: VaultClient) -> Login:
        # Read on every login so an operator can drop a new token into the file.
        if self._file is not None:
            token = _read_secret(self._file, "token")
        else:
            value = os.environ.get(self._env or "", "")
            problem = credential_problem(value, "token") if value else "is empty or unset"
            if problem is not None:
                raise AuthRejected("login_token", f"environment variable {self._env} {problem}")
            token = credential_text(value)
        return await vault.lookup_self_with(token)


class AppRoleAuth:
    """AppRole login; with ``rotate_every`` it also replaces its own secret_id (see ``replace_secret_id``)."""

    name = "approle"

    def __init__(self, mount: str, role_id_file: Path, secret_id_file: Path,
                 rotate_every: float | None = None, state_dir: Path | None = None) -> None:
        self._mount = mount or "approle"
        self._role_id_file = role_id_file
        self._secret_id_file = secret_id_file
        self.rotate_every = rotate_every
        # Vault has no secret_id → role lookup; our own login's metadata is the one place that
        # names the role, so rotation waits for a first login with this method.
        self._role_name: str | None = None
        # Accessors of secret_ids to destroy: replaced ones Vault could not be told about yet,
        # and a new one until it has proven itself and is in the file. Kept in the state
        # directory, so that a restart destroys what a crash left (an accessor cannot log in).
        self._pending_file = state_dir / _pending_name(secret_id_file) if state_dir is not None else None
        self._to_destroy: list[str] = self._load_pending()

    async def login(self, vault: VaultClient) -> Login:
        role_id = _read_secret(self._role_id_file, "role_id")
        secret_id = _read_secret(self._secret_id_file, "secret_id")
        login = await vault.login_approle(self._mount, role_id, secret_id)
        self._role_name = login.meta.get("role_name") or self._role_name
        return login

    def secret_id_due_at(self) -> float | None:
        """When the secret_id on disk should be replaced (epoch seconds); None: not configured,
        or the role is not known yet.

        Counted from the file's mtime, so restarts neither postpone rotation forever nor
        rotate at every start.
        """
        if self.rotate_every is None or self._role_name is None:
            return None
        try:
            written = self._secret_id_file.stat().st_mtime
        except OSError:
            written = 0.0  # unreadable: the next step reports why
        return written + self.rotate_every

    def _load_pending(self) -> list[str]:
        if self._pending_file is None:
            return []
        try:
            pending = json.loads(self._pending_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("secret_id_pending_unreadable path=%s error=%s", self._pending_file, exc)
            return []
        return [str(accessor) for accessor in pending] if isinstance(pending, list) else []

    async def _save_pending(self) -> None:
        # On a thread, like every state write: two fsyncs take milliseconds the event loop
        # spends answering fetches.
        if self._pending_file is not None:
            await asyncio.to_thread(write_atomic, self._pending_file, json.dumps(self._to_destroy).encode(), 0o600)

    @property
    def destroys_pending(self) -> bool:
        """Replaced or discarded secret_ids not destroyed yet (or a replacement under way)."""
        return bool(self._to_destroy)

    async def replace_secret_id(self, vault: VaultClient) -> tuple[Login, str]:
        """Put a new, proven secret_id in the file; returns the login made with it and its accessor.

        Order: create new → look up the old one's accessor → log in with the new one → write the
        file atomically → (``destroy_replaced``) destroy the old one. The file only ever holds a
        secret_id that has logged in, so a crash between any two steps leaves a working file;
        the worst a crash leaves behind is one unused secret_id at Vault that no one holds.
        ``vault`` must carry the broker's token, with the secret-id policy paths.
        """
        role = self._role_name
        if role is None:
            raise AuthRejected("rotate_secret_id", "no login with this AppRole yet, so its role name is unknown")
        role_id = _read_secret(self._role_id_file, "role_id")
        old = _read_secret(self._secret_id_file, "secret_id")
        new = await vault.create_secret_id(self._mount, role)
        # Until it has logged in and is in the file, the new one is the one to throw away: if
        # anything below fails, the file still holds the old secret_id, which still works.
        self._to_destroy.append(new.accessor)
        await self._save_pending()
        old_accessor = await vault.secret_id_accessor(self._mount, role, old)
        login = await vault.login_approle(self._mount, role_id, new.secret_id)
        if old_accessor is not None:
            self._to_destroy.append(old_accessor)
            await self._save_pending()  # both, until the file is written: destroy_replaced spares the one in it
        await asyncio.to_thread(write_atomic, self._secret_id_file, (new.secret_id + "\n").encode(), 0o600)
        self._to_destroy.remove(new.accessor)
        await self._save_pending()
        return login, new.accessor

    async def destroy_replaced(self, vault: VaultClient) -> None:
        """Destroy every replaced secret_id, never the one in the file (a crash between writing
        it and updating the pending list leaves it listed); stops at the first Vault error,
        keeping the rest."""
        role = self._role_name
        if not self._to_destroy or role is None:
            return
        in_file = await vault.secret_id_accessor(self._mount, role, _read_secret(self._secret_id_file, "secret_id"))
        while self._to_destroy:
            accessor = self._to_destroy[0]
            if accessor != in_file:
                try:
                    await vault.destroy_secret_id_accessor(self._mount, role, accessor)
                except TokenInvalid:
                    pass  # already gone: an operator, or a destroy whose answer we never saw
                log.info("secret_id_destroyed method=approle accessor_fp=%s", fingerprint(accessor))
            self._to_destroy.pop(0)
            await self._save_pending()


class CertAuth:
    name = "cert"

    def __init__(self, mount: str, cert_file: Path, key_file: Path, role: str | None) -> None:
        self._mount = mount or "cert"
        self._cert_file = cert_file
        self._key_file = key_file
        self._role = role

    async def login(self, vault: VaultClient) -> Login:
        return await vault.login_cert(self._mount, str(self._cert_file), str(self._key_file), self._role)


def _pending_name(secret_id_file: Path) -> str:
    """One file per AppRole method, named after its secret_id file (two methods may share a
    file name in different directories)."""
    digest = hashlib.sha256(str(secret_id_file.resolve()).encode()).hexdigest()[:12]
    return f"secret_ids_to_destroy.{digest}.json"


def method_from_config(cfg: AuthConfig, state_dir: Path | None = None) -> AuthMethod:
    if cfg.method == "token":
        return TokenAuth(cfg.token_file, cfg.token_env)
    if cfg.method == "approle":
        assert cfg.role_id_file is not None and cfg.secret_id_file is not None
        return AppRoleAuth(cfg.mount, cfg.role_id_file, cfg.secret_id_file, cfg.rotate_secret_id, state_dir)
    if cfg.method == "cert":
        assert cfg.cert_file is not None and cfg.key_file is not None
        return CertAuth(cfg.mount, cfg.cert_file, cfg.key_file, cfg.cert_role)
    raise ValueError(f"unknown auth method {cfg.method!r}")


class Authenticator:
    """The broker's own Vault login: which method, renewal, re-login, secret_id rotation.

    One loop (``run``) owns every timed step: renew the login, retry a preferred method while
    on a fallback, rotate the AppRole secret_id. It sleeps until the earliest of them and
    re-plans whenever the login changes under it (a re-login after a 403).
    """

    def __init__(
        self,
        vault: VaultClient,
        methods: Sequence[AuthMethod],
        clock: Clock,
        audit: AuditLog,
        metrics: Metrics,
        rng: random.Random | None = None,
        preferred_retry: float | None = None,
    ) -> None:
        if not methods:
            raise ValueError("at least one auth method is required")
        self._vault = vault
        self._methods = list(methods)
        self._clock = clock
        self._audit = audit
        self._metrics = metrics
        self._rng = rng or random.Random()
        # Read at construction, not import, so a test can shorten it for brokers it builds.
        self._preferred_retry_base = preferred_retry or PREFERRED_RETRY_BASE
        self._login: Login | None = None
        self._current: AuthMethod | None = None
        self._logged_in_at = 0.0  # or last renewed at
        self._valid_until: float | None = None  # when the current login expires; None: never
        self._renew_failures = 0
        self._step_failures = 0
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._relogin: asyncio.Future[Login] | None = None
        self._closed = False  # logout has begun: no new login may be made after it
        # Counts every change of login (a new one, or losing it). A caller notes it before a
        # Vault call; if it changed by the time the call failed, someone already logged in again.
        self._serial = 0
        self._alive_check: tuple[int, asyncio.Future[bool]] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # revocations of replaced logins
        self._login_failed_at: float | None = None
        self._preferred_failures = 0
        self._rotation_failures = 0
        self.method: str | None = None
        self.last_error: str | None = None
        self.preferred_retry_at: float | None = None  # while on a fallback: next try of a better method
        self.rotation_retry_at: float | None = None  # after a failed secret_id rotation step
        self.renew_retry_at: float | None = None  # after a failed renewal or replacement of a valid login

    @property
    def authenticated(self) -> bool:
        return self._login is not None

    def _set_login(self, login: Login | None, method: AuthMethod | None) -> None:
        previous, previous_method = self._login, self._current
        self._serial += 1
        self._login = login
        self._current = method if login is not None else None
        self.method = self._current.name if self._current is not None else None
        self._metrics.vault_authenticated.set(1 if login else 0)
        self._renew_failures = 0
        self.renew_retry_at = None
        if login is None:
            self._valid_until = None
            self._ready.clear()
        else:
            self._vault.use_token(login.token)
            self._logged_in_at = self._clock.now()
            self._valid_until = self._logged_in_at + login.ttl if login.ttl > 0 else None
            self._ready.set()
            if previous is not None and previous.token != login.token:
                self._retire(previous, previous_method, "replaced")
        self._changed.set()

    def _retire(self, login: Login, method: AuthMethod | None, reason: str) -> None:
        """Revoke a login the broker no longer uses, in the background: it must not delay the
        callers waiting for the new one, and a failure only means it lives until its TTL."""
        if method is None:
            return
        if method.name == "token":
            # A token the operator gave us may be used elsewhere too: theirs to revoke, never ours.
            log.info("vault_logout method=token reason=%s action=kept (the operator's token is never revoked "
                     "by the broker)", reason)
            return
        task = asyncio.get_running_loop().create_task(self._revoke_login(login, method.name, reason))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _revoke_login(self, login: Login, method: str, reason: str) -> None:
        accessor_fp = fingerprint(login.accessor) if login.accessor else "unknown"
        try:
            await self._vault.revoke_self_with(login.token)
        except VaultError as exc:
            if not await self._already_gone(login, exc):
                log.warning("vault_logout_failed method=%s accessor_fp=%s reason=%s error=%s action=it expires at "
                            "its TTL", method, accessor_fp, reason, exc)
                self._record("vault_logout", outcome="failure", reason=f"{reason}: {exc}", method=method)
                return
            reason = f"{reason} (already revoked or expired at Vault)"
        log.info("vault_logout method=%s accessor_fp=%s reason=%s", method, accessor_fp, reason)
        # Audited like the login it ends: a security team can tell when each credential stopped.
        self._record("vault_logout", reason=reason, method=method)

    async def _already_gone(self, login: Login, exc: VaultError) -> bool:
        """A login revoked behind the broker's back (the reason it was replaced) cannot revoke
        itself: Vault answers 403. That is the outcome wanted, not a failure to report. Asked
        by accessor with the login now in use (its policy allows lookup-accessor): a 403 to the
        old token itself could also be a policy without revoke-self and lookup-self, and
        then that login is alive. With no other login (shutdown), nothing can tell: a failure."""
        if not isinstance(exc, (VaultPermissionDenied, TokenInvalid)) or self._login is None or not login.accessor:
            return False
        try:
            await self._vault.lookup_accessor(login.accessor)
        except TokenInvalid:
            return True
        except VaultError:
            return False
        return False

    async def logout(self, timeout: float) -> None:
        """Clean shutdown: revoke the broker's own login (unless it is the operator's token) and
        wait, at most ``timeout`` seconds, for that and for revocations of replaced logins.
        From here on no new login is made: a rotation still finishing would otherwise log in
        again, and nothing would ever revoke that login."""
        self._closed = True
        if self._relogin is not None and not self._relogin.done():
            self._relogin.cancel()
        login, method = self._login, self._current
        if login is not None:
            self._set_login(None, None)
            self._retire(login, method, "shutdown")
        if not self._retiring:
            return
        _, unfinished = await asyncio.wait(set(self._retiring), timeout=timeout)
        for task in unfinished:
            task.cancel()
        if unfinished:
            log.warning("vault_logout_failed count=%d error=no answer from Vault within %gs action=they expire at "
                        "their TTL", len(unfinished), timeout)

    def _record(self, event: str, **fields: str | None) -> None:
        try:
            self._audit.event(event, **fields)  # type: ignore[arg-type]
        except AuditUnavailable:
            pass  # readiness already reports the audit failure; a login must not fail over it

    # --- which method: the preference order is applied here and nowhere else ---------------

    async def _first_working(self, methods: Sequence[AuthMethod]) -> tuple[AuthMethod, Login]:
        """Try ``methods`` in order; the first that logs in wins. Raises the last error."""
        last: VaultError | None = None
        for method in methods:
            try:
                return method, await method.login(self._vault)
            except VaultError as exc:
                last = exc
                # The address in the log only (not audit or API answers): "cannot connect" says which Vault.
                log.warning("vault_login_failed method=%s vault=%s error=%s", method.name, self._vault.address, exc)
                self._record("vault_login_failed", outcome="failure", reason=str(exc), method=method.name)
        assert last is not None
        raise last

    def _adopt(self, method: AuthMethod, login: Login) -> None:
        previous = self._current
        self._set_login(login, method)
        self.last_error = None
        log.info("vault_login method=%s ttl=%ss", method.name, int(login.ttl))
        self._record("vault_login", method=method.name)
        self._plan_preferred_retry(fresh_fallback=previous is None or self._rank(previous) == 0)

    def _rank(self, method: AuthMethod) -> int:
        return next(i for i, m in enumerate(self._methods) if m is method)

    def _plan_preferred_retry(self, fresh_fallback: bool) -> None:
        """On a fallback, try the better methods again later: doubling from the base, capped at
        the renewal interval (a renewal that ends in a re-login tries them anyway)."""
        if self._current is None or self._rank(self._current) == 0:
            self._preferred_failures = 0
            self.preferred_retry_at = None
            return
        if fresh_fallback:
            self._preferred_failures = 0
        login = self._login
        assert login is not None
        cap = max(self._preferred_retry_base,
                  login.ttl * RENEW_FRACTION if login.ttl > 0 else NO_EXPIRY_RETRY_CAP)
        delay = min(cap, self._preferred_retry_base * 2 ** min(self._preferred_failures, 20))
        # Up to 10 % early, so a fleet that failed over together does not retry in lockstep.
        self.preferred_retry_at = self._clock.now() + delay * (1 - 0.1 * self._rng.random())

    async def login(self) -> Login:
        """Log in with the first method that works, primary first. Raises the last error."""
        seen = self._serial
        try:
            method, login = await self._first_working(self._methods)
        except VaultError as exc:
            self._login_failed_at = self._clock.monotonic()
            self.last_error = str(exc)
            if self._serial == seen:  # else a login adopted meanwhile stands: keep it
                self._set_login(None, None)
                self._plan_preferred_retry(fresh_fallback=True)  # nothing to come back from
            raise
        self._adopt(method, login)
        return login

    async def _retry_preferred(self) -> None:
        current = self._current
        if current is None:
            return
        try:
            method, login = await self._first_working(self._methods[:self._rank(current)])
        except VaultError:
            self._preferred_failures += 1
            self._plan_preferred_retry(fresh_fallback=False)
            return
        self._adopt(method, login)

    async def _login_until_success(self, seen: int | None = None) -> None:
        """Log in, with backoff between failures. ``seen``: the login serial when the need was
        noticed (default: now). Ends without a login of its own when one happened meanwhile: a
        caller's ``call`` may log in while this sleeps in its backoff."""
        seen = self._serial if seen is None else seen
        failures = 0
        while True:
            try:
                await self.relogin(seen)
                return
            except VaultError:
                seen = self._serial  # what the failed attempt left: no login
                failures += 1
                await self._clock.sleep(policy.backoff_delay(failures, self._rng.random(), self._clock.now(), None))

    async def relogin(self, seen: int | None = None) -> None:
        """Log in again; concurrent callers share one attempt.

        ``seen``: the login serial under which the caller saw its failure. If the broker has
        logged in since, that login is the answer and no other is made (a 403 that raced a
        re-login, a backoff that ended after someone else logged in)."""
        if self._closed:
            raise VaultUnavailable("login", "the broker is shutting down")
        if self._relogin is not None and not self._relogin.done():
            await asyncio.shield(self._relogin)
            return
        if seen is not None and seen != self._serial and self._login is not None:
            return
        self._relogin = asyncio.ensure_future(self.login())
        # Nobody may be left awaiting it (a caller cancelled); its failure is recorded already.
        self._relogin.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._relogin)

    async def _token_gone(self, seen: int, login: Login) -> bool:
        """After a 403 under ``login``: is its token gone at Vault (revoked, expired, a Vault
        restored from backup)? If not, the 403 came from our policy. Every caller refused
        under the same login shares one lookup."""
        check = self._alive_check
        if check is None or check[0] != seen or check[1].done():
            future = asyncio.ensure_future(self._vault.token_is_valid(login.token))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._alive_check = check = (seen, future)
        return not await asyncio.shield(check[1])

    def _policy_denied(self, exc: VaultPermissionDenied) -> VaultPermissionDenied:
        """A 403 to a token Vault knows: the broker's policy lacks a capability. Logging in
        again would get the same policy, so it is reported, not retried with a new login.
        Still retryable: callers back off and try again, and an operator may fix the policy."""
        log.error("vault_permission_denied operation=%s action=none error=%s cause=the broker's Vault policy lacks "
                  "the capability for this call (its token is valid; a new login would not help)",
                  exc.operation, exc.detail)
        return VaultPermissionDenied(exc.operation, f"the broker's Vault policy does not allow this call "
                                                    f"(its token is valid): {exc.detail}")

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a Vault operation with the broker's token. On 403: if our token is gone, log in
        again once (shared with concurrent callers) and retry; if it is valid, or a fresh login
        is refused too, the policy is at fault and the error says so.

        Not logged in, and the last login failed moments ago: fail at once rather than let every
        caller (a burst of per-job requests during an outage) start a login of its own."""
        if self._login is None:
            failed_at = self._login_failed_at
            if failed_at is not None and self._clock.monotonic() - failed_at < LOGIN_RETRY_FLOOR:
                raise VaultUnavailable("login", self.last_error or "not logged in to Vault")
            await self.relogin(self._serial)
        seen, login = self._serial, self._login
        try:
            return await op()
        except VaultPermissionDenied as exc:
            denied = exc
        if login is not None and not await self._token_gone(seen, login):
            raise self._policy_denied(denied)
        log.warning("vault_permission_denied operation=%s action=relogin cause=Vault no longer knows the broker's "
                    "token", denied.operation)
        await self.relogin(seen)
        try:
            return await op()
        except VaultPermissionDenied as exc:
            raise self._policy_denied(exc) from None

    # --- the loop ----------------------------------------------------------------------

    def _renew_at(self, login: Login) -> float | None:
        if login.ttl <= 0:
            return None  # a token without expiry (e.g. a root token in dev) needs no care
        if self.renew_retry_at is not None:
            return self.renew_retry_at
        return self._logged_in_at + login.ttl * RENEW_FRACTION

    def _rotating(self) -> AppRoleAuth | None:
        """The AppRole whose secret_id we rotate: only the one we are logged in with, because
        its login told us the role name and our token carries its secret-id policy."""
        current = self._current
        if isinstance(current, AppRoleAuth) and (current.rotate_every is not None or current.destroys_pending):
            return current  # pending destroys (left by a crash) are done even if rotation was turned off
        return None

    def _rotation_at(self) -> float | None:
        method = self._rotating()
        if method is None:
            return None
        due = self._clock.now() if method.destroys_pending else method.secret_id_due_at()
        if due is None:
            return None
        return max(due, self.rotation_retry_at or due)

    def _next_step(self) -> tuple[float | None, Callable[[], Awaitable[None]]]:
        """The earliest timed step and when it is due (None: nothing is, just watch)."""
        if self._login is None:
            return self._clock.now(), self._login_until_success
        steps: list[tuple[float, Callable[[], Awaitable[None]]]] = []
        renew_at = self._renew_at(self._login)
        if renew_at is not None:
            steps.append((renew_at, self._renew_or_relogin))
        if self.preferred_retry_at is not None:
            steps.append((self.preferred_retry_at, self._retry_preferred))
        rotation_at = self._rotation_at()
        if rotation_at is not None:
            steps.append((rotation_at, self._rotation_step))
        if not steps:
            return None, self._login_until_success
        return min(steps, key=lambda step: step[0])

    async def run(self) -> None:
        """Keep the broker logged in for as long as the service runs."""
        await self._guarded(self._login_until_success)
        while True:
            due, step = self._next_step()
            wait = IDLE_REPLAN if due is None else due - self._clock.now()
            if await sleep_or_wake(self._clock, wait, self._changed):
                continue  # the login changed under us (a re-login after a 403): plan again
            if due is not None:
                await self._guarded(step)

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run one step. An error that nothing classified (a bug, an odd library failure) must
        not end the service: it is logged by type and code location only (its text may quote a
        credential) and the loop goes on after a backoff."""
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - the catch-all of the login loop, on purpose
            self._step_failures += 1
            delay = policy.backoff_delay(self._step_failures, self._rng.random(), self._clock.now(), None)
            self.last_error = f"unexpected {type(exc).__name__} in the Vault login loop"
            log.error("vault_auth_internal_error step=%s error=%s retry_in=%.1fs",
                      getattr(step, "__name__", "step"), describe_bug(exc), delay)
            await self._clock.sleep(delay)
        else:
            self._step_failures = 0

    async def _renew_or_relogin(self) -> None:
        """Renew the login; near its max TTL, replace it with a new one.

        The current login is kept until it expires or Vault refuses it (403): during an outage
        renewal and replacement are retried with backoff (never past the expiry), and the
        broker stays authenticated on the token it holds.
        """
        login = self._login
        if login is None:
            return
        last_chance = self._last_chance()
        if last_chance is not None and self._clock.now() >= last_chance:
            self._expired()
            return
        if login.renewable:
            seen = self._serial
            try:
                new_ttl = await self._vault.renew_self()
            except VaultPermissionDenied as exc:
                try:
                    gone = await self._token_gone(seen, login)
                except VaultUnavailable as down:
                    self._keep_login_and_retry(down)
                    return
                if gone:
                    log.warning("vault_renew_failed error=%s action=relogin", exc)
                    await self._login_until_success(seen)  # Vault forgot the token: nothing left to keep
                    return
                # The policy lacks renew-self: a new login below replaces this one.
                log.warning("vault_renew_failed error=%s action=replace cause=the broker's Vault policy lacks "
                            "renew-self", exc)
            except VaultUnavailable as exc:
                self._keep_login_and_retry(exc)
                return
            except VaultError as exc:
                log.warning("vault_renew_failed error=%s action=relogin", exc)
            else:
                if self._serial != seen:
                    # Another login was adopted while this renewal waited (hvac renewed that one,
                    # its current token): writing this login back would bring back a dead token.
                    return
                now = self._clock.now()
                self._valid_until = now + new_ttl
                # A renewal that grants much less than before means the max TTL is near.
                if new_ttl >= login.ttl / 2:
                    self._login = replace(login, ttl=new_ttl)
                    self._logged_in_at = now
                    self._renew_failures = 0
                    self.renew_retry_at = None
                    self.last_error = None
                    return
        try:
            method, fresh = await self._first_working(self._methods)
        except VaultError as exc:
            self._keep_login_and_retry(exc)
            return
        self._adopt(method, fresh)

    def _last_chance(self) -> float | None:
        """The last moment to use the current login; None: it never expires."""
        login = self._login
        if login is None or self._valid_until is None:
            return None
        return self._valid_until - min(EXPIRY_MARGIN, login.ttl / 10)

    def _expired(self) -> None:
        log.warning("vault_login_expired method=%s action=login", self.method)
        self._set_login(None, None)  # the loop's next step logs in

    def _keep_login_and_retry(self, error: VaultError) -> None:
        """Renewal or replacement failed: keep the login, try again with backoff, the last
        time just before it expires."""
        self._renew_failures += 1
        self.last_error = str(error)
        now = self._clock.now()
        delay = policy.backoff_delay(self._renew_failures, self._rng.random(), now, None)
        last_chance = self._last_chance()
        if last_chance is not None and last_chance - now < policy.MIN_RETRY_DELAY:
            log.warning("vault_renew_failed error=%s action=none_left", error)
            self._expired()
            return
        self.renew_retry_at = now + delay if last_chance is None else min(now + delay, last_chance)
        log.warning("vault_renew_failed error=%s action=keep_login retry_in=%.1fs", error,
                    self.renew_retry_at - now)

    async def _rotation_step(self) -> None:
        """Replace the AppRole secret_id if it is due, then destroy what it replaced or discarded.

        Failures back off (full jitter, 1 s up to 5 min) and never touch the current login.
        Rotation calls go straight to Vault, not through ``call``: a 403 here usually means
        the policy lacks the secret-id paths, which a re-login would not fix.
        """
        method = self._rotating()
        if method is None:
            return
        error: VaultError | OSError | None = None
        due = method.secret_id_due_at()
        if due is not None and due <= self._clock.now():
            try:
                login, accessor = await method.replace_secret_id(self._vault)
            except (VaultError, OSError) as exc:
                error = exc
            else:
                self._set_login(login, method)
                log.info("secret_id_rotated method=approle accessor_fp=%s ttl=%ss", fingerprint(accessor),
                         int(login.ttl))
                self._record("secret_id_rotated", method="approle", accessor_fp=fingerprint(accessor))
        try:
            await method.destroy_replaced(self._vault)
        except (VaultError, OSError) as exc:  # OSError: the state directory took no write
            error = error or exc
        if error is None:
            self._rotation_failures = 0
            self.rotation_retry_at = None
            return
        self._rotation_failures += 1
        delay = policy.backoff_delay(self._rotation_failures, self._rng.random(), self._clock.now(), None)
        self.rotation_retry_at = self._clock.now() + delay
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        log.warning("secret_id_rotation_failed method=approle error=%s retry_in=%.1fs", reason, delay)
