"""The listener's TLS engine: pyOpenSSL over memory BIOs, under aiohttp's request handler.

Why not the stdlib: Python's ``ssl`` links the system OpenSSL (3.0 here), whose server-side
handshake costs about twice what the OpenSSL bundled with ``cryptography`` (which pyOpenSSL
uses) does; and it cannot restrict TLS 1.3 cipher suites, so ``tls13_ciphersuites`` could not
be enforced. The pattern is Twisted's ``TLSMemoryBIOProtocol``: the raw TCP transport feeds
ciphertext into the connection's read BIO, plaintext comes out of ``recv`` and goes to the
application protocol (aiohttp's ``RequestHandler``), and whatever OpenSSL wants to send is
drained from the write BIO onto the socket.

What the handshake enforces, and why it is stricter than the stdlib engine could be: TLS 1.3
only, exactly the configured suites, a client certificate chaining to ``client_ca`` (strict
X.509), valid now, with an extendedKeyUsage that includes clientAuth — a cert without any EKU
is refused here, in the handshake. No session is ever resumed (a resumed session would skip the
client-certificate check, and with it a CA change): stateless tickets and the session cache are
off, so the stateful tickets OpenSSL still sends in TLS 1.3 name nothing. A handshake that
does not finish within the timeout frees its slot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi  # pyOpenSSL's own cffi bindings: see _Records
from OpenSSL._util import lib as _lib

from broker.config import ServerConfig
from broker.errors import CertError
from broker.identity import Caller
from broker.tls import (ClientCrl, ReloadableServerContext, client_crl_of, reloaded_client_crl, require_private_key,
                        require_valid_now)

log = logging.getLogger("broker.tls")

# One TLS record's worth (16 KiB of plaintext; a little more of ciphertext) per read.
_READ_SIZE = 17 * 1024
# While a read is being handled, answers are held back to leave in one write, up to this much:
# beyond it they go at once, so that the socket's flow control still sees them.
_CORK_LIMIT = 16 * 1024

HandshakeObserver = Callable[[str], None]  # outcome: success | failure | timeout


def _has_client_auth(der: bytes) -> bool:
    try:
        eku = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


class KnownCertificates:
    """What the listener reads out of a client certificate — whether its EKU includes
    clientAuth, and the Caller it names — once per certificate, not once per connection: the
    jobs on a runner host present the same few certificates again and again, and parsing one
    in Python costs more than the rest of a fetch. Both are properties of the DER bytes alone;
    the chain, validity and CA are still checked by OpenSSL in every handshake.

    It is also the contexts' verify callback, installed with libssl's ``SSL_CTX_set_verify``
    rather than pyOpenSSL's ``Context.set_verify``: pyOpenSSL's wrapper cannot tell OpenSSL
    *why* it refused a certificate, so a cert without clientAuth went out as the alert
    ``internal_error``. Here it is ``X509_V_ERR_INVALID_PURPOSE``, which OpenSSL sends as
    ``unsupported_certificate``. An exception in the callback refuses the certificate."""

    LIMIT = 1024  # distinct certificates remembered

    def __init__(self) -> None:
        self._client_auth = functools.lru_cache(maxsize=self.LIMIT)(_has_client_auth)
        self.caller = functools.lru_cache(maxsize=self.LIMIT)(Caller.from_der)
        self._revoked_logged: dict[str, float] = {}  # fingerprint → when last logged
        # Kept here for as long as any context made with it can run a handshake.
        self._callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", self._verify, error=0,
                                       onerror=_verify_crashed)

    def require_client_certificates(self, ctx: SSL.Context) -> None:
        _lib.SSL_CTX_set_verify(ctx._context, _VERIFY_MODE, self._callback)  # noqa: SLF001

    def _verify(self, ok: int, store: Any) -> int:
        """OpenSSL checked the chain (and, for a server, the sslclient purpose); we add that the
        leaf must *have* an EKU with clientAuth, which OpenSSL lets pass when EKU is absent."""
        if not ok:
            if _lib.X509_STORE_CTX_get_error(store) == _lib.X509_V_ERR_CERT_REVOKED:
                self._revoked_attempt(_der(_lib.X509_STORE_CTX_get_current_cert(store)))
            return 0
        if _lib.X509_STORE_CTX_get_error_depth(store) > 0:
            return 1
        der = _der(_lib.X509_STORE_CTX_get_current_cert(store))
        if der is not None and self._client_auth(der):
            return 1
        _lib.X509_STORE_CTX_set_error(store, _lib.X509_V_ERR_INVALID_PURPOSE)
        return 0


    REVOKED_LOG_INTERVAL = 60.0  # seconds between log lines for one revoked certificate

    def _revoked_attempt(self, der: bytes | None) -> None:
        """Someone still holds a revoked certificate's key and tries it: security wants to know,
        once a minute per certificate (a loop of attempts must not flood the log)."""
        if der is None:
            return
        fingerprint = hashlib.sha256(der).hexdigest()[:16]
        now = time.monotonic()
        if now - self._revoked_logged.get(fingerprint, -self.REVOKED_LOG_INTERVAL) < self.REVOKED_LOG_INTERVAL:
            return
        if len(self._revoked_logged) >= self.LIMIT:
            self._revoked_logged.clear()
        self._revoked_logged[fingerprint] = now
        log.warning("tls_refused_revoked_certificate certificate_fp=%s identity=%s reason=the client_crl lists "
                    "this certificate (logged once a minute per certificate)", fingerprint,
                    self.caller(der).primary)


_VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def _verify_crashed(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    log.error("tls_verify_internal_error error=%s: the client certificate is refused", exc_type.__name__)


def _der(x509: Any) -> bytes | None:
    """The DER encoding of an ``X509*`` OpenSSL lends us (no reference is taken or dropped)."""
    if x509 == _ffi.NULL:
        return None
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    if bio == _ffi.NULL:
        return None
    try:
        if _lib.i2d_X509_bio(bio, x509) != 1:
            return None
        data = _ffi.new("char **")
        size = _lib.BIO_get_mem_data(bio, data)
        return _ffi.buffer(data[0], size)[:]
    finally:
        _lib.BIO_free(bio)


# OpenSSL's SSL_MODE_NO_AUTO_CHAIN (pyOpenSSL has no name for it): send the chain in the
# cert file as it is, instead of building one from the trust store in every handshake — that
# build verified our own certificate again each time (~17% of a handshake's instructions).
_MODE_NO_AUTO_CHAIN = 0x8


def openssl_context(cfg: ServerConfig, certificates: KnownCertificates, crl: ClientCrl | None = None) -> SSL.Context:
    """The server context for ``cfg`` (refusing the client certificates ``crl`` revokes);
    CertError naming the file when something is wrong."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # RELEASE_BUFFERS: an idle keep-alive connection holds no record buffers.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | _MODE_NO_AUTO_CHAIN)
    try:
        ctx.set_tls13_ciphersuites(":".join(cfg.tls13_ciphersuites).encode())
    except SSL.Error:
        raise CertError(f"none of the cipher suites {', '.join(cfg.tls13_ciphersuites)} is usable") from None
    for what, path, load in (
        ("server certificate", cfg.cert, ctx.use_certificate_chain_file),
        ("server key", cfg.key, ctx.use_privatekey_file),
        ("client_ca", cfg.client_ca, ctx.load_verify_locations),
    ):
        _require_readable(what, path)
        try:
            load(str(path))
        except (SSL.Error, OSError) as exc:
            if what == "server key" and "mismatch" in _reason(exc):  # OpenSSL checks the pair on load
                raise _mismatch(cfg) from None
            raise CertError(f"cannot load the {what} {path}: {_reason(exc)}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise _mismatch(cfg) from None
    require_private_key(cfg.key)
    require_valid_now(cfg.cert, "server cert")
    store = ctx.get_cert_store()
    if store is None:  # cannot happen after load_verify_locations; refuse rather than verify loosely
        raise CertError(f"cannot use client_ca {cfg.client_ca}: OpenSSL has no certificate store")
    store.set_flags(crypto.X509StoreFlags.X509_STRICT)
    if crl is not None:
        for each in crl.crls:
            store.add_crl(each)
        # The client's own certificate only: a CA above it is trusted as configured in client_ca.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    certificates.require_client_certificates(ctx)
    return ctx


def _mismatch(cfg: ServerConfig) -> CertError:
    return CertError(f"server key {cfg.key} does not match the certificate in {cfg.cert}")


def _require_readable(what: str, path: Path) -> None:
    """CertError with the operating system's reason ("No such file or directory") if ``path``
    cannot be read: for a file it cannot open, OpenSSL reports only "system lib"."""
    try:
        with open(str(path), "rb"):
            pass
    except OSError as exc:
        raise CertError(f"cannot load the {what} {path}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    parts = [str(e[2]) for e in getattr(exc, "args", [[]])[0] if isinstance(e, tuple) and len(e) == 3]
    return "; ".join(parts) or type(exc).__name__


class _Records:
    """The data phase of one connection, calling libssl directly on pyOpenSSL's pointers.

    Why not ``Connection.recv/send/bio_read/bio_write``: each call allocates a fresh buffer of
    the asked size, and "nothing more to read" arrives as a raised ``WantReadError``; at one
    request per TLS record that wrapper work was about a quarter of a keep-alive fetch (profile
    and bench numbers in the commit that introduced this class). This class holds the connection's ``SSL*`` and
    its two memory BIOs and reads through one scratch buffer per listener (the event loop is
    single-threaded). The handshake, shutdown and every query stay on pyOpenSSL's public API. Should pyOpenSSL rename these private attributes, every TLS test
    fails at the first connection rather than anything going quietly wrong.
    """

    __slots__ = ("_ssl", "_into", "_from", "_scratch")

    MORE, CLOSED, FAILED = range(3)  # how a read ended

    def __init__(self, conn: SSL.Connection, scratch: Any) -> None:
        self._ssl = conn._ssl  # noqa: SLF001
        self._into = conn._into_ssl  # noqa: SLF001
        self._from = conn._from_ssl  # noqa: SLF001
        self._scratch = scratch

    def feed(self, ciphertext: bytes) -> bool:
        """Give bytes from the socket to OpenSSL; False if it refused them."""
        return bool(_lib.BIO_write(self._into, ciphertext, len(ciphertext)) == len(ciphertext))

    def read(self) -> tuple[bytes, int]:
        """All plaintext decryptable now, and how reading ended (MORE: needs more bytes)."""
        chunks = []
        while True:
            n = _lib.SSL_read(self._ssl, self._scratch, _READ_SIZE)
            if n > 0:
                chunks.append(_ffi.buffer(self._scratch, n)[:])
                continue
            error = _lib.SSL_get_error(self._ssl, n)
            if error == _lib.SSL_ERROR_WANT_READ:
                return b"".join(chunks), self.MORE
            _lib.ERR_clear_error()  # the error queue is per thread: leave it clean for the next call
            return b"".join(chunks), self.CLOSED if error == _lib.SSL_ERROR_ZERO_RETURN else self.FAILED

    def write(self, plaintext: bytes) -> bool:
        """Encrypt all of ``plaintext`` (a memory BIO never blocks); False on a fatal error."""
        if _lib.SSL_write(self._ssl, plaintext, len(plaintext)) > 0:
            return True
        _lib.ERR_clear_error()
        return False

    def drain(self) -> bytes:
        """What OpenSSL wants sent: records, alerts, handshake flights."""
        chunks = []
        while (n := _lib.BIO_read(self._from, self._scratch, _READ_SIZE)) > 0:
            chunks.append(_ffi.buffer(self._scratch, n)[:])
            if n < _READ_SIZE:
                break  # a memory BIO hands out all it has: less than asked means it is empty
        return b"".join(chunks)


class _PeerCertificate:
    """What ``broker.tls.peer_der`` reads from ``get_extra_info("ssl_object")``."""

    def __init__(self, der: bytes | None) -> None:
        self._der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self._der if binary_form else None


class _AppTransport(asyncio.Transport):
    """The plaintext side, as the application protocol sees it."""

    def __init__(self, tls: TLSServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.send(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._tls.send(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._tls.raw is None or self._tls.raw.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.extra(name, default)

    def pause_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.pause_reading()

    def resume_reading(self) -> None:
        if self._tls.raw is not None:
            self._tls.raw.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.raw is not None and self._tls.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.raw is not None:
            self._tls.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.raw.get_write_buffer_size() if self._tls.raw is not None else 0


class TLSServerProtocol(asyncio.Protocol):
    """One TLS connection: handshake, then plaintext to and from the application protocol."""

    def __init__(self, contexts: ReloadableOpenSSLContext, app_factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float, observe: HandshakeObserver, scratch: Any) -> None:
        self._certificates = contexts.certificates
        self._conn = SSL.Connection(contexts.current, None)
        self._conn.set_accept_state()
        self._records = _Records(self._conn, scratch)
        self._app_factory = app_factory
        self._handshake_timeout = handshake_timeout
        self._observe = observe
        self._app: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer_der: bytes | None = None
        self._caller: Caller | None = None
        self._corked = False
        self._held = 0  # plaintext bytes encrypted but not yet written while corked
        self.raw: asyncio.Transport | None = None

    # --- from the socket ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self._timer = asyncio.get_running_loop().call_later(self._handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if not self._records.feed(data):  # bytes after a fatal alert or shutdown: nothing more to say
            log.debug("tls_error reason=the connection takes no more input")
            self.abort()
            return
        # What this read makes OpenSSL send — the end of the handshake, its session tickets,
        # the answers to every request in it — leaves in one write, not one each.
        self._corked = True
        try:
            if self._app is not None or self._handshake():
                self._deliver()
        finally:
            self._corked = False
            self._flush()

    def eof_received(self) -> bool | None:
        if self._app is not None:
            return self._app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.raw = None
        if self._app is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # --- TLS ----------------------------------------------------------------------------

    def _handshake(self) -> bool:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False  # the next flight goes out with data_received's flush
        except SSL.Error as exc:
            self._flush()  # the alert tells the client why
            self._fail("failure", _reason(exc))
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        peer = self._conn.get_peer_certificate()
        self._peer_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer) if peer is not None else None
        if self._peer_der is not None:
            # Once per connection, not per request: the chain and the clientAuth EKU were
            # verified in the handshake, so keep-alive requests only look this up.
            self._caller = self._certificates.caller(self._peer_der)
        self._observe("success")
        self._app = self._app_factory()
        self._app.connection_made(_AppTransport(self))
        return True

    def _deliver(self) -> None:
        plaintext, ended = self._records.read()
        if plaintext and self._app is not None:
            self._app.data_received(plaintext)
        if ended == _Records.CLOSED:  # the peer's close_notify
            self._flush()
            if self._app is not None and not self._app.eof_received() and self.raw is not None:
                self.raw.close()
            return
        if ended == _Records.FAILED:
            log.debug("tls_error after handshake reason=the record layer failed")
            self.abort()

    def _flush(self) -> None:
        self._held = 0
        if self.raw is None or self.raw.is_closing():
            return
        ciphertext = self._records.drain()
        if ciphertext:
            self.raw.write(ciphertext)

    def _fail(self, outcome: str, reason: str) -> None:
        log.debug("tls_handshake_refused outcome=%s reason=%s", outcome, reason)
        self._observe(outcome)
        if self.raw is not None:
            self.raw.close()

    def _timed_out(self) -> None:
        self._timer = None
        if self._app is None:
            self._fail("timeout", f"no complete handshake within {self._handshake_timeout:g}s")
            if self.raw is not None:
                self.raw.abort()

    # --- from the application -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.raw is None or self.raw.is_closing() or not data:
            return
        if not self._records.write(data):
            log.debug("tls_error reason=cannot encrypt the response")
            self.abort()
            return
        self._held += len(data)
        if not self._corked or self._held >= _CORK_LIMIT:
            self._flush()

    def close(self) -> None:
        if self.raw is None or self.raw.is_closing():
            return
        try:
            self._conn.shutdown()  # close_notify
        except SSL.Error:
            pass
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        if self.raw is not None:
            self.raw.abort()

    def extra(self, name: str, default: Any) -> Any:
        if name == "ssl_object":
            return _PeerCertificate(self._peer_der)
        if name == "peercert_der":
            return self._peer_der
        if name == "broker_caller":
            return self._caller
        if name == "sslcontext":
            return self._conn.get_context()
        if name == "cipher":
            return self._conn.get_cipher_name()
        return self.raw.get_extra_info(name, default) if self.raw is not None else default


class ReloadableOpenSSLContext:
    """The listener's current context; ``reload`` makes new connections use new files."""

    def __init__(self, cfg: ServerConfig) -> None:
        self._cfg = cfg
        self.certificates = KnownCertificates()
        self.crl = client_crl_of(cfg)
        self.current = openssl_context(cfg, self.certificates, self.crl)

    def reload(self) -> None:
        crl = reloaded_client_crl(self._cfg, self.crl)  # raises CertError, keeping the old context
        self.current, self.crl = openssl_context(self._cfg, self.certificates, crl), crl

    def revokes(self, caller: Caller) -> bool:
        return self.crl is not None and self.crl.revokes(caller)


def listener_context(cfg: ServerConfig) -> ReloadableOpenSSLContext | ReloadableServerContext:
    """The API listener's reloadable context for ``cfg.tls_engine``; CertError, naming the file
    and the problem, for anything ``broker serve`` refuses (also what ``broker check`` runs)."""
    return ReloadableOpenSSLContext(cfg) if cfg.tls_engine == "openssl" else ReloadableServerContext(cfg)


def tls_protocol_factory(contexts: ReloadableOpenSSLContext, app_factory: Callable[[], asyncio.Protocol],
                         handshake_timeout: float, observe: HandshakeObserver) -> Callable[[], asyncio.Protocol]:
    scratch = _ffi.new("char[]", _READ_SIZE)  # one per listener, shared by its connections
    return lambda: TLSServerProtocol(contexts, app_factory, handshake_timeout, observe, scratch)
