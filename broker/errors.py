"""The broker's exception tree.

Every failure the broker knows how to handle is one of these. Vault errors are classified once,
in ``broker.vault.client``, into *retryable* (``VaultUnavailable``) and *fatal for this request*
(the rest), so callers decide on retrying by type, never by inspecting messages.
No message in this module's exceptions may carry a token value.
"""

from __future__ import annotations

import traceback
from pathlib import Path


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; ``problems`` holds one human sentence per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class CertError(BrokerError):
    """A certificate or key could not be created, read or used."""


class VaultError(BrokerError):
    """Vault answered, or failed to answer, in a way the caller must handle."""

    retryable = False

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"vault {operation}: {detail}")


class VaultUnavailable(VaultError):
    """Vault is down, slow, sealed or overloaded: try again later with backoff."""

    retryable = True


class VaultPermissionDenied(VaultError):
    """Vault refused the broker's own token (403): log in again, then retry."""

    retryable = True


class AuthRejected(VaultError):
    """A login was refused: this credential will not work until an operator fixes it."""


class TokenInvalid(VaultError):
    """The token (or accessor) looked up is unknown to Vault: revoked, expired or lost."""


class VaultRequestRejected(VaultError):
    """Vault rejected the request itself (bad role, bad policy...): fatal until config changes."""


class AuditUnavailable(BrokerError):
    """The audit log cannot be written."""


class RefreshRejected(BrokerError):
    """A refresh token was refused. ``code`` is the API error code (refresh_token_invalid or
    refresh_token_reused); the message never contains the token."""

    def __init__(self, code: str, message: str, profile: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.profile = profile  # None while the token names no family the broker knows


class FamilyLimitReached(BrokerError):
    """The caller's certificate already holds its profile's ``max_families_per_client``."""


class FamilyNotFound(BrokerError):
    """No live family with that id belongs to the caller's certificate."""


def describe_bug(exc: BaseException) -> str:
    """An unexpected exception for the log: its type and the code locations it passed through,
    innermost first — never its message or a traceback's text, which could quote a value (a
    third-party message may hold a header or a body)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
    return f"{type(exc).__name__} at {where or '?'}"


def url_without_secrets(url: str) -> str:
    """``url`` fit for a message: whatever precedes an ``@`` after the scheme (user info, maybe a
    password), and the text of a query or fragment (maybe a token), become "…". Cut by text, not
    by parsing: a URL that does not parse must not leak either."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0 and "@" in rest[cut:]:
        # A "?" in a password, or an "@" in a query: no way to tell which part is a secret.
        return f"{scheme}{sep}…"
    if "@" in rest:
        rest = "…@" + rest.rpartition("@")[2]
        cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut + 1] + "…"
    return f"{scheme}{sep}{rest}"
