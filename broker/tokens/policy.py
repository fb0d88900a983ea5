"""Rotation timing as pure functions of time and tokens (no I/O, no clock reads, no randomness).

Randomness (jitter) comes in as a number in [0, 1) so that every rule here is a plain,
testable function; the rotator draws it and does all the I/O.
"""

from __future__ import annotations

import math

from broker.config import ROTATION_JITTER as JITTER  # ±10 %: a fleet of brokers does not mint in lockstep
from broker.tokens.model import Token

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
MIN_RETRY_DELAY = 0.05  # full jitter can draw ~0; never spin
SERVE_MARGIN = 1.0  # a token with less than this left is not worth handing out
LAST_CHANCE_LEAD = 2.0  # a mint and its verification, for a retry that must land while still serving


def rotate_at(issued_at: float, expires_at: float, ttl: float, rotate_after: float, jitter: float) -> float:
    """When a token minted at ``issued_at`` should be replaced.

    ``jitter`` in [0, 1) maps to ±JITTER. If Vault granted less than the requested ``ttl``
    (a role or system max_ttl), rotate at the same fraction of the granted lifetime.
    """
    granted = expires_at - issued_at
    scale = min(1.0, granted / ttl) if ttl > 0 else 1.0
    factor = 1.0 + JITTER * (2 * jitter - 1)
    return issued_at + rotate_after * scale * factor


def should_rotate(now: float, token: Token | None) -> bool:
    return token is None or now >= token.rotate_at


def is_servable(now: float, token: Token | None, min_ttl: float = 0.0) -> bool:
    return token is not None and token.expires_at - now >= max(SERVE_MARGIN, min_ttl)


def grace_until(rotated_at: float, grace: float, previous: Token, promised_until: float = 0.0) -> float:
    """The previous token is revoked at rotation + grace, or when it expires anyway.

    A fetch with ``min_ttl`` was promised the token would last until ``promised_until``; that
    promise outlives a shorter grace window (but not the token's own expiry)."""
    return min(max(rotated_at + grace, promised_until), previous.expires_at)


def backoff_delay(failures: int, jitter: float, now: float, current: Token | None,
                  cap: float = BACKOFF_CAP) -> float:
    """Full-jitter exponential backoff (1 s doubling to ``cap``, 5 min by default) after
    ``failures`` >= 1 failures.

    While a token is still being served, never sleep past the last chance to replace it before
    serving stops (``SERVE_MARGIN`` ahead of expiry, less the time a mint and its check take);
    once that is past, never past expiry.
    """
    # The exponent is bounded: 2 ** 1024 overflows a float, and 2 ** 20 s is far past any cap.
    ceiling = min(cap, BACKOFF_CAP, BACKOFF_BASE * 2 ** min(max(0, failures - 1), 20))
    delay = jitter * ceiling
    if current is not None and current.expires_at > now:
        last_chance = current.expires_at - SERVE_MARGIN - LAST_CHANCE_LEAD
        delay = min(delay, last_chance - now if last_chance > now else current.expires_at - now)
    return max(MIN_RETRY_DELAY, delay)


def revocation_delay(now: float, due_times: list[float], failures: int, jitter: float) -> float:
    """How long the revocation queue sleeps: backoff only while something due keeps failing;
    otherwise until the next entry is due (never later, however many failures came before)."""
    if not due_times:
        return 3600.0
    next_due = min(due_times)
    if failures and next_due <= now:
        return backoff_delay(failures, jitter, now, None)
    return max(0.0, next_due - now)


def retry_cap(check_interval: float) -> float:
    """A profile's backoff never exceeds its check interval: once Vault is back, the broker
    notices within the time its operator chose for noticing trouble."""
    return max(BACKOFF_BASE, min(BACKOFF_CAP, check_interval))


def max_min_ttl(ttl: float) -> float:
    """The most ``min_ttl`` a fetch may ask for: a fresh token's lifetime, less the serve margin."""
    return ttl - SERVE_MARGIN


def check_due_at(now: float, current: Token | None, next_check_at: float) -> float:
    """When to look ``current`` up at Vault: never while there is none, or once it has expired
    (an expired token is no news: rotation replaces it; a lookup would only report its natural
    end as "no longer valid at Vault")."""
    if current is None or now >= current.expires_at:
        return math.inf
    return next_check_at


def rotation_due_at(now: float, current: Token | None, retry_at: float | None) -> float:
    """After a failure the backoff decides (retry_at); otherwise the token's own rotate_at.

    With nothing to serve, rotation is due now.
    """
    if retry_at is not None:
        return retry_at
    return now if current is None else current.rotate_at
