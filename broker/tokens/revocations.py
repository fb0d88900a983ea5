"""Revocations that must happen later: a previous token at the end of its grace window.

The queue is persisted on every change, so a restart (even after SIGKILL) still revokes what
was promised. Revocation is by accessor; a token Vault no longer knows counts as revoked.

A state write that fails (disk full, read-only file system) never loses an entry: the queue
in memory stays authoritative, the failure is logged and shown in ``/readyz``, and the loop
writes the file again with backoff. Only ``schedule`` refuses to change anything when the
write fails, because its callers (a rotation) must not go on with a promise not on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.errors import AuditUnavailable, AuthRejected, TokenInvalid, VaultError, describe_bug
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.store import PendingRevocation, StateStore
from broker.vault.auth import Authenticator
from broker.vault.client import VaultClient

log = logging.getLogger("broker.revocations")


class RevocationPending(VaultError):
    """Vault did not confirm some revocations asked for now. They stay queued and the queue's
    loop retries them; asking again cannot make Vault answer sooner, so this is not retryable
    (a client retrying into a 200 would believe a leaked token was dead)."""

    retryable = False

    def __init__(self, unconfirmed: int, total: int, cause: VaultError) -> None:
        super().__init__("revoke_accessor", f"{unconfirmed} of {total} token(s) not yet confirmed revoked by Vault "
                                            f"({cause.detail}); they stay queued and are retried until Vault confirms")
        self.unconfirmed = unconfirmed


def _keeps_the_entry(exc: VaultError) -> bool:
    """Worth retrying later: Vault was unavailable, or the broker's own login failed (not the
    entry's fault). Anything else is Vault rejecting this very revocation, for good."""
    return exc.retryable or isinstance(exc, AuthRejected)


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
        self._changing = asyncio.Lock()  # one read-modify-write of the queue at a time: none is lost
        self._unsaved = False
        self._write_failures = 0
        self._state_error: str | None = None
        self._wake = asyncio.Event()

    def load(self) -> None:
        self._pending = self._store.load_revocations()
        self._metrics.revocations_pending.set(len(self._pending))

    @property
    def pending(self) -> tuple[PendingRevocation, ...]:
        return tuple(self._pending)

    @property
    def state_error(self) -> str | None:
        """Why the queue on disk is behind the one in memory, while it is."""
        return self._state_error

    # --- changes --------------------------------------------------------------------------

    async def _change(self, change: Callable[[list[PendingRevocation]], list[PendingRevocation]],
                      durable: bool) -> None:
        """Apply ``change`` and persist. ``durable``: if the write fails, raise OSError and
        change nothing; otherwise keep the change in memory and let the loop write it later."""
        async with self._changing:
            changed = change(list(self._pending))
            try:
                await self._save(changed)
            except OSError:
                if durable:
                    raise
            self._pending = changed
            self._metrics.revocations_pending.set(len(changed))

    async def _save(self, pending: list[PendingRevocation]) -> None:
        try:
            await self._store.save_revocations(pending)
        except OSError as exc:
            self._unsaved = True
            self._state_error = f"cannot write revocations.json: {exc.strerror or exc}"
            log.error("state_write_failed file=revocations.json error=%s action=kept in memory, retrying with backoff",
                      exc.strerror or exc)
            raise
        if self._unsaved:
            log.info("state_write_recovered file=revocations.json pending=%d", len(pending))
        self._unsaved = False
        self._state_error = None

    async def _save_again(self) -> None:
        async with self._changing:
            try:
                await self._save(list(self._pending))
            except OSError:
                pass  # logged; the loop backs off

    @staticmethod
    def _with(entries: Sequence[PendingRevocation]) -> Callable[[list[PendingRevocation]], list[PendingRevocation]]:
        """Add ``entries``, one per accessor. For a token already queued the earlier revocation
        wins, with its reason: a promise to revoke now (an admin revoke, a shutdown) must not be
        put off by a later, gentler schedule of the same token (a restart retiring the token it
        last served after a grace). Taking a revocation back is ``unschedule``'s job."""
        def merged(pending: list[PendingRevocation]) -> list[PendingRevocation]:
            by_accessor = {e.accessor: e for e in pending}
            for entry in entries:
                known = by_accessor.get(entry.accessor)
                if known is None or entry.revoke_at <= known.revoke_at:
                    by_accessor[entry.accessor] = entry
            return list(by_accessor.values())

        return merged

    @staticmethod
    def _without(entry: PendingRevocation) -> Callable[[list[PendingRevocation]], list[PendingRevocation]]:
        return lambda pending: [e for e in pending if e.accessor != entry.accessor]

    async def schedule(self, entry: PendingRevocation, durable: bool = True) -> None:
        """Queue ``entry``. ``durable``: raise OSError, queueing nothing, if the file cannot be
        written; otherwise (the caller has it on disk elsewhere) queue it in memory regardless."""
        await self._change(self._with([entry]), durable=durable)
        self._wake.set()

    async def unschedule(self, entry: PendingRevocation) -> None:
        """Take back a scheduled revocation (its token is still being served after all)."""
        await self._change(self._without(entry), durable=False)

    async def _done(self, entry: PendingRevocation) -> None:
        # Both the timer and an admin revoke may finish the same entry; the second is a no-op.
        if any(e.accessor == entry.accessor for e in self._pending):
            await self._change(self._without(entry), durable=False)

    # --- revoking -------------------------------------------------------------------------

    async def revoke(self, entry: PendingRevocation, reason: str) -> None:
        """Revoke one token now; raises VaultError (retryable or not) if Vault did not confirm."""
        try:
            await self._auth.call(lambda: self._vault.revoke_accessor(entry.accessor))
        except TokenInvalid:
            pass  # already gone at Vault: the outcome we wanted
        log.info("token_revoked profile=%s generation=%s token_fp=%s reason=%s",
                 entry.profile, entry.generation, entry.token_fp, reason)
        self._record(entry, reason=reason)

    def _record(self, entry: PendingRevocation, **fields: str) -> None:
        try:
            self._audit.event("token_revoked", profile=entry.profile, generation=entry.generation,
                              token_fp=entry.token_fp, **fields)
        except AuditUnavailable:
            pass  # the revocation happened; refusing to record it would only keep a token alive

    async def revoke_or_queue(self, entry: PendingRevocation, reason: str) -> None:
        """Revoke now; if Vault cannot confirm, keep it queued and retry with backoff."""
        try:
            await self.revoke(entry, reason)
        except VaultError:
            await self._change(self._with([dataclasses.replace(entry, reason=reason)]), durable=False)
            self._wake.set()

    async def queue_now(self, entries: Sequence[PendingRevocation] = (), *, reason: str, profile: str | None = None,
                        family: str | None = None) -> list[PendingRevocation]:
        """Incident response, step one: ``entries`` and everything pending for ``profile`` (or
        ``family``) become due now, for ``reason``, written to disk if the disk allows. From here
        on none of them can be forgotten, whatever Vault does next. Returns them all, for
        ``revoke_queued``."""
        now = self._clock.now()
        due: list[PendingRevocation] = []

        def change(pending: list[PendingRevocation]) -> list[PendingRevocation]:
            concerned = [e for e in pending
                         if (profile is not None and e.profile == profile) or (family is not None and e.family == family)]
            due.extend(dataclasses.replace(e, revoke_at=min(e.revoke_at, now), reason=reason)
                       for e in self._with(entries)(concerned))
            return self._with(due)(pending)

        await self._change(change, durable=False)
        return due

    async def queue_all_now(self, reason: str) -> list[PendingRevocation]:
        """Shutdown: every pending revocation becomes due now (one not yet due takes ``reason``;
        one due already keeps its own). Returns them all, for ``revoke_queued``."""
        now = self._clock.now()
        due: list[PendingRevocation] = []

        def change(pending: list[PendingRevocation]) -> list[PendingRevocation]:
            due.extend(e if e.revoke_at <= now else dataclasses.replace(e, revoke_at=now, reason=reason)
                       for e in pending)
            return list(due)

        await self._change(change, durable=False)
        return due

    async def revoke_queued(self, entries: Sequence[PendingRevocation], reason: str) -> None:
        """Incident response, step two: try every entry (one failure does not stop the rest).
        Raises RevocationPending if Vault did not confirm them all; those stay queued, due now."""
        failed: list[VaultError] = []
        for entry in entries:
            try:
                await self.revoke(entry, reason)
            except VaultError as exc:
                log.warning("revocation_failed profile=%s generation=%s token_fp=%s error=%s action=queued, retrying",
                            entry.profile, entry.generation, entry.token_fp, exc)
                failed.append(exc)
                continue
            await self._done(entry)
        self._wake.set()
        if failed:
            raise RevocationPending(len(failed), len(entries), failed[0])

    async def revoke_due(self) -> None:
        now = self._clock.now()
        for entry in [e for e in self._pending if e.revoke_at <= now]:
            try:
                await self.revoke(entry, entry.reason)
            except VaultError as exc:
                if _keeps_the_entry(exc):
                    self._failures += 1
                    log.warning("revocation_failed profile=%s generation=%s token_fp=%s error=%s",
                                entry.profile, entry.generation, entry.token_fp, exc)
                    return  # Vault is unavailable: the rest wait for the backoff too
                await self._drop(entry, exc)
                continue
            await self._done(entry)
        self._failures = 0

    async def _drop(self, entry: PendingRevocation, exc: VaultError) -> None:
        """Vault rejects this revocation itself and always will: retrying it forever would hold
        up every entry behind it, so it leaves the queue, loudly."""
        log.error("revocation_dropped profile=%s generation=%s token_fp=%s error=%s "
                  "action=removed from the queue; Vault rejects this revocation, check the token at Vault by hand",
                  entry.profile, entry.generation, entry.token_fp, exc)
        self._record(entry, outcome="failure",
                     reason=f"dropped from the queue: Vault rejected the revocation ({type(exc).__name__})")
        await self._done(entry)

    def _next_delay(self) -> float:
        now = self._clock.now()
        delay = policy.revocation_delay(now, [e.revoke_at for e in self._pending], self._failures, self._rng.random())
        if self._unsaved:
            self._write_failures += 1
            delay = min(delay, policy.backoff_delay(self._write_failures, self._rng.random(), now, None))
        else:
            self._write_failures = 0
        return delay

    async def run(self) -> None:
        troubles = 0
        while True:
            try:
                if self._unsaved:
                    await self._save_again()
                await self.revoke_due()
                delay = self._next_delay()
                troubles = 0
            except Exception as exc:  # a bug must not stop revocations, nor (through the TaskGroup) the broker
                troubles += 1
                log.error("revocation_internal_error failures=%d error=%s action=retrying with backoff",
                          troubles, describe_bug(exc))
                delay = policy.backoff_delay(troubles, self._rng.random(), self._clock.now(), None)
            await sleep_or_wake(self._clock, delay, self._wake)
