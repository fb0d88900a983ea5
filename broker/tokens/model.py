"""Tokens and per-profile state as immutable values.

The rotator builds a new ``ProfileState`` and swaps it in; handlers read whatever state is
current. A ``Token`` never shows its value (or accessor) in ``repr``/``str``: only its
fingerprint, which is what logs and audit carry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


def fingerprint(secret: str) -> str:
    """First 16 hex digits of SHA-256: identifies a token in audit without revealing it."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    accessor: str = field(repr=False)
    generation: int
    issued_at: float
    expires_at: float
    rotate_at: float
    fp: str = ""

    def __post_init__(self) -> None:
        if not self.fp:
            object.__setattr__(self, "fp", fingerprint(self.value))

    @property
    def ttl(self) -> float:
        return self.expires_at - self.issued_at

    def seconds_left(self, now: float) -> float:
        return self.expires_at - now


@dataclass(frozen=True)
class ProfileState:
    """What a profile serves now. ``previous`` stays valid at Vault until ``grace_until``."""

    name: str
    current: Token | None = None
    previous: Token | None = None
    grace_until: float | None = None
    consecutive_failures: int = 0
    last_error: str | None = None
    unhealthy: bool = False
    last_checked_at: float | None = None

    @property
    def generation(self) -> int:
        return self.current.generation if self.current else 0


class TokenCache:
    """The per-profile states the API serves from. The rotators are its only writers."""

    def __init__(self) -> None:
        self._states: dict[str, ProfileState] = {}

    def get(self, profile: str) -> ProfileState | None:
        return self._states.get(profile)

    def publish(self, state: ProfileState) -> None:
        self._states[state.name] = state

    def all(self) -> list[ProfileState]:
        return list(self._states.values())
