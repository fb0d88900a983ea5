"""broker.tls over real sockets on 127.0.0.1: who gets through the handshake, and cert reload.

In TLS 1.3 the client finishes its side of the handshake before the server has checked the
client cert, so a refusal reaches the client only on its first read. The helper therefore
reads the server's greeting before doing anything else: an accepted client gets the greeting,
a refused one an error or EOF there.

What the refused client sees is not the reason: asyncio's SSL transport (CPython ≤ 3.14,
uvloop) closes the connection without flushing the TLS alert (python/cpython#98078), so the
client gets EOF instead of "certificate required". The tests take the reason from the server
side instead, from the handshake error asyncio logs at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from broker.certs import fingerprint_sha256, init_ca_and_server, issue_client, issue_server
from broker.config import ServerConfig
from broker.devserver import OpenBaoDevServer
from broker.errors import CertError
from broker.identity import identities_from_der
from broker.tls import (
    ReloadableServerContext,
    client_context,
    peer_der,
    peer_identities,
    require_client_auth_eku,
    server_context,
)
from broker.tlsengine import KnownCertificates, openssl_context
from tests.conftest import BrokerFactory, RunningBroker, assert_still_serving
from tests.conftest import Pki as BrokerPki

TIMEOUT = 5.0
GREETING = b"hello\n"


# --- PKI ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def config(self) -> ServerConfig:
        return ServerConfig(
            host="127.0.0.1",
            port=0,
            cert=self.dir / "server.pem",
            key=self.dir / "server.key",
            client_ca=self.ca,
        )


def make_pki(d: Path) -> Pki:
    init_ca_and_server(d)
    now = dt.datetime.now(dt.timezone.utc)
    issue_client(d, "job", uris=["spiffe://ci.example/runner/1"])
    issue_client(d, "srv", eku="server")
    issue_client(d, "noeku", eku="none")
    issue_client(d, "expired", not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1))
    issue_client(d, "future", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=2))
    return Pki(d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-a"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-b"))


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def ctx_for(pki: Pki, name: str = "job", trust: Path | None = None) -> ssl.SSLContext:
    return client_context(trust or pki.ca, *pki.client(name))


# --- a tiny line server -----------------------------------------------------------------------


@dataclass
class LineServer:
    """Greets each accepted connection, then echoes lines; records what it saw of the peer."""

    ders: list[bytes | None] = field(default_factory=list)
    identities: list[tuple[str, ...]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.ders.append(peer_der(writer.transport))
        self.identities.append(peer_identities(writer.transport))
        try:
            writer.write(GREETING)
            await writer.drain()
            while line := await reader.readline():
                writer.write(b"pong " + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @property
    def accepted(self) -> int:
        return len(self.ders)


@contextlib.asynccontextmanager
async def serving(ctx: ssl.SSLContext) -> AsyncIterator[LineServer]:
    srv = LineServer()
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=ctx)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        await server.wait_closed()


class Conn:
    """An open client connection that has received the server's greeting."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def server_der(self) -> bytes:
        return self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

    async def ping(self) -> bytes:
        self.writer.write(b"ping\n")
        return await asyncio.wait_for(self.reader.readline(), TIMEOUT)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None) -> Conn:
    """Handshake and read the greeting; raises what a refused client sees (SSLError/EOF)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname),
        TIMEOUT,
    )
    conn = Conn(reader, writer)
    try:
        greeting = await asyncio.wait_for(reader.readline(), TIMEOUT)
        if greeting != GREETING:
            raise ConnectionResetError(f"connection closed without a greeting: {greeting!r}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def exchange(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None) -> bytes:
    conn = await connect(port, ctx, server_hostname)
    try:
        return await conn.ping()
    finally:
        await conn.close()


REFUSED = (ssl.SSLError, ConnectionError)


class _HandshakeErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and isinstance(record.exc_info[1], ssl.SSLError):
            self.errors.append(record.exc_info[1])

    async def wait_reason(self) -> str:
        # The server logs before it closes, so this is normally already there.
        for _ in range(100):
            if self.errors:
                return " / ".join(str(e) for e in self.errors)
            await asyncio.sleep(0.01)
        raise AssertionError("the server logged no handshake error")


@pytest.fixture
async def handshake_errors() -> AsyncIterator[_HandshakeErrors]:
    """Server-side handshake errors (asyncio only logs them, at debug level, in debug mode)."""
    loop = asyncio.get_running_loop()
    logger = logging.getLogger("asyncio")
    handler = _HandshakeErrors()
    was_debug, old_level, old_propagate = loop.get_debug(), logger.level, logger.propagate
    loop.set_debug(True)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the expected tracebacks out of the test report
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        loop.set_debug(was_debug)


async def assert_refused(
    port: int, ctx: ssl.SSLContext, errors: _HandshakeErrors, reason: str, server_hostname: str | None = None
) -> None:
    errors.errors.clear()
    with pytest.raises(REFUSED):
        await exchange(port, ctx, server_hostname)
    assert reason in await errors.wait_reason()


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[LineServer]:
    async with serving(server_context(pki.config())) as srv:
        yield srv


# --- who gets through -------------------------------------------------------------------------


async def test_good_client(server: LineServer, pki: Pki) -> None:
    assert await exchange(server.port, ctx_for(pki)) == b"pong ping\n"
    assert server.accepted == 1


async def test_good_client_by_name(server: LineServer, pki: Pki) -> None:
    assert await exchange(server.port, ctx_for(pki), server_hostname="localhost") == b"pong ping\n"


async def test_server_sees_client_identity(server: LineServer, pki: Pki) -> None:
    await exchange(server.port, ctx_for(pki))
    job_der = der_of(pki.client("job")[0])
    assert server.ders == [job_der]
    assert server.identities == [("cn:job", "uri:spiffe://ci.example/runner/1")]
    # getpeercert()'s dict and the DER path agree on a real handshake
    assert server.identities[0] == identities_from_der(job_der)
    require_client_auth_eku(job_der)


async def test_connection_is_tls13(server: LineServer, pki: Pki) -> None:
    conn = await connect(server.port, ctx_for(pki))
    try:
        assert conn.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    finally:
        await conn.close()


def no_cert_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    return ctx


def tls12_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(*pki.client("job"))
    return ctx


def stranger_ctx(pki: Pki, other: Pki) -> ssl.SSLContext:
    # Trusts our server, presents a cert from another CA.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(*other.client("job"))
    return ctx


def named_ctx(pki: Pki, name: str) -> ssl.SSLContext:
    # Plain stdlib context, so these cases test the server alone.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(*pki.client(name))
    return ctx


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no client cert", "peer did not return a certificate"),
        ("TLS 1.2 only", "unsupported protocol"),
        ("cert from another CA", "unable to get local issuer certificate"),
        ("serverAuth-only cert", "unsuitable certificate purpose"),
        ("expired cert", "certificate has expired"),
        ("not yet valid cert", "certificate is not yet valid"),
    ],
)
async def test_refused_at_handshake(
    server: LineServer,
    pki: Pki,
    other_pki: Pki,
    handshake_errors: _HandshakeErrors,
    case: str,
    reason: str,
) -> None:
    ctx = {
        "no client cert": lambda: no_cert_ctx(pki),
        "TLS 1.2 only": lambda: tls12_ctx(pki),
        "cert from another CA": lambda: stranger_ctx(pki, other_pki),
        "serverAuth-only cert": lambda: named_ctx(pki, "srv"),
        "expired cert": lambda: named_ctx(pki, "expired"),
        "not yet valid cert": lambda: named_ctx(pki, "future"),
    }[case]()
    await assert_refused(server.port, ctx, handshake_errors, reason)
    assert server.accepted == 0
    # the listener is unharmed
    assert await exchange(server.port, ctx_for(pki)) == b"pong ping\n"


async def test_named_ctx_control(server: LineServer, pki: Pki) -> None:
    """The refused cases above differ from this one only in the client cert."""
    assert await exchange(server.port, named_ctx(pki, "job")) == b"pong ping\n"


async def test_no_eku_cert_passes_handshake_but_not_require_client_auth_eku(server: LineServer, pki: Pki) -> None:
    # The stdlib cannot refuse this in the handshake; the app's post-handshake check must.
    assert await exchange(server.port, named_ctx(pki, "noeku")) == b"pong ping\n"
    (der,) = server.ders
    assert der is not None
    with pytest.raises(CertError, match="'CN=noeku' has no extendedKeyUsage; clientAuth is required"):
        require_client_auth_eku(der)


def test_require_client_auth_eku(pki: Pki) -> None:
    require_client_auth_eku(der_of(pki.client("job")[0]))
    with pytest.raises(CertError, match="'CN=srv' is not valid for clientAuth"):
        require_client_auth_eku(der_of(pki.client("srv")[0]))
    with pytest.raises(CertError, match="has no extendedKeyUsage"):
        require_client_auth_eku(der_of(pki.client("noeku")[0]))
    with pytest.raises(CertError, match="cannot parse client certificate"):
        require_client_auth_eku(b"junk")


async def test_client_context_checks_server_name(server: LineServer, pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await exchange(server.port, ctx_for(pki), server_hostname="evil.example")


async def test_client_context_refuses_unknown_server(server: LineServer, pki: Pki, other_pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await exchange(server.port, client_context(other_pki.ca, *pki.client("job")))
    assert server.accepted == 0


def test_context_settings(pki: Pki) -> None:
    server = server_context(pki.config())
    assert server.minimum_version == server.maximum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.num_tickets == 0
    client = ctx_for(pki)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    for ctx in (server, client):
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT


async def test_no_session_tickets(server: LineServer, pki: Pki) -> None:
    # A resumed session would skip client-cert verification (and so a CA rotation).
    conn = await connect(server.port, ctx_for(pki))
    try:
        assert await conn.ping() == b"pong ping\n"  # tickets, if any, arrive before this
        session = conn.writer.get_extra_info("ssl_object").session
        assert session is None or not session.has_ticket
    finally:
        await conn.close()


def test_peer_helpers_without_tls() -> None:
    class Plain:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    assert peer_der(Plain()) is None
    assert peer_identities(Plain()) == ()
    assert peer_der(None) is None
    assert peer_identities(None) == ()


# --- file errors --------------------------------------------------------------------------------


def copy_pki(src: Pki, dst: Path) -> Pki:
    dst.mkdir(exist_ok=True)
    for name in ("ca.pem", "server.pem", "server.key", "job.pem", "job.key"):
        shutil.copy(src.dir / name, dst / name)
    return Pki(dst)


def encrypted_key(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.private_bytes(
        Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("server.pem", None, "server cert {path} not found"),
        ("server.key", None, "server key {path} not found"),
        ("ca.pem", None, "client_ca {path} not found"),
        ("server.pem", b"garbage", "server cert {path} does not contain a PEM certificate"),
        ("server.key", b"garbage", "server key {path} does not contain a PEM private key"),
        ("ca.pem", b"", "client_ca {path} does not contain a PEM certificate"),
        ("server.key", "other key", "server key {path} does not match the certificate in"),
        ("server.key", "encrypted", "server key {path} is encrypted"),
        ("ca.pem", "leaf", "client_ca {path}: certificate 'CN=job' is not a CA"),
        ("server.pem", "expired", "server cert {path} expired at"),
    ],
)
def test_server_context_file_errors(
    pki: Pki, tmp_path: Path, file: str, content: bytes | str | None, message: str
) -> None:
    live = copy_pki(pki, tmp_path)
    path = live.dir / file
    if content is None:
        path.unlink()
    elif content == "other key":
        path.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    elif content == "encrypted":
        path.write_bytes(encrypted_key(path))
    elif content == "leaf":
        shutil.copy(live.dir / "job.pem", path)
    elif content == "expired":
        shutil.copy(pki.dir / "expired.pem", path)
        shutil.copy(pki.dir / "expired.key", live.dir / "server.key")
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with pytest.raises(CertError) as err:
        server_context(live.config())
    assert message.format(path=path) in str(err.value)
    assert "Traceback" not in str(err.value)


def test_unreadable_file(pki: Pki, tmp_path: Path) -> None:
    live = copy_pki(pki, tmp_path)
    (live.dir / "server.key").unlink()
    (live.dir / "server.key").mkdir()  # reading a directory fails even as root
    with pytest.raises(CertError, match=r"cannot read server key .*server\.key: Is a directory"):
        server_context(live.config())


def test_client_context_file_errors(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client("job")
    with pytest.raises(CertError, match=f"CA {tmp_path / 'nope.pem'} not found"):
        client_context(tmp_path / "nope.pem", cert, key)
    with pytest.raises(CertError, match=f"client cert {tmp_path / 'nope.pem'} not found"):
        client_context(pki.ca, tmp_path / "nope.pem", key)
    with pytest.raises(CertError, match="client key .*server.key does not match the certificate in"):
        client_context(pki.ca, cert, pki.dir / "server.key")


# --- reload ---------------------------------------------------------------------------------------


def install(src: Pki, live: Path) -> None:
    """What an operator does: replace the files the config points at."""
    for name in ("ca.pem", "server.pem", "server.key"):
        shutil.copy(src.dir / name, live / name)


@pytest.mark.parametrize("server_hostname", [None, "localhost"], ids=["ip-no-sni", "sni"])
async def test_reload_swaps_cert_and_client_ca_keeping_open_connections(
    pki: Pki, other_pki: Pki, tmp_path: Path, handshake_errors: _HandshakeErrors, server_hostname: str | None
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    install(pki, live)
    cfg = Pki(live).config()
    reloadable = ReloadableServerContext(cfg)
    # A client trusting both CAs can tell which server cert it got, and which client CA applies.
    both = tmp_path / "both.pem"
    both.write_bytes(pki.ca.read_bytes() + other_pki.ca.read_bytes())

    async with serving(reloadable.context) as srv:
        old = await connect(srv.port, ctx_for(pki), server_hostname)
        try:
            assert old.server_der == der_of(pki.dir / "server.pem")

            install(other_pki, live)
            reloadable.reload()

            # new connections: new server cert...
            new = await connect(srv.port, ctx_for(other_pki), server_hostname)
            assert fingerprint_sha256(new.server_der) == fingerprint_sha256(der_of(other_pki.dir / "server.pem"))
            assert await new.ping() == b"pong ping\n"
            await new.close()
            # ...and new client CA: a client cert from the old CA is refused now
            await assert_refused(
                srv.port,
                ctx_for(pki, trust=both),
                handshake_errors,
                # the client sends its chain (job + old CA, auto-built from its trust store)
                "self-signed certificate in certificate chain",
                server_hostname,
            )
            with pytest.raises(ssl.SSLCertVerificationError):
                await exchange(srv.port, ctx_for(pki), server_hostname)  # trusts only the old CA

            # the connection made before the reload still works
            assert await old.ping() == b"pong ping\n"
            assert await old.ping() == b"pong ping\n"
        finally:
            await old.close()
    assert srv.accepted == 2


async def test_reload_with_bad_files_keeps_old_context(pki: Pki, tmp_path: Path) -> None:
    live = copy_pki(pki, tmp_path)
    reloadable = ReloadableServerContext(live.config())
    before = reloadable.current
    async with serving(reloadable.context) as srv:
        (live.dir / "server.key").write_bytes(b"garbage")
        with pytest.raises(CertError, match=r"server key .*server\.key does not contain a PEM private key"):
            reloadable.reload()
        assert reloadable.current is before
        assert await exchange(srv.port, ctx_for(live)) == b"pong ping\n"


async def test_reload_same_ca_new_server_cert(pki: Pki, tmp_path: Path) -> None:
    """The everyday rotation: same CA, fresh server cert; clients change nothing."""
    live = copy_pki(pki, tmp_path)
    shutil.copy(pki.dir / "ca.key", live.dir / "ca.key")
    reloadable = ReloadableServerContext(live.config())
    async with serving(reloadable.context) as srv:
        old = await connect(srv.port, ctx_for(live))
        try:
            assert old.server_der == der_of(pki.dir / "server.pem")
            issue_server(live.dir, force=True)
            reloadable.reload()
            new = await connect(srv.port, ctx_for(live))
            try:
                assert new.server_der == der_of(live.dir / "server.pem") != old.server_der
            finally:
                await new.close()
            assert await old.ping() == b"pong ping\n"
        finally:
            await old.close()


@pytest.mark.parametrize("engine", ["stdlib", "openssl"])
def test_a_server_key_others_can_read_is_refused_by_both_engines(pki: Pki, tmp_path: Path, engine: str) -> None:
    live = copy_pki(pki, tmp_path)
    key = live.dir / "server.key"
    key.chmod(0o640)
    with pytest.raises(CertError) as err:
        if engine == "stdlib":
            server_context(live.config())
        else:
            openssl_context(live.config(), KnownCertificates())
    assert str(err.value) == (f"server key refused: secret file {key} has mode 0640, so group or others can "
                              f"access it; run chmod 600 {key}")


@pytest.mark.parametrize(("file", "what"), [
    ("server.pem", "server certificate"), ("server.key", "server key"), ("ca.pem", "client_ca")])
def test_openssl_engine_names_the_os_reason_for_a_missing_file(pki: Pki, tmp_path: Path, file: str,
                                                               what: str) -> None:
    live = copy_pki(pki, tmp_path)
    (live.dir / file).unlink()
    with pytest.raises(CertError) as err:
        openssl_context(live.config(), KnownCertificates())
    assert str(err.value) == f"cannot load the {what} {live.dir / file}: No such file or directory"


# --- reload on a real broker (SIGHUP) -----------------------------------------------------------


@pytest.fixture
async def own_broker(tmp_path: Path, openbao: OpenBaoDevServer, log_lines: list[str]
                     ) -> AsyncIterator[RunningBroker]:
    """A broker whose server cert and key are this test's own, so the test may break them."""
    d = tmp_path / "own-pki"
    d.mkdir()
    init_ca_and_server(d)
    issue_client(d, "job")
    factory = BrokerFactory(tmp_path, BrokerPki(d, d), openbao, log_lines)
    try:
        yield await factory.start()
    finally:
        await factory.close()


async def _sighup(b: RunningBroker, log_lines: list[str]) -> list[str]:
    """Send this process a real SIGHUP, handled as `broker serve` does; the reload's log lines."""
    seen = len(log_lines)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, b.broker.reload)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await b.wait_for(lambda: any("tls_reload" in line for line in log_lines[seen:]), what="the reload")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    return [line for line in log_lines[seen:] if "tls_reload" in line]


def _break_key_mode(d: Path) -> str:
    (d / "server.key").chmod(0o644)
    key = d / "server.key"
    return f"server key refused: secret file {key} has mode 0644, so group or others can access it; run chmod 600 {key}"


def _remove_cert(d: Path) -> str:
    (d / "server.pem").rename(d / "server.pem.moved")
    return f"cannot load the server certificate {d / 'server.pem'}: No such file or directory"


def _server_cert_valid(d: Path, not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    """Replace server.pem with one for the same key, from the same CA, valid only then."""
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    current = x509.load_pem_x509_certificate((d / "server.pem").read_bytes())
    builder = x509.CertificateBuilder().subject_name(current.subject).issuer_name(ca.subject)
    builder = builder.public_key(current.public_key()).serial_number(x509.random_serial_number())
    builder = builder.not_valid_before(not_before).not_valid_after(not_after)
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (d / "server.pem.valid").write_bytes((d / "server.pem").read_bytes())
    (d / "server.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    return cert


def _expire_cert(d: Path) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    cert = _server_cert_valid(d, now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    return f"server cert {d / 'server.pem'} expired at {cert.not_valid_after_utc.isoformat()}"


def _future_cert(d: Path) -> str:
    now = dt.datetime.now(dt.timezone.utc)
    cert = _server_cert_valid(d, now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    return f"server cert {d / 'server.pem'} is not valid until {cert.not_valid_before_utc.isoformat()}"


def _repair(d: Path) -> None:
    (d / "server.key").chmod(0o600)
    if (d / "server.pem.moved").exists():
        (d / "server.pem.moved").rename(d / "server.pem")
    if (d / "server.pem.valid").exists():
        (d / "server.pem.valid").rename(d / "server.pem")


@pytest.mark.parametrize("breakage", [_break_key_mode, _remove_cert, _expire_cert, _future_cert],
                         ids=["key-0644", "cert-missing", "cert-expired", "cert-not-yet-valid"])
async def test_sighup_applies_the_startup_checks_and_keeps_the_old_context(
        own_broker: RunningBroker, log_lines: list[str], breakage: Any) -> None:
    b = own_broker
    before = b.broker.tls_context.current
    reason = breakage(b.pki.dir)
    assert await _sighup(b, log_lines) == [
        f"ERROR broker.service tls_reload_failed error={reason} action=keeping the previous certificate, client_ca and client_crl"]
    assert b.broker.tls_context.current is before
    await assert_still_serving(b)
    _repair(b.pki.dir)
    assert [line.split(" cert=")[0] for line in await _sighup(b, log_lines)] == ["INFO broker.service tls_reloaded"]
    assert b.broker.tls_context.current is not before
    await assert_still_serving(b)


async def test_sighup_says_that_a_changed_config_is_not_applied(own_broker: RunningBroker,
                                                                log_lines: list[str]) -> None:
    b = own_broker
    source = b.broker.config.source
    assert source is not None
    seen = len(log_lines)
    await _sighup(b, log_lines)
    assert not [line for line in log_lines[seen:] if "config_not_reloaded" in line], "unchanged: nothing to say"

    source.write_text(source.read_text().replace('allow = ["cn:job"', 'allow = ["cn:nobody"'))
    seen = len(log_lines)
    await _sighup(b, log_lines)
    assert [line for line in log_lines[seen:] if "config_not_reloaded" in line] == [
        f"WARNING broker.service config_not_reloaded path={source} reason=the file changed since the start; "
        "SIGHUP applies only certificates and the audit log: restart the broker to apply it"]
    await assert_still_serving(b)  # the allow-list in force is still the one read at the start

    source.write_text("[server\n")
    seen = len(log_lines)
    await _sighup(b, log_lines)
    warned = [line for line in log_lines[seen:] if "config_not_reloaded" in line]
    assert len(warned) == 1 and "the file is not valid now" in warned[0] and "run broker check" in warned[0]


def _handshake_in_memory(pki: Pki, certificates: KnownCertificates, client: str = "job") -> None:
    """A full TLS 1.3 handshake between a stdlib client and the openssl engine's context, over
    memory buffers; raises the server's SSL.Error if it refuses."""
    from OpenSSL import SSL

    server = SSL.Connection(openssl_context(pki.config(), certificates), None)
    server.set_accept_state()
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.ca)
    cctx.load_cert_chain(pki.dir / f"{client}.pem", pki.dir / f"{client}.key")
    into_client, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = cctx.wrap_bio(into_client, from_client, server_hostname="localhost")
    for _ in range(4):
        with contextlib.suppress(ssl.SSLWantReadError):
            conn.do_handshake()
        if from_client.pending:
            server.bio_write(from_client.read())
        try:
            server.do_handshake()
            return
        except SSL.WantReadError:
            pass
        with contextlib.suppress(SSL.WantReadError):
            into_client.write(server.bio_read(65536))
    raise AssertionError("the handshake did not finish")


def test_a_crash_in_the_verify_callback_refuses_the_certificate(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    from OpenSSL import SSL

    _handshake_in_memory(pki, KnownCertificates())  # the control: this client is accepted

    def crash(der: bytes) -> bool:
        raise RuntimeError("boom")

    certificates = KnownCertificates()
    certificates._client_auth = crash  # type: ignore[method-assign]  # noqa: SLF001
    with caplog.at_level(logging.ERROR, logger="broker.tls"), pytest.raises(SSL.Error, match="certificate verify failed"):
        _handshake_in_memory(pki, certificates)
    assert "tls_verify_internal_error error=RuntimeError: the client certificate is refused" in caplog.text
