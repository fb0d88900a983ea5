"""How the broker logs in to Vault, and keeps its own token alive.

One small interface per boundary: an ``AuthMethod`` turns a credential on disk into a
``Login``. The ``Authenticator`` tries the configured methods in order (primary, then
fallbacks), renews the resulting token, logs in again near its max TTL or when Vault answers
403, and is the only place that knows whether the broker is authenticated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from broker.audit import AuditLog
from broker.clock import Clock
from broker.config import AuthConfig
from broker.errors import AuditUnavailable, AuthRejected, BrokerError, VaultError, VaultPermissionDenied
from broker.metrics import Metrics
from broker.tokens import policy
from broker.vault.client import Login, VaultClient

log = logging.getLogger("broker.vault")
T = TypeVar("T")

RENEW_FRACTION = 2 / 3  # renew when a third of the login's lifetime is left


class AuthMethod(Protocol):
    name: str

    async def login(self, vault: VaultClient) -> Login: ...


def _read_secret(path: Path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise AuthRejected("login", f"cannot read {what} file {path}: {exc.strerror}") from None
    if not value:
        raise AuthRejected("login", f"{what} file {path} is empty")
    return value


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
            token = os.environ.get(self._env or "", "").strip()
            if not token:
                raise AuthRejected("login_token", f"environment variable {self._env} is empty or unset")
        return await vault.lookup_self_with(token)


class AppRoleAuth:
    """AppRole login; with ``rotate_every`` it also replaces its own secret_id (see ``replace_secret_id``)."""

    name = "approle"

    def __init__(self, mount: str, role_id_file: Path, secret_id_file: Path,
                 rotate_every: float | None = None) -> None:
        self._mount = mount or "approle"
        self._role_id_file = role_id_file
        self._secret_id_file = secret_id_file
        self.rotate_every = rotate_every
        # Vault has no secret_id → role lookup; our own login's metadata is the one place that
        # names the role, so rotation waits for a first login with this method.
        self._role_name: str | None = None
        # Accessors of secret_ids we replaced but could not destroy yet (Vault was away).
        self._to_destroy: list[str] = []

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

    @property
    def destroys_pending(self) -> bool:
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
        try:
            old_accessor = await vault.secret_id_accessor(self._mount, role, old)
            login = await vault.login_approle(self._mount, role_id, new.secret_id)
            write_atomic(self._secret_id_file, (new.secret_id + "\n").encode(), mode=0o600)
        except (VaultError, OSError):
            # The file still holds the old secret_id, which still works; the new one must not linger.
            self._to_destroy.append(new.accessor)
            raise
        if old_accessor is not None:
            self._to_destroy.append(old_accessor)
        return login, new.accessor

    async def destroy_replaced(self, vault: VaultClient) -> None:
        """Destroy every replaced secret_id; stops at the first Vault error, keeping the rest."""
        role = self._role_name
        while self._to_destroy and role is not None:
            accessor = self._to_destroy[0]
            try:
                await vault.destroy_secret_id_accessor(self._mount, role, accessor)
            except TokenInvalid:
                pass  # already gone: an operator, or a destroy whose answer we never saw
            self._to_destroy.pop(0)
            log.info("secret_id_destroyed method=approle accessor_fp=%s", fingerprint(accessor))


class CertAuth:
    name = "cert"

    def __init__(self, mount: str, cert_file: Path, key_file: Path, role: str | None) -> None:
        self._mount = mount or "cert"
        self._cert_file = cert_file
        self._key_file = key_file
        self._role = role

    async def login(self, vault: VaultClient) -> Login:
        return await vault.login_cert(self._mount, str(self._cert_file), str(self._key_file), self._role)


def method_from_config(cfg: AuthConfig) -> AuthMethod:
    if cfg.method == "token":
        return TokenAuth(cfg.token_file, cfg.token_env)
    if cfg.method == "approle":
        assert cfg.role_id_file is not None and cfg.secret_id_file is not None
        return AppRoleAuth(cfg.mount, cfg.role_id_file, cfg.secret_id_file, cfg.rotate_secret_id)
    if cfg.method == "cert":
        assert cfg.cert_file is not None and cfg.key_file is not None
        return CertAuth(cfg.mount, cfg.cert_file, cfg.key_file, cfg.cert_role)
    raise ValueError(f"unknown auth method {cfg.method!r}")


class Authenticator:
    def __init__(
        self,
        vault: VaultClient,
        methods: Sequence[AuthMethod],
        clock: Clock,
        audit: AuditLog,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        if not methods:
            raise ValueError("at least one auth method is required")
        self._vault = vault
        self._methods = list(methods)
        self._clock = clock
        self._audit = audit
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._login: Login | None = None
        self._logged_in_at = 0.0
        self._ready = asyncio.Event()
        self._relogin: asyncio.Task[None] | None = None
        self.method: str | None = None
        self.last_error: str | None = None

    @property
    def authenticated(self) -> bool:
        return self._login is not None

    def _set_login(self, login: Login | None, method: str | None) -> None:
        self._login = login
        self.method = method
        self._metrics.vault_authenticated.set(1 if login else 0)
        if login is None:
            self._ready.clear()
        else:
            self._vault.use_token(login.token)
            self._logged_in_at = self._clock.now()
            self._ready.set()

    def _record(self, event: str, **fields: str | None) -> None:
        try:
            self._audit.event(event, **fields)
        except AuditUnavailable:
            pass  # readiness already reports the audit failure; a login must not fail over it

    async def login(self) -> Login:
        """Try each method in order; the first that works wins. Raises the last error."""
        last: BrokerError | None = None
        for method in self._methods:
            try:
                login = await method.login(self._vault)
            except VaultError as exc:
                last = exc
                log.warning("vault_login_failed method=%s error=%s", method.name, exc)
                self._record("vault_login_failed", outcome="failure", reason=str(exc), method=method.name)
                continue
            self._set_login(login, method.name)
            self.last_error = None
            log.info("vault_login method=%s ttl=%ss", method.name, int(login.ttl))
            self._record("vault_login", method=method.name)
            return login
        self._set_login(None, None)
        self.last_error = str(last)
        assert last is not None
        raise last

    async def _login_until_success(self) -> None:
        failures = 0
        while True:
            try:
                await self.relogin()
                return
            except VaultError:
                failures += 1
                await self._clock.sleep(policy.backoff_delay(failures, self._rng.random(), self._clock.now(), None))

    async def relogin(self) -> None:
        """Log in again after Vault refused our token; concurrent callers share one attempt."""
        if self._relogin is None or self._relogin.done():
            self._relogin = asyncio.ensure_future(self.login())
        await asyncio.shield(self._relogin)

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a Vault operation with the broker's token; on 403 log in again once and retry."""
        if self._login is None:
            await self.relogin()
        try:
            return await op()
        except VaultPermissionDenied:
            log.warning("vault_permission_denied action=relogin")
            await self.relogin()
            return await op()

    def _renew_at(self, login: Login) -> float | None:
        if login.ttl <= 0:
            return None  # a token without expiry (e.g. a root token in dev) needs no care
        return self._logged_in_at + login.ttl * RENEW_FRACTION

    async def run(self) -> None:
        """Keep the broker logged in for as long as the service runs."""
        await self._login_until_success()
        while True:
            login = self._login
            renew_at = self._renew_at(login) if login else self._clock.now()
            if renew_at is None:
                await self._wait_for_logout()
                continue
            await self._clock.sleep(renew_at - self._clock.now())
            await self._renew_or_relogin()

    async def _wait_for_logout(self) -> None:
        while self._login is not None and self._renew_at(self._login) is None:
            await self._clock.sleep(60)
        if self._login is None:
            await self._login_until_success()

    async def _renew_or_relogin(self) -> None:
        login = self._login
        if login is not None and login.renewable:
            try:
                new_ttl = await self._vault.renew_self()
            except VaultError as exc:
                log.warning("vault_renew_failed error=%s action=relogin", exc)
            else:
                # A renewal that grants much less than before means the max TTL is near.
                if new_ttl >= login.ttl / 2:
                    self._login = Login(login.token, login.accessor, new_ttl, True)
                    self._logged_in_at = self._clock.now()
                    return
        await self._login_until_success()
