"""One rotator per shared profile: the only writer of that profile's cache entry.

It keeps ``current`` and ``previous``, mints ahead of expiry (``policy.rotate_at``), verifies a
new token before serving it, hands the previous one to the revocation queue for the end of its
grace window, looks ``current`` up every ``check_interval``, and backs off on Vault errors
without ever sleeping past ``current``'s expiry. Rotations are single-flight: a scheduled
rotation, an admin call and any number of ``min_ttl`` fetches share one mint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.config import ProfileConfig
from broker.errors import AuditUnavailable, BrokerError, TokenInvalid, VaultError, VaultUnavailable, describe_bug
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.model import ProfileState, Token, TokenCache
from broker.tokens.revocations import RevocationQueue
from broker.tokens.store import IssuedRecord, PendingRevocation, StateStore
from broker.vault.auth import Authenticator
from broker.vault.client import VaultClient, not_orphan

log = logging.getLogger("broker.rotator")


class BeyondGrant(BrokerError):
    """``min_ttl`` is more than even a fresh token would have: Vault grants this profile's
    tokens less than its ``ttl`` (a token role or system max_ttl). Minting cannot help."""

    def __init__(self, profile: ProfileConfig, min_ttl: float, granted: float) -> None:
        self.limit = policy.max_min_ttl(granted)
        super().__init__(f"min_ttl {int(min_ttl)}s is more than profile {profile.name} can give: Vault grants its "
                         f"tokens {int(granted)}s (the profile asks for {int(profile.ttl)}s; a token role or system "
                         f"max_ttl caps it), so at most {int(self.limit)}s")


class StateUnwritable(Exception):
    """The state directory refused the record of a new token (a message fit for /readyz)."""


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
        # (fingerprint, time): the latest a min_ttl fetch was promised the current token lasts
        self._promised: tuple[str, float] = ("", 0.0)
        # A rotation is recording its new token: the old one's revocation time is fixed already.
        self._swapping = False
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
            # profiles.json still names it, so a queue file that cannot be written now loses nothing.
            await self._revocations.schedule(PendingRevocation(
                accessor=record.accessor, profile=self.name, generation=record.generation,
                token_fp=record.token_fp, revoke_at=min(now + self.profile.grace, record.expires_at),
            ), durable=False)

    def _pending(self, token: Token, revoke_at: float) -> PendingRevocation:
        return PendingRevocation(accessor=token.accessor, profile=self.name, generation=token.generation,
                                 token_fp=token.fp, revoke_at=revoke_at)

    # --- rotation ----------------------------------------------------------------

    async def rotate(self, reason: str) -> ProfileState:
        """Rotate now, or join the rotation already under way. Raises VaultError on failure.

        For callers outside the loop (admin, min_ttl): the loop is asleep until the old
        rotation, check or retry time, and whatever happened here moved those."""
        inflight = self._start(reason)
        inflight.add_done_callback(lambda _: self.wake())  # even if this caller has gone away by then
        return await asyncio.shield(inflight)

    async def _rotate(self, reason: str) -> ProfileState:
        """The loop's own rotations: it looks at the new times when this returns."""
        return await asyncio.shield(self._start(reason))

    def _start(self, reason: str) -> asyncio.Future[ProfileState]:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._rotate_once(reason))
            # Nobody may be left awaiting it (a caller gone away); the failure is already recorded.
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._inflight

    async def _rotate_once(self, reason: str) -> ProfileState:
        async with self._mutating:
            try:
                return await self._mint_verify_swap(reason)
            except VaultError:
                raise
            except Exception as exc:
                # A bug must not stop the profile: keep serving what we have and retry with backoff.
                log.error("rotation_internal_error profile=%s error=%s (a bug: please report it)",
                          self.name, describe_bug(exc))
                self._failed(exc, "internal")
                raise VaultUnavailable("rotate", f"internal error ({type(exc).__name__}); see the broker log") from None

    async def _mint_verify_swap(self, reason: str) -> ProfileState:
        p = self.profile
        generation = self._generation + 1
        meta = {"profile": p.name, "generation": str(generation), "issued_by": "token-broker"}
        # Vault's TTL runs from when it minted, somewhere during the call: counted from before
        # it, a slow answer never makes a token look longer-lived than Vault will honour.
        now = self._clock.now()
        try:
            minted = await self._auth.call(lambda: self._vault.create_token(p.token_role, p.policies, p.ttl, meta))
        except VaultError as exc:
            self._failed(exc, "mint")
            raise
        expires_at = now + minted.ttl
        if minted.ttl < p.ttl - 1:
            # Rotation scales to what was granted, but grace may no longer fit: say so each time.
            log.warning("ttl_capped profile=%s asked=%ds granted=%ds reason=Vault's token role or policy caps the "
                        "TTL; rotation follows the granted TTL, and the previous token may expire before its "
                        "grace ends: raise the role's token_max_ttl or lower the profile's ttl",
                        p.name, int(p.ttl), int(minted.ttl))
        token = Token(
            value=minted.token, accessor=minted.accessor, generation=generation, issued_at=now,
            expires_at=expires_at,
            rotate_at=policy.rotate_at(now, expires_at, p.ttl, p.rotate_after, self._rng.random()),
        )
        self._record("token_minted", generation=generation, token_fp=token.fp, reason=reason)
        if not minted.orphan:
            refused = not_orphan(p.token_role)
            await self._roll_back(token, refused, "verify")
            raise refused
        try:
            await self._auth.call(lambda: self._vault.lookup_token(minted.token))
        except VaultError as exc:
            await self._roll_back(token, exc, "verify")
            raise
        try:
            await self._swap_in(token, reason)
        except OSError as exc:  # the state dir cannot be written: a token we cannot retire is not served
            # Said without the file's path: this text reaches /readyz and the 503s jobs get.
            unwritable = StateUnwritable(f"the state directory cannot be written ({exc.strerror or exc}); "
                                         "the new token was revoked, the current one is still served")
            await self._roll_back(token, unwritable, "record")
            raise VaultUnavailable("rotate", str(unwritable)) from None
        self._generation = generation
        return self.state

    async def _roll_back(self, token: Token, exc: Exception, stage: str) -> None:
        """A minted token that cannot be served (it does not verify, or cannot be recorded for
        retiring after a restart) is never served, and must not linger at Vault."""
        log.warning("rotation_rolled_back profile=%s generation=%s token_fp=%s stage=%s error=%s",
                    self.name, token.generation, token.fp, stage, exc)
        await self._revocations.revoke_or_queue(self._pending(token, self._clock.now()), "rolled_back")
        self._metrics.rotations.labels(self.name, "rolled_back").inc()
        self._record("rotation_rolled_back", generation=token.generation, token_fp=token.fp,
                     outcome="failure", reason=f"{stage}: {exc}")
        self._failed(exc, stage, count_metric=False)

    async def _swap_in(self, token: Token, reason: str) -> None:
        """Persist first, then publish. If a write fails (OSError) nothing has changed: the
        caller rolls the new token back and the current one goes on being served."""
        self._swapping = True
        try:
            await self._record_and_publish(token, reason)
        finally:
            self._swapping = False

    async def _record_and_publish(self, token: Token, reason: str) -> None:
        now = self._clock.now()
        previous = self.state.current
        grace_until = None
        retiring = None
        if previous is not None and previous.expires_at > now:
            promised_fp, promised_until = self._promised
            grace_until = policy.grace_until(now, self.profile.grace, previous,
                                             promised_until if promised_fp == previous.fp else 0.0)
            # Queued before profiles.json names the new token: a kill between the two writes then
            # cannot lose the revocation of a token jobs hold (a restart retires the one named there).
            retiring = self._pending(previous, grace_until)
            await self._revocations.schedule(retiring)
        else:
            previous = None
        try:
            await self._store.set_issued(self.name, IssuedRecord(
                accessor=token.accessor, generation=token.generation, token_fp=token.fp, expires_at=token.expires_at,
            ))
        except OSError:
            if retiring is not None:
                await self._revocations.unschedule(retiring)  # it stays current: it must not be revoked
            raise
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
        if min_ttl > 0 and self._swapping and self._inflight is not None:
            # The revocation time of the token still served was fixed when this swap began: a
            # promise made on it now would not be kept. Serve what the swap publishes instead.
            with contextlib.suppress(VaultError):
                await asyncio.shield(self._inflight)
        now = self._clock.now()
        current = self.state.current
        if policy.is_servable(now, current, min_ttl):
            assert current is not None
            return self._promise(current, min_ttl)
        self._within_grant(current, min_ttl)  # else every such fetch would mint and still fail
        if self._inflight is not None and not self._inflight.done():
            await asyncio.shield(self._inflight)
        elif self._retry_at is None and self.state.consecutive_failures == 0 and policy.is_servable(now, current):
            await self.rotate("min_ttl")
        else:
            raise VaultUnavailable("create_token", self.state.last_error or "no valid token yet")
        current = self.state.current  # now, not the rotation's result: another may have followed
        if not policy.is_servable(self._clock.now(), current, min_ttl):
            self._within_grant(current, min_ttl)
            raise VaultUnavailable("create_token", "no token with that much time left yet")
        assert current is not None
        return self._promise(current, min_ttl)

    def _within_grant(self, current: Token | None, min_ttl: float) -> None:
        """BeyondGrant if Vault's last grant for this profile could not satisfy ``min_ttl``."""
        if current is not None and min_ttl > policy.max_min_ttl(current.ttl):
            raise BeyondGrant(self.profile, min_ttl, current.ttl)

    def _promise(self, token: Token, min_ttl: float) -> Token:
        """Remember how long a min_ttl caller was told ``token`` lasts: its revocation after the
        next rotation waits for that, even past the grace window."""
        if min_ttl > 0:
            fp, until = self._promised
            until = max(until, self._clock.now() + min_ttl) if fp == token.fp else self._clock.now() + min_ttl
            self._promised = (token.fp, until)
        return token

    async def revoke_everything(self, reason: str) -> None:
        """Revoke current, previous and every pending token of the profile now; mint nothing.

        Everything is queued, due now, before the slots are emptied, and every token is tried
        even if one fails: what Vault does not confirm stays queued and the queue's loop retries
        it. Raises RevocationPending (never a plain retryable error) if anything is left."""
        async with self._mutating:
            try:
                await self._revocations.revoke_queued(await self._queue_served(reason), reason)
            finally:
                self.wake()  # with nothing to serve, the loop mints at once

    async def queue_everything(self, reason: str, wait: float) -> list[PendingRevocation]:
        """Step one of ``revoke_everything`` alone (a shutdown, which then revokes the queue of
        every profile within one deadline): no slot serves anything, and every token the profile
        handed out is queued, due now. Returns those entries.

        A rotation still running holds the lock while it waits on Vault (a stalled Vault: up to
        its timeout per call); past ``wait`` the slots are queued without it. A token that
        rotation still swaps in is named in profiles.json, which the next start retires."""
        try:
            async with asyncio.timeout(wait):
                await self._mutating.acquire()
        except TimeoutError:
            log.warning("shutdown_queue_unlocked profile=%s reason=a rotation is still waiting on Vault", self.name)
            return await self._queue_served(reason)
        try:
            return await self._queue_served(reason)
        finally:
            self._mutating.release()

    async def _queue_served(self, reason: str) -> list[PendingRevocation]:
        state = self.state
        now = self._clock.now()
        served = [self._pending(t, now) for t in (state.current, state.previous) if t is not None]
        due = await self._revocations.queue_now(served, reason=reason, profile=self.name)
        # self.state, not the snapshot: a check that failed meanwhile published its count.
        self._publish(dataclasses.replace(self.state, current=None, previous=None, grace_until=None))
        return due

    async def revoke_all(self) -> ProfileState:
        """Incident response: revoke everything the profile handed out, then mint anew.

        If Vault did not confirm every revocation, RevocationPending is raised before minting;
        the loop mints the replacement as soon as it can."""
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
        state = dataclasses.replace(self.state, last_checked_at=now)
        if self._retry_at is None:  # no rotation is being retried: this check is what heals the profile
            state = dataclasses.replace(state, consecutive_failures=0, unhealthy=False, last_error=None)
        else:
            self._retry_at = now  # Vault answers again: retry the rotation now, not after the backoff
        self._publish(state)

    def _check_failed(self, exc: VaultError) -> None:
        state = self.state
        failures, self._next_check_at = self._count_failure("check", exc)
        log.warning("check_failed profile=%s failures=%d error=%s", self.name, failures, exc)
        self._record("check_failed", generation=state.generation, token_fp=state.current.fp if state.current else None,
                     outcome="failure", reason=str(exc))

    async def _invalidated(self, token: Token) -> None:
        """Vault no longer knows the token we serve (revoked elsewhere, restored backup): stop
        serving it at once and replace it."""
        if self.state.current is not token:
            return  # replaced or revoked by us (admin) while the lookup was on its way: not news
        log.warning("token_invalidated profile=%s generation=%s token_fp=%s", self.name, token.generation, token.fp)
        self._record("token_invalidated", generation=token.generation, token_fp=token.fp,
                     outcome="failure", reason="current token is no longer valid at Vault")
        self._publish(dataclasses.replace(self.state, current=None))
        self._retry_at = None
        try:
            await self._rotate("invalidated")
        except VaultError:
            pass  # recorded by the rotation; the loop retries with backoff

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        troubles = 0
        while True:
            try:
                await self._step()
                troubles = 0
            except Exception as exc:  # a bug must not stop the profile, nor (through the TaskGroup) the broker
                troubles += 1
                log.error("rotator_internal_error profile=%s failures=%d error=%s action=retrying with backoff",
                          self.name, troubles, describe_bug(exc))
                self._count_failure("internal", VaultUnavailable("rotator", f"internal error ({type(exc).__name__})"))
                now = self._clock.now()
                delay = policy.backoff_delay(troubles, self._rng.random(), now, self.state.current, self._retry_cap)
                await sleep_or_wake(self._clock, delay, self._wake)

    async def _step(self) -> None:
        now = self._clock.now()
        current = self.state.current
        rotate_due = policy.rotation_due_at(now, current, self._retry_at)
        check_due = policy.check_due_at(now, current, self._next_check_at)
        state = self.state
        grace_over = state.grace_until if state.previous is not None and state.grace_until is not None else float("inf")
        if now >= grace_over:
            # The revocation queue retires the token at Vault; here it only leaves the slot, so
            # /v1/tokens and the previous-slot expiry gauge stop naming it.
            self._publish(dataclasses.replace(state, previous=None, grace_until=None))
        elif now >= rotate_due:
            try:
                await self._rotate("scheduled" if current else "initial")
            except VaultError:
                pass  # recorded in _failed; the next pass waits for retry_at
        elif now >= check_due:
            await self._check()
        else:
            await sleep_or_wake(self._clock, min(rotate_due, check_due, grace_over) - now, self._wake)
