"""Revocations that must happen later: a previous token at the end of its grace window.

The queue is persisted on every change, so a restart (even after SIGKILL) still revokes what
was promised. Revocation is by accessor; a token Vault no longer knows counts as revoked.
"""

from __future__ import annotations

import asyncio
import logging
import random

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.errors import AuditUnavailable, TokenInvalid, VaultError
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.store import PendingRevocation, StateStore
from broker.vault.auth import Authenticator
from broker.vault.client import VaultClient

log = logging.getLogger("broker.revocations")


class RevocationQueue:
    def __init__(
        self,
        store: StateStore,
        vault: VaultClient,
        auth: Authenticator,
        clock: Clock,
        audit: AuditLog,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        self._auth = auth
        self._clock = clock
        self._audit = audit
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._pending: list[PendingRevocation] = []
        self._failures = 0
        self._wake = asyncio.Event()

    def load(self) -> None:
        self._pending = self._store.load_revocations()
        self._metrics.revocations_pending.set(len(self._pending))

    @property
    def pending(self) -> tuple[PendingRevocation, ...]:
        return tuple(self._pending)

    async def schedule(self, entry: PendingRevocation) -> None:
        self._pending.append(entry)
        await self._persist()
        self._wake.set()

    async def _done(self, entry: PendingRevocation) -> None:
        # Both the timer and an admin revoke may finish the same entry; the second is a no-op.
        if entry in self._pending:
            self._pending.remove(entry)
            await self._persist()

    async def _persist(self) -> None:
        self._metrics.revocations_pending.set(len(self._pending))
        await self._store.save_revocations(list(self._pending))

    async def revoke(self, entry: PendingRevocation, reason: str) -> None:
        """Revoke one token now; raises VaultError (retryable or not) if Vault did not confirm."""
        try:
            await self._auth.call(lambda: self._vault.revoke_accessor(entry.accessor))
        except TokenInvalid:
            pass  # already gone at Vault: the outcome we wanted
        log.info("token_revoked profile=%s generation=%s token_fp=%s reason=%s",
                 entry.profile, entry.generation, entry.token_fp, reason)
        try:
            self._audit.event("token_revoked", profile=entry.profile, generation=entry.generation,
                              token_fp=entry.token_fp, reason=reason)
        except AuditUnavailable:
            pass  # the revocation happened; refusing to record it would only keep a token alive

    async def revoke_or_queue(self, entry: PendingRevocation, reason: str) -> None:
        """Revoke now; if Vault cannot confirm, keep it queued and retry with backoff."""
        try:
            await self.revoke(entry, reason)
        except VaultError:
            await self.schedule(entry)

    async def revoke_due(self) -> None:
        now = self._clock.now()
        for entry in [e for e in self._pending if e.revoke_at <= now]:
            try:
                await self.revoke(entry, "grace_ended")
            except VaultError as exc:
                self._failures += 1
                log.warning("revocation_failed profile=%s generation=%s error=%s",
                            entry.profile, entry.generation, exc)
                return
            self._failures = 0
            await self._done(entry)

    async def revoke_profile_now(self, profile: str, reason: str) -> None:
        """Incident response: everything still pending for ``profile`` is revoked at once."""
        for entry in [e for e in self._pending if e.profile == profile]:
            await self.revoke(entry, reason)
            await self._done(entry)

    async def revoke_family_now(self, family: str, reason: str) -> None:
        """A family ended (released, reused, expired): its tokens in grace go too."""
        for entry in [e for e in self._pending if e.family == family]:
            await self.revoke(entry, reason)
            await self._done(entry)

    def _next_delay(self) -> float:
        now = self._clock.now()
        if not self._pending:
            return 3600.0
        if self._failures:
            return policy.backoff_delay(self._failures, self._rng.random(), now, None)
        return max(0.0, min(e.revoke_at for e in self._pending) - now)

    async def run(self) -> None:
        while True:
            await self.revoke_due()
            await sleep_or_wake(self._clock, self._next_delay(), self._wake)
