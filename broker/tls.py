"""TLS contexts for the mTLS listener and the ``broker get`` client; server cert reload.

This is the only module that knows the TLS engine (the stdlib ``ssl`` module for now). What the
handshake enforces on the listener:

- TLS 1.3 only, a client certificate is required and must chain to ``client_ca`` (the only
  trust anchor: no system CAs), and must be within its validity period.
- A client cert whose extendedKeyUsage lacks clientAuth is refused: when a server verifies a
  client, OpenSSL checks the chain for the ``sslclient`` purpose.
- A client cert *without* an extendedKeyUsage extension passes that OpenSSL check, and the
  stdlib has no hook to refuse it during the handshake. The app must therefore call
  :func:`require_client_auth_eku` on :func:`peer_der` before trusting a request.
- ``tls13_ciphersuites`` is accepted but not enforced: the stdlib cannot restrict TLS 1.3
  cipher suites (``set_ciphers`` only affects TLS ≤ 1.2). It takes effect when the engine
  moves to pyOpenSSL (``Context.set_tls13_ciphersuites``).
- With ``client_crl``, a client certificate the CRL lists is refused (OpenSSL's leaf-only
  CRL check); :class:`ClientCrl` keeps what was loaded, for connections opened before it.
- A refused client sees the connection closed, not the TLS alert saying why: asyncio's SSL
  transport (stdlib and uvloop) drops the alert on a failed handshake (python/cpython#98078).
  The reason appears only in asyncio's debug log on the server.

Every file problem becomes a :class:`CertError` whose message names the file, so users see
one clear sentence rather than an OpenSSL error stack.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from broker.config import ServerConfig, check_secret_file_mode
from broker.errors import CertError
from broker.identity import CanonicalName, Caller, canonical_name, identities_from_der, identities_from_peercert


class _Transport(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class ClientCrl:
    """The ``client_crl`` in force: the certificates it revokes and until when it may be used.
    OpenSSL checks it in every handshake; :meth:`revokes` is for connections opened before it
    was loaded (SIGHUP), which no handshake will check again."""

    path: Path
    crls: tuple[x509.CertificateRevocationList, ...]
    revoked: frozenset[tuple[CanonicalName, int]]  # (issuer, as OpenSSL compares names; serial number)
    next_update: float | None  # the earliest nextUpdate: after it OpenSSL refuses every client
    numbers: tuple[tuple[CanonicalName, int], ...] = ()  # each CA's CRLNumber, where the CRL has one

    def revokes(self, caller: Caller) -> bool:
        return caller.issuer_and_serial in self.revoked

    def problem(self, now: float) -> str | None:
        """Why no client can connect, for /readyz; None while the CRL may be used."""
        if self.next_update is None or now < self.next_update:
            return None
        return (f"client_crl {self.path} expired at {_iso(self.next_update)} (its nextUpdate): every client "
                "certificate is refused until a newer CRL is in place and the broker reloaded (SIGHUP)")


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_PEM_KIND = re.compile(rb"-----BEGIN ([^-\r\n]{1,64})-----")


def load_client_crl(path: Path, client_ca: Path) -> ClientCrl:
    """The CRLs in ``path`` (PEM, one or more); CertError unless each is issued and signed by a
    CA in ``client_ca`` and is current, so that a wrong or stale file fails the start or the
    reload that loads it rather than every handshake after it."""
    data = _read_bytes(path, "client_crl")
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise CertError(f"client_crl {path} does not contain a PEM CRL (-----BEGIN X509 CRL-----)")
    other = next((kind for kind in _PEM_KIND.findall(data) if kind != b"X509 CRL"), None)
    if other is not None:
        # The stdlib engine loads the file as OpenSSL does, certificates included: one pasted
        # here would be trusted like client_ca.
        raise CertError(f"client_crl {path} holds a {other.decode(errors='replace')} block; it must hold "
                        "only CRLs (-----BEGIN X509 CRL-----)")
    cas = _read_certs(client_ca, "client_ca")
    now = dt.datetime.now(dt.timezone.utc)
    crls: list[x509.CertificateRevocationList] = []
    revoked: set[tuple[CanonicalName, int]] = set()
    next_updates: list[float] = []
    numbers: list[tuple[CanonicalName, int]] = []
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError:
            raise CertError(f"client_crl {path} holds a CRL that cannot be parsed") from None
        _check_crl(crl, path, cas, client_ca, now)
        issuer = canonical_name(crl.issuer)
        revoked.update((issuer, entry.serial_number) for entry in crl)
        if crl.next_update_utc is not None:
            next_updates.append(crl.next_update_utc.timestamp())
        number = _crl_number(crl)
        if number is not None:
            numbers.append((issuer, number))
        crls.append(crl)
    return ClientCrl(path, tuple(crls), frozenset(revoked), min(next_updates, default=None), tuple(numbers))


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def reloaded_client_crl(cfg: ServerConfig, in_force: ClientCrl | None) -> ClientCrl | None:
    """``cfg.client_crl`` for a reload: refused if a CA's CRL in it is older (a lower CRLNumber)
    than the one in force. An old copy put back by mistake would quietly un-revoke every
    certificate revoked since; CRL numbers only grow (RFC 5280 §5.2.3)."""
    crl = client_crl_of(cfg)
    if crl is None or in_force is None:
        return crl
    before = dict(in_force.numbers)
    for issuer, number in crl.numbers:
        if issuer in before and number < before[issuer]:
            raise CertError(f"client_crl {crl.path} is older than the CRL in force (CRLNumber {number} < "
                            f"{before[issuer]}): it would un-revoke certificates; put the newest CRL in place")
    return crl


def _check_crl(crl: x509.CertificateRevocationList, path: Path, cas: list[x509.Certificate], client_ca: Path,
               now: dt.datetime) -> None:
    issuer = crl.issuer.rfc4514_string()
    signers = [ca for ca in cas if canonical_name(ca.subject) == canonical_name(crl.issuer)]
    if not signers:
        raise CertError(f"client_crl {path}: the CRL of {issuer!r} is not from a CA in client_ca {client_ca}")
    signers = [ca for ca in signers if _signed_by(crl, ca)]
    if not signers:
        raise CertError(f"client_crl {path}: the CRL of {issuer!r} is not signed by that CA's key in client_ca "
                        f"{client_ca}")
    # What else makes OpenSSL refuse a CRL, and with it every client certificate of that CA.
    if not any(_may_sign_crls(ca) for ca in signers):
        raise CertError(f"client_crl {path}: CA {issuer!r} in client_ca may not sign CRLs (its keyUsage lacks "
                        "cRLSign), so OpenSSL would refuse this CRL and every certificate the CA issued")
    for extension in crl.extensions:
        if extension.oid == ExtensionOID.DELTA_CRL_INDICATOR:
            raise CertError(f"client_crl {path}: the CRL of {issuer!r} is a delta CRL; give the complete CRL")
        if extension.critical and extension.oid not in _CRITICAL_EXTENSIONS_OPENSSL_HANDLES:
            raise CertError(f"client_crl {path}: the CRL of {issuer!r} has a critical extension OpenSSL does not "
                            f"process ({extension.oid.dotted_string}), so it would refuse the CRL")
    if now < crl.last_update_utc:
        raise CertError(f"client_crl {path}: the CRL of {issuer!r} is not valid until "
                        f"{crl.last_update_utc.isoformat()} (its lastUpdate)")
    if crl.next_update_utc is not None and now >= crl.next_update_utc:
        raise CertError(f"client_crl {path}: the CRL of {issuer!r} expired at {crl.next_update_utc.isoformat()} "
                        "(its nextUpdate); publish a newer one")


_CRITICAL_EXTENSIONS_OPENSSL_HANDLES = frozenset({ExtensionOID.ISSUING_DISTRIBUTION_POINT})


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        return ca.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        return True  # no keyUsage: any use


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):  # a key type that cannot sign
        return False


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat()


def client_crl_of(cfg: ServerConfig) -> ClientCrl | None:
    """``cfg.client_crl`` loaded and checked, or None when none is configured."""
    return load_client_crl(cfg.client_crl, cfg.client_ca) if cfg.client_crl is not None else None


def server_context(cfg: ServerConfig, crl: ClientCrl | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only server context requiring a client cert signed by ``cfg.client_ca`` (and,
    with ``crl``, not revoked by it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _strict(ctx)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # cfg.tls13_ciphersuites is deliberately not applied: the stdlib cannot restrict TLS 1.3
    # suites. OpenSSL's defaults are all AEAD suites; pyOpenSSL will enforce the list.
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: a resumed TLS 1.3 session skips client-cert verification, so a
    # rotated client CA (or a cert that expired since) would still get in. Jobs connect a
    # handful of times; a full handshake each time costs nothing that matters.
    ctx.num_tickets = 0
    _load_chain(ctx, Path(cfg.cert), Path(cfg.key), role="server", check_validity=True)
    require_private_key(Path(cfg.key))
    _load_trust(ctx, Path(cfg.client_ca), role="client_ca")
    if crl is not None:
        # The stdlib reads CRLs only from a file (cadata takes certificates); the file was
        # just checked by load_client_crl.
        _load_trust_file(ctx, crl.path, role="client_crl")
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def require_private_key(key: Path) -> None:
    """CertError if group or others may read the server key: ``broker check`` refuses such a
    key at start, and a reload (SIGHUP) must not accept what a start refuses."""
    problem = check_secret_file_mode(key)
    if problem is not None:
        raise CertError(f"server key refused: {problem}")


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context for ``broker get``: TLS 1.3, server verified against ``ca`` with hostname check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _strict(ctx)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_trust(ctx, Path(ca), role="CA")
    # Checked here too: the broker refuses such a certificate in the handshake, and the job
    # would see only a TLS alert instead of the dates and "ask for a new one".
    _load_chain(ctx, Path(cert), Path(key), role="client", check_validity=True)
    return ctx


class ReloadableServerContext:
    """A server context whose cert, key and client CA can be replaced without a restart.

    Pass :attr:`context` to ``loop.create_server`` once. Its ``sni_callback`` runs early in
    every handshake (OpenSSL calls it for each ClientHello, with or without SNI) and moves the
    connection onto the newest context, whose cert, key and trust store then apply. Open
    connections keep the context they were made with, so :meth:`reload` drops nobody.
    """

    def __init__(self, cfg: ServerConfig) -> None:
        self._cfg = cfg
        self.crl = client_crl_of(cfg)
        self._current = server_context(cfg, self.crl)
        self._outer = server_context(cfg, self.crl)
        self._outer.sni_callback = self._select

    @property
    def context(self) -> ssl.SSLContext:
        """The context to hand to the listener (it never changes)."""
        return self._outer

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use."""
        return self._current

    def reload(self) -> None:
        """Re-read the config's files; on CertError the old context stays in use."""
        crl = reloaded_client_crl(self._cfg, self.crl)
        self._current, self.crl = server_context(self._cfg, crl), crl

    def revokes(self, caller: Caller) -> bool:
        return self.crl is not None and self.crl.revokes(caller)

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Returning None lets the handshake go on; it then uses the assigned context's cert
        # and key, and verifies the client against that context's trust store.
        ssl_object.context = self._current


def require_client_auth_eku(der: bytes) -> None:
    """Raise CertError unless the cert has an extendedKeyUsage that includes clientAuth.

    The app must call this (with :func:`peer_der`) before serving a request: the handshake
    refuses an EKU without clientAuth, but the stdlib engine accepts a cert with no EKU
    extension at all and offers no hook to refuse it there.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertError(
            f"client certificate {_describe(der)} has no extendedKeyUsage; clientAuth is required"
        ) from None
    except ValueError as exc:
        raise CertError(f"cannot parse client certificate: {exc}") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertError(
            f"client certificate {_describe(der)} is not valid for clientAuth (extendedKeyUsage)"
        )


def peer_der(transport: _Transport | None) -> bytes | None:
    """The peer's certificate (DER) on an asyncio/aiohttp transport, or None."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der or None


def peer_identities(transport: _Transport | None) -> tuple[str, ...]:
    """Identity strings of the peer's verified certificate; () when there is none."""
    if transport is None:
        return ()
    peercert = transport.get_extra_info("peercert")
    if peercert:
        return identities_from_peercert(peercert)
    # getpeercert() gives {} when the cert was not verified; never the case on our listener,
    # but a DER fallback keeps the answer identical should verification move out of OpenSSL.
    der = peer_der(transport)
    return identities_from_der(der) if der else ()


# --- loading -------------------------------------------------------------------------------


def _strict(ctx: ssl.SSLContext) -> None:
    # RFC 5280 strictness (Python 3.13's default): refuses malformed chains, e.g. a CA without
    # critical basicConstraints or a leaf without authorityKeyIdentifier.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, *, role: str, check_validity: bool) -> None:
    # Parse with cryptography first: it tells which file is wrong, which OpenSSL's
    # "[SSL] PEM lib" does not.
    certs = _read_certs(cert, f"{role} cert")
    if check_validity:
        _require_valid_now(certs[0], cert, f"{role} cert")
    private_key = _read_key(key, f"{role} key")
    if private_key.public_key() != certs[0].public_key():
        raise CertError(f"{role} key {key} does not match the certificate in {cert}")
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CertError(f"cannot load {role} cert {cert} with key {key}: {_reason(exc)}") from None


def _load_trust(ctx: ssl.SSLContext, path: Path, *, role: str) -> None:
    certs = _read_certs(path, role)
    for c in certs:
        if not _is_ca(c):
            raise CertError(
                f"{role} {path}: certificate {c.subject.rfc4514_string()!r} is not a CA "
                "(use the ca.pem that signed the certificates, not a leaf cert)"
            )
    _load_trust_file(ctx, path, role=role)


def _load_trust_file(ctx: ssl.SSLContext, path: Path, *, role: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise CertError(f"cannot load {role} {path}: {_reason(exc)}") from None


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{what} {path} not found") from None
    except OSError as exc:
        raise CertError(f"cannot read {what} {path}: {exc.strerror}") from None


def _read_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read_bytes(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertError(f"{what} {path} does not contain a PEM certificate")
    return certs


def _read_key(path: Path, what: str) -> Any:
    data = _read_bytes(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{what} {path} is encrypted; the broker needs an unencrypted key (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{what} {path} does not contain a PEM private key") from None


def require_valid_now(path: Path, what: str) -> None:
    """CertError if the first certificate in ``path`` is expired or not valid yet: served, it
    would fail every client's handshake while the broker looked ready."""
    _require_valid_now(_read_certs(path, what)[0], path, what)


def _require_valid_now(cert: x509.Certificate, path: Path, what: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise CertError(f"{what} {path} is not valid until {cert.not_valid_before_utc.isoformat()}")
    if now >= cert.not_valid_after_utc:
        raise CertError(f"{what} {path} expired at {cert.not_valid_after_utc.isoformat()}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _describe(der: bytes) -> str:
    try:
        cert = x509.load_der_x509_certificate(der)
        return repr(cert.subject.rfc4514_string())
    except ValueError:
        return "(unparseable)"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
