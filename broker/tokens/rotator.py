"""One rotator per shared profile: the only writer of that profile's cache entry.

It keeps ``current`` and ``previous``, mints ahead of expiry (``policy.rotate_at``), verifies a
new token before serving it, hands the previous one to the revocation queue for the end of its
grace window, looks ``current`` up every ``check_interval``, and backs off on Vault errors
without ever sleeping past ``current``'s expiry. Rotations are single-flight: a scheduled
rotation, an admin call and any number of ``min_ttl`` fetches share one mint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.config import ProfileConfig
from broker.errors import AuditUnavailable, TokenInvalid, VaultError, VaultUnavailable
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.model import ProfileState, Token, TokenCache
from broker.tokens.revocations import RevocationQueue
from broker.tokens.store import IssuedRecord, PendingRevocation, StateStore
from broker.vault.auth import Authenticator
from broker.vault.client import VaultClient

log = logging.getLogger("broker.rotator")


class Rotator:
    def __init__(
        self,
        profile: ProfileConfig,
        vault: VaultClient,
        auth: Authenticator,
        cache: TokenCache,
        revocations: RevocationQueue,
        store: StateStore,
        clock: Clock,
        audit: AuditLog,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self.profile = profile
        self._vault = vault
        self._auth = auth
        self._cache = cache
        self._revocations = revocations
        self._store = store
        self._clock = clock
        self._audit = audit
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._generation = 0
        self._retry_at: float | None = None
        self._next_check_at = float("inf")
        self._inflight: asyncio.Future[ProfileState] | None = None
        self._mutating = asyncio.Lock()
        self._retry_cap = policy.retry_cap(profile.check_interval)
        self._wake = asyncio.Event()
        self._publish(ProfileState(profile.name))

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def retry_at(self) -> float | None:
        """When the next attempt after a failure is due, if one failed."""
        return self._retry_at

    @property
    def state(self) -> ProfileState:
        state = self._cache.get(self.name)
        assert state is not None
        return state

    def _publish(self, state: ProfileState) -> None:
        self._cache.publish(state)
        self._metrics.record_state(
            self.name,
            state.current.expires_at if state.current else None,
            state.previous.expires_at if state.previous else None,
            state.generation,
            state.consecutive_failures,
        )

    def _record(self, event: str, **fields: object) -> None:
        try:
            self._audit.event(event, profile=self.name, **fields)  # type: ignore[arg-type]
        except AuditUnavailable:
            pass  # readiness reports a broken audit log; rotation must go on regardless

    async def restore(self) -> None:
        """After a restart: continue the generation count and retire the token we last served.

        Its value was never written to disk, so it cannot be served again; jobs that hold it
        keep it through one grace window, exactly as if a rotation had just happened.
        """
        record = self._store.load_issued().get(self.name)
        if record is None:
            return
        self._generation = record.generation
        now = self._clock.now()
        if record.expires_at > now:
            await self._revocations.schedule(PendingRevocation(
                accessor=record.accessor, profile=self.name, generation=record.generation,
                token_fp=record.token_fp, revoke_at=min(now + self.profile.grace, record.expires_at),
            ))

    def _pending(self, token: Token, revoke_at: float) -> PendingRevocation:
        return PendingRevocation(accessor=token.accessor, profile=self.name, generation=token.generation,
                                 token_fp=token.fp, revoke_at=revoke_at)

    # --- rotation ----------------------------------------------------------------

    async def rotate(self, reason: str) -> ProfileState:
        """Rotate now, or join the rotation already under way. Raises VaultError on failure."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._rotate_once(reason))
            # Nobody may be left awaiting it (a caller gone away); the failure is already recorded.
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._inflight)

    async def _rotate_once(self, reason: str) -> ProfileState:
        async with self._mutating:
            try:
                return await self._mint_verify_swap(reason)
            except VaultError:
                raise
            except Exception as exc:
                # A bug must not stop the profile: keep serving what we have and retry with backoff.
                log.exception("rotation_internal_error profile=%s", self.name)
                self._failed(exc, "internal")
                raise VaultUnavailable("rotate", f"internal error ({type(exc).__name__}); see the broker log") from None

    async def _mint_verify_swap(self, reason: str) -> ProfileState:
        p = self.profile
        generation = self._generation + 1
        meta = {"profile": p.name, "generation": str(generation), "issued_by": "token-broker"}
        try:
            minted = await self._auth.call(lambda: self._vault.create_token(p.token_role, p.policies, p.ttl, meta))
        except VaultError as exc:
            self._failed(exc, "mint")
            raise
        now = self._clock.now()
        expires_at = now + minted.ttl
        token = Token(
            value=minted.token, accessor=minted.accessor, generation=generation, issued_at=now,
            expires_at=expires_at,
            rotate_at=policy.rotate_at(now, expires_at, p.ttl, p.rotate_after, self._rng.random()),
        )
        self._record("token_minted", generation=generation, token_fp=token.fp, reason=reason)
        try:
            await self._auth.call(lambda: self._vault.lookup_token(minted.token))
        except VaultError as exc:
            await self._roll_back(token, exc)
            raise
        try:
            await self._swap_in(token, reason)
        except OSError as exc:  # the state dir cannot be written: a token we cannot retire is not served
            await self._roll_back(token, exc)
            raise VaultUnavailable("rotate", f"cannot persist state: {exc.strerror or exc}") from None
        self._generation = generation
        return self.state

    async def _roll_back(self, token: Token, exc: Exception) -> None:
        """A minted token that does not verify is never served, and must not linger at Vault."""
        log.warning("rotation_rolled_back profile=%s generation=%s token_fp=%s error=%s",
                    self.name, token.generation, token.fp, exc)
        await self._revocations.revoke_or_queue(self._pending(token, self._clock.now()), "rolled_back")
        self._metrics.rotations.labels(self.name, "rolled_back").inc()
        self._record("rotation_rolled_back", generation=token.generation, token_fp=token.fp,
                     outcome="failure", reason=str(exc))
        self._failed(exc, "verify", count_metric=False)

    async def _swap_in(self, token: Token, reason: str) -> None:
        # Persist first: if that fails nothing has changed, and the caller rolls the new token back.
        await self._store.set_issued(self.name, IssuedRecord(
            accessor=token.accessor, generation=token.generation, token_fp=token.fp, expires_at=token.expires_at,
        ))
        now = self._clock.now()
        previous = self.state.current
        grace_until = None
        if previous is not None and previous.expires_at > now:
            grace_until = policy.grace_until(now, self.profile.grace, previous)
            await self._revocations.schedule(self._pending(previous, grace_until))
        else:
            previous = None
        self._retry_at = None
        self._next_check_at = now + self.profile.check_interval
        self._publish(ProfileState(
            name=self.name, current=token, previous=previous, grace_until=grace_until, last_checked_at=now,
        ))
        self._metrics.rotations.labels(self.name, "success").inc()
        log.info("token_rotated profile=%s generation=%s token_fp=%s rotate_at=%.3f expires_at=%.3f reason=%s",
                 self.name, token.generation, token.fp, token.rotate_at, token.expires_at, reason)
        self._record("token_rotated", generation=token.generation, token_fp=token.fp, reason=reason,
                     previous_fp=previous.fp if previous else None)

    def _count_failure(self, stage: str, exc: Exception) -> tuple[int, float]:
        """One more consecutive Vault failure (rotation or check): publish it, unhealthy past
        the threshold. Returns the failure count and when to try again."""
        state = self.state
        failures = state.consecutive_failures + 1
        now = self._clock.now()
        retry_at = now + policy.backoff_delay(failures, self._rng.random(), now, state.current, self._retry_cap)
        self._publish(dataclasses.replace(
            state, consecutive_failures=failures, last_error=f"{stage}: {exc}",
            unhealthy=failures >= self.profile.alert_threshold,
        ))
        return failures, retry_at

    def _failed(self, exc: Exception, stage: str, count_metric: bool = True) -> None:
        now = self._clock.now()
        failures, self._retry_at = self._count_failure(stage, exc)
        if count_metric:
            self._metrics.rotations.labels(self.name, "failure").inc()
        log.warning("rotation_failed profile=%s stage=%s failures=%d retry_in=%.2fs error=%s",
                    self.name, stage, failures, self._retry_at - now, exc)
        self._record("rotation_failed", generation=self._generation + 1, outcome="failure", reason=f"{stage}: {exc}")

    # --- serving helpers -------------------------------------------------------------

    async def token_with(self, min_ttl: float) -> Token:
        """A token with at least ``min_ttl`` seconds left, rotating early if needed.

        Only a valid token that is too short for ``min_ttl`` triggers a rotation from the
        request path, and only while Vault is not failing; with nothing valid, or during an
        outage, callers join a rotation already under way or get an error at once: the loop's
        backoff, not the request rate, decides how often Vault is tried.
        """
        now = self._clock.now()
        current = self.state.current
        if policy.is_servable(now, current, min_ttl):
            assert current is not None
            return current
        if self._inflight is not None and not self._inflight.done():
            state = await asyncio.shield(self._inflight)
        elif self._retry_at is None and policy.is_servable(now, current):
            state = await self.rotate("min_ttl")
        else:
            raise VaultUnavailable("create_token", self.state.last_error or "no valid token yet")
        if not policy.is_servable(self._clock.now(), state.current, min_ttl):
            raise VaultUnavailable("create_token", "Vault granted a shorter TTL than requested")
        assert state.current is not None
        return state.current

    async def revoke_everything(self, reason: str) -> None:
        """Revoke current, previous and every pending token of the profile now; mint nothing."""
        async with self._mutating:
            state = self.state
            self._publish(dataclasses.replace(state, current=None, previous=None, grace_until=None))
            for token in (state.current, state.previous):
                if token is not None:
                    await self._revocations.revoke(self._pending(token, self._clock.now()), reason)
            await self._revocations.revoke_profile_now(self.name, reason)

    async def revoke_all(self) -> ProfileState:
        """Incident response: revoke everything the profile handed out, then mint anew."""
        await self.revoke_everything("admin_revoke")
        return await self.rotate("admin_revoke")

    # --- the loop --------------------------------------------------------------------

    async def _check(self) -> None:
        current = self.state.current
        if current is None:
            return
        try:
            await self._auth.call(lambda: self._vault.lookup_accessor(current.accessor))
        except TokenInvalid:
            await self._invalidated(current)
            return
        except VaultError as exc:
            self._check_failed(exc)
            return
        now = self._clock.now()
        self._next_check_at = now + self.profile.check_interval
        healed = {} if self._retry_at is not None else {"consecutive_failures": 0, "unhealthy": False, "last_error": None}
        self._publish(dataclasses.replace(self.state, last_checked_at=now, **healed))

    def _check_failed(self, exc: VaultError) -> None:
        state = self.state
        failures, self._next_check_at = self._count_failure("check", exc)
        log.warning("check_failed profile=%s failures=%d error=%s", self.name, failures, exc)
        self._record("check_failed", generation=state.generation, token_fp=state.current.fp if state.current else None,
                     outcome="failure", reason=str(exc))

    async def _invalidated(self, token: Token) -> None:
        """Vault no longer knows the token we serve (revoked elsewhere, restored backup): stop
        serving it at once and replace it."""
        log.warning("token_invalidated profile=%s generation=%s token_fp=%s", self.name, token.generation, token.fp)
        self._record("token_invalidated", generation=token.generation, token_fp=token.fp,
                     outcome="failure", reason="current token is no longer valid at Vault")
        state = self.state
        if state.current is token:
            self._publish(dataclasses.replace(state, current=None))
        self._retry_at = None
        try:
            await self.rotate("invalidated")
        except VaultError:
            pass  # recorded by the rotation; the loop retries with backoff

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            now = self._clock.now()
            current = self.state.current
            rotate_due = policy.rotation_due_at(now, current, self._retry_at)
            check_due = self._next_check_at if current is not None else float("inf")
            if now >= rotate_due:
                try:
                    await self.rotate("scheduled" if current else "initial")
                except VaultError:
                    pass  # recorded in _failed; the next pass waits for retry_at
            elif now >= check_due:
                await self._check()
            else:
                await sleep_or_wake(self._clock, min(rotate_due, check_due) - now, self._wake)
