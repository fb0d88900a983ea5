"""Per-job token families: refresh-token rotation with reuse detection (RFC 9700 §4.14).

A job starts a family and gets a Vault token plus a one-time refresh token bound to its
client certificate. Each refresh spends the refresh token and returns a new pair; the old
Vault token is revoked after the profile's grace. Presenting a spent refresh token again is
reuse — someone else has a copy — and ends the whole family at once. The one exception is a
retry: the immediately previous refresh token, from the same certificate, within
``reuse_interval``, gets the pair already issued (its answer was probably lost in transit).

Refresh tokens are ``<family id>.<256 random bits>``; only their SHA-256 is kept, and every
comparison of hashes or certificate fingerprints is constant-time. State (hashes, accessors,
times; never a token value) is persisted on every change, so a restart neither forgets a
family nor lets a spent refresh token work again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import logging
import random
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from broker.audit import AuditLog
from broker.clock import Clock, sleep_or_wake
from broker.config import MIN_TOKEN_TTL, ProfileConfig
from broker.errors import (
    AuditUnavailable,
    BrokerError,
    FamilyLimitReached,
    FamilyNotFound,
    RefreshRejected,
    VaultError,
    VaultRequestRejected,
    VaultUnavailable,
    describe_bug,
)
from broker.identity import Caller, matching_identity
from broker.metrics import Metrics
from broker.tokens import policy
from broker.tokens.model import Token
from broker.tokens.revocations import RevocationPending, RevocationQueue
from broker.tokens.store import EncodedLines, PendingRevocation, StateStore, checked_fields, json_line
from broker.vault.auth import Authenticator
from broker.vault.client import VaultClient, not_orphan

log = logging.getLogger("broker.families")

MAX_REFRESH_TOKEN_LENGTH = 256
# Spent refresh tokens remembered per family, newest first kept. A family refreshed every few
# minutes for a day is well within it; without a bound, a certificate refreshing at its rate
# limit grew one family's line of families.json (re-encoded on every refresh) and the reuse
# check without end. An older spent token is still refused, as unknown rather than as reuse.
SPENT_HASHES_KEPT = 128


def new_family_id() -> str:
    return "fam_" + secrets.token_urlsafe(12)


def new_refresh_token(family: str) -> str:
    return f"{family}.{secrets.token_urlsafe(32)}"


def family_of(refresh_token: str) -> str:
    return refresh_token.partition(".")[0]


def refresh_hash(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()


@dataclass(frozen=True)
class LiveToken:
    """The family's current Vault token, as far as revoking it needs to know."""

    accessor: str = field(repr=False)
    generation: int
    token_fp: str
    expires_at: float

    @classmethod
    def of(cls, token: Token) -> LiveToken:
        return cls(token.accessor, token.generation, token.fp, token.expires_at)

    def revocation(self, profile: str, family: str, revoke_at: float) -> PendingRevocation:
        return PendingRevocation(accessor=self.accessor, profile=profile, generation=self.generation,
                                 token_fp=self.token_fp, revoke_at=revoke_at, family=family)


@dataclass(frozen=True)
class Family:
    id: str
    profile: str
    owner_fp: str  # SHA-256 of the client certificate that started the family
    owner_identity: str
    created_at: float
    expires_at: float  # refresh_expires_at: the family ends here whatever happens
    generation: int
    current: LiveToken
    current_hash: str = field(repr=False)
    previous_hash: str | None = field(default=None, repr=False)
    previous_spent_at: float | None = None
    spent_hashes: tuple[str, ...] = field(default=(), repr=False)  # older than previous

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def encoded(self) -> str:
        """This family as one line of ``families.json``."""
        return json_line(self.to_json())

    @classmethod
    def from_json(cls, data: object, where: str) -> Family:
        """A family as ``families.json`` holds it; ValueError naming what is wrong: a family read
        wrongly would be refreshed, judged or expired wrongly."""
        checked = checked_fields(data, _FAMILY_TYPES, _FAMILY_REQUIRED, where)
        current = checked_fields(checked["current"], _LIVE_TYPES, _LIVE_TYPES, f"{where}'s current token")
        spent = checked.get("spent_hashes") or []
        if not all(isinstance(h, str) for h in spent):
            raise ValueError(f"{where}'s spent_hashes are not all strings")
        return cls(**{**checked, "current": LiveToken(**current), "spent_hashes": tuple(spent)})


_NUMBER = (int, float)
_LIVE_TYPES: dict[str, tuple[type, ...]] = {"accessor": (str,), "generation": (int,), "token_fp": (str,),
                                            "expires_at": _NUMBER}
_FAMILY_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "profile": (str,), "owner_fp": (str,), "owner_identity": (str,), "created_at": _NUMBER,
    "expires_at": _NUMBER, "generation": (int,), "current": (dict,), "current_hash": (str,),
    "previous_hash": (str, type(None)), "previous_spent_at": (*_NUMBER, type(None)), "spent_hashes": (list,),
}
_FAMILY_REQUIRED = [f.name for f in dataclasses.fields(Family) if f.default is dataclasses.MISSING]


class Verdict(enum.Enum):
    REFRESH = "refresh"  # the current refresh token from its owner
    RETRY = "retry"  # the previous one, from its owner, within reuse_interval
    REUSE = "reuse"  # a spent one, or a live one from another certificate
    INVALID = "invalid"  # not a refresh token of this family


def judge(family: Family, presented_hash: str, caller_fp: str, now: float, reuse_interval: float) -> Verdict:
    """What presenting this refresh token means (pure; constant-time comparisons)."""
    same_cert = hmac.compare_digest(caller_fp, family.owner_fp)
    if hmac.compare_digest(presented_hash, family.current_hash):
        return Verdict.REFRESH if same_cert else Verdict.REUSE
    if family.previous_hash is not None and hmac.compare_digest(presented_hash, family.previous_hash):
        in_window = family.previous_spent_at is not None and now - family.previous_spent_at <= reuse_interval
        return Verdict.RETRY if same_cert and in_window else Verdict.REUSE
    spent = [hmac.compare_digest(presented_hash, h) for h in family.spent_hashes]
    return Verdict.REUSE if any(spent) else Verdict.INVALID


@dataclass(frozen=True)
class Issued:
    """What a job receives: the Vault token and the next refresh token (both secret)."""

    family: Family
    token: Token
    refresh_token: str = field(repr=False)


REUSED = ("this refresh token was used before, or presented from another client certificate, so the whole "
          "token family has been revoked (queued at Vault if it cannot confirm now); start a new family with "
          "POST /v1/tokens/{profile}")


class FamilyManager:
    def __init__(
        self,
        profiles: Mapping[str, ProfileConfig],
        vault: VaultClient,
        auth: Authenticator,
        revocations: RevocationQueue,
        store: StateStore,
        clock: Clock,
        audit: AuditLog,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self._profiles = {n: p for n, p in profiles.items() if p.mode == "per-job"}
        self._vault = vault
        self._auth = auth
        self._revocations = revocations
        self._store = store
        self._clock = clock
        self._audit = audit
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._families: dict[str, Family] = {}
        # The last pair handed out per family, in memory only, to answer a retried refresh.
        self._last_issued: dict[str, Issued] = {}
        # Only for families we track, and dropped when one ends: ids come from callers.
        self._locks: dict[str, asyncio.Lock] = {}
        # Families being started, per (profile, certificate): they count against the limit
        # while their token is minted, so concurrent starts cannot overshoot it.
        self._starting: Counter[tuple[str, str]] = Counter()
        self._wake = asyncio.Event()
        self._unsaved = False  # the last write of families.json failed; the loop retries it
        self._state_error: str | None = None
        self._encoded = EncodedLines[Family](lambda f: f.id, Family.encoded)
        self._failures = 0
        self._retry_at: float | None = None

    def load(self) -> None:
        self._families = {f.id: f for f in self._store.load_families(Family.from_json)}

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(self._families.values())

    @property
    def lock_count(self) -> int:
        """Per-family locks held in memory: never more than the families tracked."""
        return len(self._locks)

    @property
    def retry_at(self) -> float | None:
        """When the background loop retries after a failed pass; None while it is not failing."""
        return self._retry_at

    @property
    def state_error(self) -> str | None:
        """Why families.json cannot be written, while it cannot: no family can start or move
        on then (a token the broker could not retire after a restart is never handed out)."""
        return self._state_error

    async def _persist(self) -> None:
        # Writes land in call order, so the flag ends up telling whether the newest one failed.
        try:
            await self._store.save_families(self._lines)
        except OSError as exc:
            self._unsaved = True
            self._state_error = f"cannot write families.json: {exc.strerror or exc}"
            self._wake.set()  # the loop writes it again with backoff, which also ends this error
            raise
        if self._unsaved:
            log.info("state_write_recovered file=families.json families=%d", len(self._families))
        self._unsaved = False
        self._state_error = None

    def _lines(self) -> list[str]:
        """The families as lines of ``families.json``."""
        return self._encoded(self._families.values())

    def _record(self, event: str, **fields: object) -> None:
        """Audit a family event; refusing here would leave Vault and our state out of step."""
        try:
            self._audit.event(event, **fields)  # type: ignore[arg-type]
        except AuditUnavailable:
            pass

    def _lock(self, family_id: str) -> asyncio.Lock | None:
        """The lock of a family we track; None (and no lock made) for any other id."""
        if family_id not in self._families:
            return None
        return self._locks.setdefault(family_id, asyncio.Lock())

    # --- minting -------------------------------------------------------------------------

    async def _mint(self, profile: ProfileConfig, family: str, generation: int, identity: str,
                    family_expires_at: float, now: float) -> Token:
        """A verified Vault token for one generation; never outlives its family. ``now`` is the
        caller's: a family created at ``now`` with family_max_age 1s has exactly 1s left."""
        ttl = min(profile.ttl, family_expires_at - now)
        if ttl < MIN_TOKEN_TTL:
            raise RefreshRejected("refresh_token_invalid", "the token family has reached its maximum age",
                                  profile.name)
        meta = {"profile": profile.name, "family": family, "generation": str(generation),
                "identity": identity[:256], "issued_by": "token-broker"}
        minted = await self._auth.call(lambda: self._vault.create_token(profile.token_role, profile.policies, ttl, meta))
        token = Token(value=minted.token, accessor=minted.accessor, generation=generation, issued_at=now,
                      expires_at=now + minted.ttl, rotate_at=now + minted.ttl)
        if not minted.orphan:
            await self._revoke_now(LiveToken.of(token), profile.name, family, "rolled_back")
            raise not_orphan(profile.token_role)
        try:
            await self._auth.call(lambda: self._vault.lookup_token(minted.token))
        except VaultError:
            await self._revoke_now(LiveToken.of(token), profile.name, family, "rolled_back")
            raise
        return token

    async def _not_recorded(self, token: Token, profile: str, family: str, exc: OSError) -> VaultUnavailable:
        """The state dir could not take the new generation: a token the broker could not retire
        after a restart is never handed out. Revoked (or queued) now; the job may retry."""
        log.error("state_write_failed file=families.json family=%s error=%s action=new token revoked, not served",
                  family, exc.strerror or exc)
        await self._revoke_now(LiveToken.of(token), profile, family, "rolled_back")
        return VaultUnavailable("family", f"the broker cannot write its state directory ({exc.strerror or exc}); "
                                          "nothing was issued, try again")

    async def _audit_or_revoke(self, token: Token, event: str, *, profile: str, family: str, **fields: object) -> None:
        """Audit handing out ``token``, before anything depends on it. A token that cannot be
        audited is not served (``[audit] on_failure = "refuse"``, as for shared profiles): it is
        revoked now and AuditUnavailable goes to the caller; nothing of the family changed."""
        try:
            self._audit.event(event, profile=profile, family=family, **fields)  # type: ignore[arg-type]
        except AuditUnavailable:
            log.error("audit_unavailable family=%s event=%s action=new token revoked, not served", family, event)
            await self._revoke_now(LiveToken.of(token), profile, family, "rolled_back")
            raise

    async def _revoke_now(self, live: LiveToken, profile: str, family: str, reason: str) -> None:
        await self._revocations.revoke_or_queue(live.revocation(profile, family, self._clock.now()), reason)

    # --- the three operations --------------------------------------------------------------

    def owned_by(self, owner_fp: str) -> list[Family]:
        """The live families the certificate ``owner_fp`` started, oldest first."""
        owned = [f for f in self._families.values() if hmac.compare_digest(f.owner_fp, owner_fp)]
        return sorted(owned, key=lambda f: f.created_at)

    def live_count(self, profile: str, owner_fp: str) -> int:
        """Families of ``profile`` that the certificate ``owner_fp`` holds, started or starting."""
        started = sum(1 for f in self._families.values() if f.profile == profile and f.owner_fp == owner_fp)
        return started + self._starting[(profile, owner_fp)]

    @contextmanager
    def _slot(self, profile: ProfileConfig, caller: Caller) -> Iterator[Callable[[], None]]:
        """Hold one of the caller's ``max_families_per_client`` places while a family starts.
        Yields ``placed``, to call once the family itself is tracked (and so counted)."""
        key = (profile.name, caller.fingerprint)
        limit = profile.max_families_per_client
        if self.live_count(*key) >= limit:
            self._metrics.count_request(profile.name, "family_limit")
            raise FamilyLimitReached(
                f"this client certificate already holds {limit} live token families of profile {profile.name} "
                f"(max_families_per_client; jobs sharing a certificate share the limit); release finished ones "
                "(GET /v1/families lists them, DELETE /v1/families/{family} or broker release ends one) or wait "
                "until one reaches family_max_age")
        self._starting[key] += 1
        held = True

        def placed() -> None:
            nonlocal held
            if held:
                held = False
                self._starting[key] -= 1
                if self._starting[key] <= 0:
                    del self._starting[key]

        try:
            yield placed
        finally:
            placed()

    async def create(self, profile_name: str, caller: Caller, identity: str) -> Issued:
        profile = self._profiles[profile_name]
        with self._slot(profile, caller) as placed:
            return await self._create(profile, caller, identity, placed)

    async def _create(self, profile: ProfileConfig, caller: Caller, identity: str,
                      placed: Callable[[], None]) -> Issued:
        family_id = new_family_id()
        now = self._clock.now()
        expires_at = now + profile.family_max_age
        try:
            token = await self._mint(profile, family_id, 1, identity, expires_at, now)
        except RefreshRejected:
            # Only a family_max_age shorter than a token gets here (broker check refuses one).
            # This is no refresh-token problem of the caller's: answer as for any failed mint.
            raise VaultRequestRejected("create_token", f"profile {profile.name}'s family_max_age leaves no time "
                                                       "for a token; see broker check") from None
        refresh_token = new_refresh_token(family_id)
        family = Family(
            id=family_id, profile=profile.name, owner_fp=caller.fingerprint, owner_identity=identity,
            created_at=now, expires_at=expires_at, generation=1,
            current=LiveToken.of(token), current_hash=refresh_hash(refresh_token),
        )
        await self._audit_or_revoke(token, "family_created", profile=profile.name, family=family_id,
                                    identity=identity, generation=1, token_fp=token.fp)
        self._families[family_id] = family
        placed()  # counted as a family from here on, no longer as one starting
        try:
            await self._persist()
        except OSError as exc:
            self._families.pop(family_id, None)
            raise await self._not_recorded(token, profile.name, family_id, exc) from None
        self._wake.set()
        issued = Issued(family, token, refresh_token)
        self._last_issued[family_id] = issued
        self._metrics.count_request(profile.name, "family_created")
        log.info("family_created profile=%s family=%s identity=%s token_fp=%s", profile.name, family_id, identity,
                 token.fp)
        return issued

    async def refresh(self, refresh_token: str, caller: Caller) -> Issued:
        family_id = family_of(refresh_token)
        lock = self._lock(family_id)
        if lock is None:
            raise RefreshRejected("refresh_token_invalid", "unknown refresh token, or its family has ended")
        async with lock:
            family = self._families.get(family_id)  # it may have ended while we waited
            if family is None:
                raise RefreshRejected("refresh_token_invalid", "unknown refresh token, or its family has ended")
            now = self._clock.now()
            if now >= family.expires_at:
                await self._end(family, "expired")
                raise RefreshRejected("refresh_token_invalid", "the token family has reached its maximum age",
                                      family.profile)
            profile = self._profiles.get(family.profile)
            if profile is None:
                await self._end(family, "profile_removed")
                raise RefreshRejected("refresh_token_invalid",
                                      f"the family's profile {family.profile} is no longer a per-job profile of this "
                                      "broker; the family has ended", family.profile)
            verdict = judge(family, refresh_hash(refresh_token), caller.fingerprint, now, profile.reuse_interval)
            if verdict is Verdict.INVALID:
                # A live family's id with a secret it never issued: someone who saw the id (it is
                # in logs and the audit) is guessing. Nothing is revoked, but security hears of it.
                self._record("token_denied", profile=family.profile, identity=caller.primary, outcome="denied",
                             reason="refresh token not issued for this family", family=family.id,
                             certificate_fp=caller.fingerprint[:16])
                raise RefreshRejected("refresh_token_invalid", "unknown refresh token, or its family has ended",
                                      family.profile)
            if verdict is Verdict.REUSE:
                await self._reuse_detected(family, caller)
                raise RefreshRejected("refresh_token_reused", REUSED.format(profile=profile.name))
            identity = matching_identity(caller.identities, profile.allow)
            if identity is None:
                # The allow-list was narrowed (and the broker restarted): this family can never
                # move on, so its tokens go now rather than at the end of their TTL.
                await self._end(family, "not_allowed")
                raise RefreshRejected("refresh_token_invalid", "this client certificate is no longer allowed for "
                                                               "the family's profile; the family has ended",
                                      family.profile)
            last = self._last_issued.get(family_id)
            if verdict is Verdict.RETRY and last is not None and last.family.generation == family.generation:
                # A retried request: the same pair again, no new mint. Audited, but best effort:
                # the pair was audited when it was issued, and refusing the retry for the audit's
                # sake would have the job retry past reuse_interval, into reuse detection.
                self._record("family_refreshed", profile=profile.name, family=family.id, identity=identity,
                             generation=last.family.generation, token_fp=last.token.fp,
                             reason="retried: the pair already issued for this refresh token")
                self._metrics.count_request(profile.name, "refresh_retried")
                return last
            return await self._rotate(family, profile, identity, retry=verdict is Verdict.RETRY)

    async def _rotate(self, family: Family, profile: ProfileConfig, identity: str, retry: bool = False) -> Issued:
        """The next generation. ``retry``: the previous refresh token came back within
        ``reuse_interval`` but the pair it got is no longer in memory (a restart): the new pair
        takes the place of that lost one, so the previous refresh token stays the one a further
        retry may present, and the lost pair's refresh token (never received) is spent."""
        generation = family.generation + 1
        token = await self._mint(profile, family.id, generation, family.owner_identity, family.expires_at,
                                 self._clock.now())
        refresh_token = new_refresh_token(family.id)
        now = self._clock.now()
        old = family.current
        await self._audit_or_revoke(token, "family_refreshed", profile=profile.name, family=family.id,
                                    identity=identity, generation=generation, token_fp=token.fp,
                                    previous_fp=old.token_fp)
        retiring = old.revocation(profile.name, family.id, min(now + profile.grace, old.expires_at))
        try:
            await self._revocations.schedule(retiring)
        except OSError as exc:
            raise await self._not_recorded(token, profile.name, family.id, exc) from None
        if retry:
            previous_hash, previous_spent_at = family.previous_hash, family.previous_spent_at
            spent = family.spent_hashes + (family.current_hash,)
        else:
            previous_hash, previous_spent_at = family.current_hash, now
            spent = family.spent_hashes + ((family.previous_hash,) if family.previous_hash is not None else ())
        updated = dataclasses.replace(
            family, generation=generation, current=LiveToken.of(token), current_hash=refresh_hash(refresh_token),
            previous_hash=previous_hash, previous_spent_at=previous_spent_at,
            spent_hashes=spent[-SPENT_HASHES_KEPT:],
        )
        self._families[family.id] = updated
        try:
            await self._persist()
        except OSError as exc:
            self._families[family.id] = family  # the presented refresh token stays the valid one
            await self._revocations.unschedule(retiring)
            raise await self._not_recorded(token, profile.name, family.id, exc) from None
        issued = Issued(updated, token, refresh_token)
        self._last_issued[family.id] = issued
        self._metrics.count_request(profile.name, "refreshed")
        log.info("family_refreshed profile=%s family=%s generation=%d token_fp=%s", profile.name, family.id,
                 generation, token.fp)
        return issued

    async def _reuse_detected(self, family: Family, caller: Caller) -> None:
        log.warning("reuse_detected profile=%s family=%s presenter=%s owner=%s", family.profile, family.id,
                    caller.primary, family.owner_identity)
        self._metrics.reuse_detected.labels(family.profile).inc()
        self._metrics.count_request(family.profile, "refresh_reused")
        self._record("reuse_detected", profile=family.profile, identity=caller.primary, generation=family.generation,
                     token_fp=family.current.token_fp, outcome="denied", reason="refresh token presented again",
                     family=family.id, owner_identity=family.owner_identity,
                     same_certificate=hmac.compare_digest(caller.fingerprint, family.owner_fp),
                     certificate_fp=caller.fingerprint[:16])
        await self._end(family, "reuse_detected")

    async def release(self, family_id: str, caller: Caller) -> tuple[Family, int]:
        """The job is done: revoke the family's tokens now. Only its own certificate may.
        Returns the family and how many of its tokens Vault has not confirmed revoked yet
        (queued, due now, retried by the revocation loop)."""
        not_found = FamilyNotFound(_not_found_message(family_id))
        lock = self._lock(family_id)
        if lock is None:
            raise not_found
        async with lock:
            family = self._families.get(family_id)
            if family is None or not hmac.compare_digest(family.owner_fp, caller.fingerprint):
                raise not_found
            return family, await self._end(family, "released")

    async def _end(self, family: Family, reason: str) -> int:
        """Revoke every Vault token of the family (current and those in grace) and forget it.

        Ending means "revoke now": first every token of the family is in the revocation queue,
        due now (not at the end of a grace that may be a thief's window), and only then is the
        family forgotten, so a crash in between leaves no token that nothing tracks. Whatever
        Vault does not confirm stays queued, due now, and the queue's loop retries it.
        """
        current = family.current.revocation(family.profile, family.id, self._clock.now())
        due = await self._revocations.queue_now([current], reason=reason, family=family.id)
        self._families.pop(family.id, None)
        self._last_issued.pop(family.id, None)
        self._locks.pop(family.id, None)  # a holder keeps its reference; later callers find no family
        try:
            await self._persist()
        except OSError as exc:
            # The family is over in memory and its tokens are queued; only the file is behind.
            log.error("family_state_unsaved family=%s error=%s action=retrying", family.id, exc.strerror or exc)
            self._wake.set()
        unconfirmed = 0
        try:
            await self._revocations.revoke_queued(due, reason)
        except RevocationPending as exc:
            unconfirmed = exc.unconfirmed
            log.warning("family_revoke_incomplete family=%s error=%s action=queued for retry", family.id, exc)
        log.info("family_revoked profile=%s family=%s reason=%s", family.profile, family.id, reason)
        incomplete = {"outcome": "failure", "pending_revocations": unconfirmed} if unconfirmed else {}
        self._record("family_revoked", profile=family.profile, identity=family.owner_identity,
                     generation=family.generation, token_fp=family.current.token_fp, reason=reason, family=family.id,
                     **incomplete)
        return unconfirmed

    async def _end_each(self, family_ids: list[str], reason: str) -> int:
        """End each family still tracked; one that fails (logged) does not hold up the rest.
        Returns how many failed."""
        failed = 0
        for family_id in family_ids:
            lock = self._lock(family_id)
            if lock is None:
                continue
            try:
                async with lock:
                    family = self._families.get(family_id)  # the newest state, not a snapshot
                    if family is not None:
                        await self._end(family, reason)
            except Exception as exc:
                failed += 1
                _log_failure("family_end_failed", exc, f"family={family_id} reason={reason}")
        return failed

    async def end_profile(self, profile: str, reason: str) -> tuple[int, int]:
        """End every family of ``profile`` now (an admin's incident response): how many ended,
        and how many of their tokens Vault has not confirmed revoked yet (queued, retried)."""
        ended = unconfirmed = 0
        for family_id in [f.id for f in self._families.values() if f.profile == profile]:
            lock = self._lock(family_id)
            if lock is None:
                continue
            async with lock:
                family = self._families.get(family_id)  # it may have ended while we waited
                if family is not None:
                    unconfirmed += await self._end(family, reason)
                    ended += 1
        return ended, unconfirmed

    async def queue_all(self, reason: str) -> list[Family]:
        """Opt-in revocation on shutdown, step one: every family ends, each of its tokens queued,
        due now, with one write of each state file whatever the number of families. Returns the
        families ended; revoking their tokens is the caller's step two, within its deadline, and
        ``record_ended`` then audits each with what Vault confirmed."""
        ending = list(self._families.values())
        now = self._clock.now()
        for profile in sorted({f.profile for f in ending}):
            currents = [f.current.revocation(f.profile, f.id, now) for f in ending if f.profile == profile]
            await self._revocations.queue_now(currents, reason=reason, profile=profile)
        self._families.clear()
        self._last_issued.clear()
        self._locks.clear()
        try:
            await self._persist()
        except OSError as exc:
            log.error("family_state_unsaved families=%d error=%s action=their tokens are queued, but families.json "
                      "still lists them", len(ending), exc.strerror or exc)
        return ending

    def record_ended(self, ended: list[Family], reason: str, unconfirmed: Mapping[str, int]) -> None:
        """Audit families ended by ``queue_all``; ``unconfirmed``: per family id, its tokens
        Vault has not confirmed revoked (they stay queued for the next start)."""
        for family in ended:
            pending = unconfirmed.get(family.id, 0)
            log.info("family_revoked profile=%s family=%s reason=%s pending_revocations=%d", family.profile,
                     family.id, reason, pending)
            incomplete = {"outcome": "failure", "pending_revocations": pending} if pending else {}
            self._record("family_revoked", profile=family.profile, identity=family.owner_identity,
                         generation=family.generation, token_fp=family.current.token_fp, reason=reason,
                         family=family.id, **incomplete)

    # --- expiry ----------------------------------------------------------------------------

    async def end_expired(self) -> int:
        """End every family past its maximum age; returns how many could not be ended."""
        now = self._clock.now()
        return await self._end_each([f.id for f in self._families.values() if f.expires_at <= now], "expired")

    def _next_expiry_in(self) -> float:
        if not self._families:
            return 3600.0
        return max(0.0, min(f.expires_at for f in self._families.values()) - self._clock.now())

    async def end_orphaned(self) -> int:
        """End every family whose profile is no longer per-job here (the config changed across a
        restart): nothing could refresh it, and its tokens should not outlive that decision."""
        orphans = [f.id for f in self._families.values() if f.profile not in self._profiles]
        return await self._end_each(orphans, "profile_removed")

    async def _pass(self) -> bool:
        """One round of the background loop; False if anything in it failed."""
        if self._unsaved:
            await self._persist()
        return await self.end_orphaned() + await self.end_expired() == 0

    async def run(self) -> None:
        """Ends expired families. Nothing here may stop the broker: a failed pass (Vault, a
        full or read-only state disk, a bug) is logged and retried with backoff."""
        while True:
            try:
                ok = await self._pass()
            except Exception as exc:
                _log_failure("family_loop_failed", exc)
                ok = False
            if ok:
                self._failures, self._retry_at = 0, None
                await sleep_or_wake(self._clock, self._next_expiry_in(), self._wake)
                continue
            self._failures += 1
            now = self._clock.now()
            delay = policy.backoff_delay(self._failures, self._rng.random(), now, None)
            self._retry_at = now + delay
            log.warning("family_loop_backoff failures=%d retry_in=%.1fs", self._failures, delay)
            await self._clock.sleep(delay)  # not cut short by new families: backoff sets the pace


def _not_found_message(family_id: str) -> str:
    """The id is repeated only if it has a family id's shape: a caller who pasted a refresh
    token (``<family id>.<secret>``) must not find its secret part in the answer, or a CI log."""
    if _FAMILY_ID.fullmatch(family_id):
        return f"no live token family {family_id!r} for this client certificate"
    if "." in family_id:
        return ("no live token family with that id for this client certificate; that looks like a refresh token "
                "(not repeated here): the family id is the part before the '.'")
    return "no live token family with that id for this client certificate (family ids look like fam_...)"


_FAMILY_ID = re.compile(r"fam_[A-Za-z0-9_-]{16}")


def _log_failure(event: str, exc: Exception, context: str = "") -> None:
    """One line, never a secret: the message of an OSError (errno, path) or a BrokerError (whose
    messages never hold one); of anything else only its type and where it was raised."""
    prefix = f"{event} {context}".rstrip()
    if isinstance(exc, (OSError, BrokerError)):
        log.error("%s error=%s: %s", prefix, type(exc).__name__, exc)
        return
    log.error("%s error=%s (a bug: please report it)", prefix, describe_bug(exc))
