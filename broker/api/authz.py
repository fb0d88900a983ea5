"""Who may do what: a pure decision over identity strings and glob patterns (deny by default)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from broker.identity import matches


def matching_identity(identities: Sequence[str], patterns: Iterable[str]) -> str | None:
    """The first of the caller's identities that a pattern allows, or None (denied)."""
    patterns = tuple(patterns)
    for identity in identities:
        if matches((identity,), patterns):
            return identity
    return None


def may_fetch(identities: Sequence[str], allow: Iterable[str]) -> bool:
    return matching_identity(identities, allow) is not None


def is_admin(identities: Sequence[str], admin_allow: Iterable[str]) -> bool:
    return matching_identity(identities, admin_allow) is not None
