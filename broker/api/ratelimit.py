"""Per-client rate limiting: a token bucket per client certificate (pure: time comes in).

A misbehaving job (a retry loop without backoff) must not starve the other jobs on the host
or turn ``min_ttl`` into a stream of Vault mints.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TRACKED = 10_000  # past this many clients, forget the ones whose bucket has refilled


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated: float


def take(bucket: Bucket | None, now: float, rate: float, burst: float) -> tuple[Bucket, float]:
    """Spend one request from ``bucket``: (the bucket after, seconds to wait; 0 means allowed)."""
    if bucket is None:
        tokens = burst
    else:
        tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
    if tokens >= 1.0:
        return Bucket(tokens - 1.0, now), 0.0
    return Bucket(tokens, now), (1.0 - tokens) / rate


class RateLimiter:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, Bucket] = {}

    def check(self, client: str, now: float) -> float:
        """Seconds ``client`` must wait before this request would be allowed; 0 = go ahead."""
        bucket, wait = take(self._buckets.get(client), now, self.rate, self.burst)
        self._buckets[client] = bucket
        if len(self._buckets) > MAX_TRACKED:
            self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < refill}
