"""Who may do what: a pure decision over identity strings and glob patterns (deny by default)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from broker.identity import matching_identity

__all__ = ["matching_identity", "may_fetch", "is_admin"]


def may_fetch(identities: Sequence[str], allow: Iterable[str]) -> bool:
    return matching_identity(identities, allow) is not None


def is_admin(identities: Sequence[str], admin_allow: Iterable[str]) -> bool:
    return matching_identity(identities, admin_allow) is not None
