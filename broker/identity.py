"""Client certificate → identity strings, and allow-list matching (pure: no I/O, no aiohttp).

Identities are ``cn:<subject CN>``, ``uri:<SAN URI>`` and ``dns:<SAN DNS name>``, in the
order: subject CNs, then the SAN entries as they appear in the certificate. Both extractors
(the stdlib's ``getpeercert()`` dict and raw DER) give the same tuple for the same cert, so
the TLS engine can change without changing who is allowed what.

Patterns are ``<kind>:<shell glob>``. The kind is compared literally and only the rest is a
glob, so ``cn:*`` never matches a ``uri:`` identity. Note that ``*`` also matches ``/``:
``uri:spiffe://ci.example/runner/*`` admits ``.../runner/1/anything``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.errors import CertError

KINDS = ("cn", "uri", "dns")


@dataclass(frozen=True)
class Caller:
    """A verified client: its identities, the SHA-256 (hex) of its certificate, and the
    certificate's issuer (compared as OpenSSL compares names) and serial number, which a CRL
    names it by."""

    identities: tuple[str, ...]
    fingerprint: str
    issuer_and_serial: tuple[CanonicalName, int] = ((), 0)

    @property
    def primary(self) -> str:
        return self.identities[0] if self.identities else "unknown"

    @classmethod
    def from_der(cls, der: bytes) -> Caller:
        """The caller a verified certificate (DER) names; CertError if it cannot be parsed."""
        cert = _parse(der)
        return cls(_identities(cert), hashlib.sha256(der).hexdigest(),
                   (canonical_name(cert.issuer), cert.serial_number))


# getpeercert() spells SAN types like OpenSSL's X509V3_EXT_print; we keep URI and DNS only.
_PEERCERT_SAN_KINDS = {"URI": "uri", "DNS": "dns"}


def identities_from_peercert(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Identities from the dict ``ssl.SSLSocket.getpeercert()`` returns ({} or None → ())."""
    if not peercert:
        return ()
    found: list[str] = []
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                found.append(f"cn:{value}")
    for san_type, value in peercert.get("subjectAltName", ()):
        kind = _PEERCERT_SAN_KINDS.get(san_type)
        if kind is not None:
            found.append(f"{kind}:{value}")
    return _dedupe(found)


CanonicalName = tuple[tuple[tuple[str, str | bytes], ...], ...]


def canonical_name(name: x509.Name) -> CanonicalName:
    """``name`` as OpenSSL compares names (X509_NAME's canonical encoding): per RDN, attribute
    types with values whose string type does not matter, ASCII letters lowercased, leading and
    trailing whitespace dropped and inner runs collapsed. A CRL and a certificate may spell
    their CA's name differently (PrintableString here, UTF8String there, other case) and still
    name the same CA to OpenSSL, so to the broker too."""
    return tuple(
        tuple(sorted((attr.oid.dotted_string, _canonical_value(attr.value)) for attr in rdn))
        for rdn in name.rdns
    )


def _canonical_value(value: str | bytes) -> str | bytes:
    if isinstance(value, bytes):
        return value
    return "".join(c.lower() if c.isascii() else c for c in " ".join(value.split()))


def identities_from_der(der: bytes) -> tuple[str, ...]:
    """Identities from a DER certificate; CertError if it cannot be parsed."""
    return _identities(_parse(der))


def _parse(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertError(f"cannot parse client certificate: {exc}") from None


def _identities(cert: x509.Certificate) -> tuple[str, ...]:
    found: list[str] = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value
        found.append(f"cn:{value if isinstance(value, str) else value.decode('utf-8', 'replace')}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:  # a malformed extension must not make the cert look identity-less
        raise CertError(f"cannot parse client certificate extensions: {exc}") from None
    for name in san or ():
        if isinstance(name, x509.UniformResourceIdentifier):
            found.append(f"uri:{name.value}")
        elif isinstance(name, x509.DNSName):
            found.append(f"dns:{name.value}")
    return _dedupe(found)


def matches(identities: Iterable[str], patterns: Iterable[str]) -> bool:
    """True if any pattern matches any identity; no patterns (or no identities) → False."""
    ids = [_split(i) for i in identities]
    for pattern in patterns:
        p_kind, p_glob = _split(pattern)
        if not p_kind:
            continue  # malformed pattern: never grants anything (config validation reports it)
        for kind, value in ids:
            if kind == p_kind and fnmatchcase(value, p_glob):
                return True
    return False


def matching_identity(identities: Sequence[str], patterns: Iterable[str]) -> str | None:
    """The first of the caller's identities that a pattern allows, or None (denied)."""
    patterns = tuple(patterns)
    for identity in identities:
        if matches((identity,), patterns):
            return identity
    return None


def pattern_problem(pattern: str) -> str | None:
    """A human sentence if ``pattern`` can never match anything, else None (for config checks)."""
    kind, glob = _split(pattern)
    if kind not in KINDS:
        return f"allow pattern {pattern!r} must start with one of {', '.join(k + ':' for k in KINDS)}"
    if not glob:
        return f"allow pattern {pattern!r} has nothing after {kind + ':'!r}"
    return None


def _split(value: str) -> tuple[str, str]:
    kind, sep, rest = value.partition(":")
    return (kind, rest) if sep else ("", value)


def _dedupe(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
